#!/usr/bin/env bash
# The GPU benchmarks in one go (prints numbers and ratios; asserts nothing). On a GPU node:
#   bash bench/gpu.sh
# 1. the vocab-parallel JSD against the naive formula (bf16, T=8192, V=151936)
# 2. the fused output layer + JSD (loss.fused) against the materialized path and the bare GEMMs,
#    H=4096, V=151936, T=4096 and 16384 (goal: <= 1.3x the GEMMs, <= +3 GiB at 16384)
# 3. rollouts: the colocated vLLM engine (only where vLLM is importable) against the Megatron
#    sampler in real training steps, for the tiny recipe and a Qwen3-1.7B-shaped model: refit
#    time, rollout tokens/s, sampler_logprob_error
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh needs a GPU")'
echo "== loss: vocab-parallel JSD vs naive =="
"$PY" bench/loss.py
echo "== fused output layer + JSD vs materialized and the bare GEMMs =="
"$PY" bench/fused_loss.py --tokens 4096 --hidden 4096 --vocab 151936 --compile
echo "== rollouts: vLLM vs the Megatron sampler =="
if "$PY" -c 'import vllm' 2>/dev/null; then
  echo "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)')"
else
  echo "vLLM not importable: measuring the Megatron sampler only (pip install 'opsd-megatron[vllm]')"
fi
"$PY" bench/vllm_rollout.py "$@"
