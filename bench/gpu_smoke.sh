#!/usr/bin/env bash
# The first GPU run, on one GPU, in under 5 minutes (issue 27). Every step goes through
# torchrun (NCCL), so what a CPU run never exercises is exercised: batches, stats and the
# preemption vote on the GPU, collectives on CUDA tensors, the sampler's CUDA generator.
#   1. recipes/tiny_cpu.yaml at TP1: 2 OPSD steps (Megatron sampler at T=1, LoRA teacher pass,
#      student pass, megatron's optimizer), a checkpoint each step, then a resume to step 3;
#   2. the same with loss.fused=true (hidden states + the output layer's shard), 1 step;
#   3. a Qwen3-1.7B-shaped random model in bf16 with LoRA r=64/alpha=128 on all linears: 2 steps
#      with 64 sampled tokens at T=1.2, then a resume to step 3 (the optimizer state reloads).
# It fails on the first error and checks each run's metrics: steps 1..N, finite losses, nothing
# skipped, and a nonzero sampler_logprob_error below 0.05 (the sampler and the trainer agree).
# On the lent machine (device tool), after `bash bench/gpu_wheels.sh` here:
#   run(command="bash bench/gpu_smoke.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/opsd-site .whl/*.whl
  export PYTHONPATH="/tmp/opsd-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "needs a GPU")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
OUT=${SMOKE_OUT:-/tmp/opsd-smoke}
rm -rf "$OUT"

train() { "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m opsd_megatron.train.cli "$@"; }
check() {  # check OUT_DIR STEPS
  "$PY" - "$1" "$2" <<'PYCHECK'
import json, math, sys
out, steps = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
for r in rows:
    assert math.isfinite(r["loss"]) and r["skipped"] == 0, r
    err = r.get("sampler_logprob_error")
    assert err is not None and err < 0.05, ("sampler and trainer disagree", err)
print(f"ok {out}: " + ", ".join(f"step {r['step']} loss {r['loss']:.4f} "
      f"{r['tokens_per_s']:.0f} tok/s" for r in rows))
PYCHECK
}
COMMON=(parallel.tensor_model_parallel_size=1 logging.tensorboard=false
        logging.progress_bar=false checkpoint.save_interval=1 trainer.save_rollouts=false)

echo "== 1. tiny recipe: 2 steps, checkpoint, resume to 3 =="
train recipes/tiny_cpu.yaml "trainer.output_dir=$OUT/tiny" trainer.max_steps=2 "${COMMON[@]}"
train recipes/tiny_cpu.yaml "trainer.output_dir=$OUT/tiny" trainer.max_steps=3 "${COMMON[@]}"
check "$OUT/tiny" 3

echo "== 2. fused loss =="
train recipes/tiny_cpu.yaml "trainer.output_dir=$OUT/fused" trainer.max_steps=1 loss.fused=true \
  "${COMMON[@]}"
check "$OUT/fused" 1

echo "== 3. Qwen3-1.7B-shaped random model, bf16, LoRA r64: 2 steps, resume to 3 =="
QWEN=(model.dtype=bfloat16 model.init_std=0.02 model.architecture.vocab_size=151936
      model.architecture.hidden_size=2048 model.architecture.intermediate_size=6144
      model.architecture.num_hidden_layers=28 model.architecture.num_attention_heads=16
      model.architecture.num_key_value_heads=8 model.architecture.head_dim=128
      model.architecture.rope_theta=1000000 lora.rank=64 lora.alpha=128.0
      rollout.temperature=1.2 rollout.max_new_tokens=64 trainer.global_batch_size=8
      trainer.micro_batch_size=4 optimizer.lr=2e-5)
train recipes/tiny_cpu.yaml "trainer.output_dir=$OUT/q17" trainer.max_steps=2 "${QWEN[@]}" \
  "${COMMON[@]}"
train recipes/tiny_cpu.yaml "trainer.output_dir=$OUT/q17" trainer.max_steps=3 "${QWEN[@]}" \
  "${COMMON[@]}"
check "$OUT/q17" 3
echo "smoke: all passed"
