"""Benchmark: our vocab-parallel JSD vs the naive PyTorch formula, forward+backward time and peak
memory, and ours with ``loss.compile=true`` (its per-chunk work through torch.compile; the first
call, which compiles, is reported apart).

    python bench/loss.py                      # CPU: small sizes; GPU: T=8192, V=151936, bf16
    python bench/loss.py --tokens 2048 --vocab 65536 --beta 0.5
    python bench/loss.py --no-compile         # skip the compiled variant (tens of seconds on CPU)

Each variant runs in its own process, so its peak memory is its own: on GPU the peak of
torch.cuda.max_memory_allocated above the inputs, on CPU the growth of the process's max RSS
(ru_maxrss) above the inputs (a coarser measure). Prints absolute numbers and the ratios
naive / ours measured in the same run; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from opsd_megatron.losses import vocab_parallel_jsd


def naive_jsd(student, teacher, beta, temperature):
    """The formula as usually written (TRL GKD style): full fp32 log-softmaxes and a stacked
    mixture."""
    ls = F.log_softmax(student.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    mixture = torch.logsumexp(
        torch.stack([ls + torch.log(torch.tensor(1 - beta)), lt + torch.log(torch.tensor(beta))]), 0
    )
    kl_t = F.kl_div(mixture, lt, reduction="none", log_target=True)
    kl_s = F.kl_div(mixture, ls, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum(-1)


def ours(student, teacher, beta, temperature):
    return vocab_parallel_jsd(student, teacher, beta=beta, temperature=temperature)


def ours_compiled(student, teacher, beta, temperature):
    return vocab_parallel_jsd(student, teacher, beta=beta, temperature=temperature, compile="true")


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(device=device, dtype=dtype)
    teacher = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(device=device, dtype=dtype)
    student.requires_grad_(True)
    fn = {"naive": naive_jsd, "ours": ours, "compiled": ours_compiled}[args.worker]

    def step():
        student.grad = None
        loss = fn(student, teacher, args.beta, args.temperature)
        loss.mean().backward()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    loss = step()  # warm-up (allocator, kernels; compiles); its peak counts too, as in training
    sync()
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else None
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = _peak_bytes(device) - (base if base is not None else args.baseline_rss)
    return {
        "median_ms": 1e3 * sorted(times)[len(times) // 2],
        "peak_extra_bytes": peak,
        "first_call_s": first_s,
        "loss_head": loss.detach().float()[:8].tolist(),
    }


def _baseline_rss(args) -> int:
    """Max RSS of a process that only builds the inputs (CPU: subtracted from the variants'
    peak)."""
    code = (
        "import resource,torch;g=torch.Generator().manual_seed(0);"
        f"s=(torch.randn({args.tokens},{args.vocab},generator=g)*2).to(torch.{args.dtype});"
        f"t=(torch.randn({args.tokens},{args.vocab},generator=g)*2).to(torch.{args.dtype});"
        "import opsd_megatron.losses;print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024)"
    )
    return int(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
    )


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=8192 if cuda else 512)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32768)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeat", type=int, default=5 if cuda else 3)
    p.add_argument("--no-compile", action="store_true", help="skip the loss.compile variant")
    p.add_argument("--worker", choices=["naive", "ours", "compiled"], help=argparse.SUPPRESS)
    p.add_argument("--baseline-rss", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.device == "cpu":
        args.baseline_rss = _baseline_rss(args)
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "no_compile")
    ]
    results = {}
    for name in ("naive", "ours") + (() if args.no_compile else ("compiled",)):
        out = subprocess.run(
            [sys.executable, __file__, f"--worker={name}", *passthrough],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    n, o = results["naive"], results["ours"]
    max_diff = max(abs(a - b) for a, b in zip(n["loss_head"], o["loss_head"]))
    gib = 1 << 30
    print(
        f"JSD beta={args.beta} T={args.tokens} V={args.vocab} {args.dtype} on {args.device} "
        f"(fwd+bwd, median of {args.repeat})"
    )
    print(f"  naive : {n['median_ms']:9.2f} ms   peak +{n['peak_extra_bytes'] / gib:7.3f} GiB")
    print(f"  ours  : {o['median_ms']:9.2f} ms   peak +{o['peak_extra_bytes'] / gib:7.3f} GiB")
    print(
        f"  speed-up naive/ours: {n['median_ms'] / o['median_ms']:.2f}x   "
        f"memory naive/ours: {n['peak_extra_bytes'] / max(o['peak_extra_bytes'], 1):.2f}x   "
        f"max |loss diff| on 8 tokens: {max_diff:.2e}"
    )
    if "compiled" in results:
        c = results["compiled"]
        diff = max(abs(a - b) for a, b in zip(c["loss_head"], o["loss_head"]))
        print(
            f"  compiled: {c['median_ms']:7.2f} ms   peak +{c['peak_extra_bytes'] / gib:7.3f} GiB  "
            " "
            f"first call (compiles) {c['first_call_s']:.1f} s"
        )
        print(
            f"  speed-up eager/compiled: {o['median_ms'] / c['median_ms']:.2f}x   memory "
            f"eager/compiled: {o['peak_extra_bytes'] / max(c['peak_extra_bytes'], 1):.2f}x   "
            f"max |loss diff| compiled vs eager: {diff:.2e}"
        )


if __name__ == "__main__":
    main()
