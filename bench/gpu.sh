#!/usr/bin/env bash
# The GPU benchmarks in one go (prints numbers and ratios; asserts nothing). On a GPU node:
#   bash bench/gpu.sh
# 1. the vocab-parallel JSD against the naive formula (bf16, T=8192, V=151936)
# 2. rollouts: the colocated vLLM engine (only where vLLM is importable) against the Megatron
#    sampler in real training steps, for the tiny recipe and a Qwen3-1.7B-shaped model: refit
#    time, rollout tokens/s, sampler_logprob_error
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh needs a GPU")'
echo "== loss: vocab-parallel JSD vs naive =="
"$PY" bench/loss.py
echo "== rollouts: vLLM vs the Megatron sampler =="
if "$PY" -c 'import vllm' 2>/dev/null; then
  echo "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)')"
else
  echo "vLLM not importable: measuring the Megatron sampler only (pip install 'opsd-megatron[vllm]')"
fi
"$PY" bench/vllm_rollout.py "$@"
