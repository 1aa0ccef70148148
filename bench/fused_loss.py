"""Benchmark: the fused output layer + JSD (``vocab_parallel_linear_jsd``, logits never whole) vs
the materialized path (``logits = h @ W.T`` for student and teacher, then ``vocab_parallel_jsd``),
forward+backward (hidden-state and weight gradients) time and peak memory at T and 4T tokens,
and the bare GEMMs of the same projections (the floor: ``fused/GEMM``); ``--compile`` adds the
fused path with ``loss.compile=true`` (its per-chunk work through torch.compile);
with TRL installed (1.16: ``trl/trainer/distillation_trainer.py::_chunked_divergence_loss``,
one device, not tensor-parallel) its chunked loss is measured too; ``--frozen-weight`` measures
the LoRA case (no weight gradient: the fused forward computes the
hidden-state gradient, nothing is recomputed).

    python bench/fused_loss.py                       # CPU: H=256, V=32768, T=512 and 2048
    python bench/fused_loss.py --tokens 4096 --hidden 4096 --vocab 151936   # a GPU

Each variant runs in its own process (peak memory is its own: CUDA's max allocated, on CPU the
growth of max RSS above a process that only builds the inputs). Prints absolute figures and
ratios from the same run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from opsd_megatron.losses import vocab_parallel_jsd
from opsd_megatron.losses.linear_jsd import vocab_parallel_linear_jsd


def _inputs(args, tokens):
    g = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    h_s = torch.randn(tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    h_t = (h_s.float() + 0.3 * torch.randn(tokens, args.hidden, generator=g)).to(device, dtype)
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    return h_s.requires_grad_(True), h_t, w.requires_grad_(not args.frozen_weight)


def worker(args) -> dict:
    device = torch.device(args.device)
    h_s, h_t, w = _inputs(args, args.tokens)

    def step():
        h_s.grad = w.grad = None
        if args.worker in ("fused", "compiled"):
            mode = "true" if args.worker == "compiled" else "false"
            loss = vocab_parallel_linear_jsd(h_s, h_t, w, beta=args.beta, compile=mode).loss
        elif args.worker == "trl":  # TRL's chunked hidden-state JSD (a scalar mean; TP1 only)
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            mask = torch.ones(1, h_s.shape[0], dtype=torch.bool, device=h_s.device)
            loss = _chunked_divergence_loss(h_s[None], h_t[None], w, w.detach(), mask, args.beta)[0]
            loss.backward()
            return loss.reshape(1)
        elif args.worker == "gemm":  # the floor: the projections and their gradients, no loss
            loss = (h_s @ w.T).float().mean(dim=1)
            with torch.no_grad():
                h_t @ w.T
        else:
            loss = vocab_parallel_jsd(h_s @ w.T, (h_t @ w.T).detach(), beta=args.beta)
        loss.mean().backward()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss = step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - args.baseline_rss
    return {
        "ms": 1e3 * sorted(times)[len(times) // 2],
        "peak": peak,
        "head": loss.detach().float()[:8].tolist(),
        "mean": loss.detach().float().mean().item(),
    }


def _baseline_rss(args) -> int:
    """Max RSS of a process that builds the same inputs and nothing else."""
    code = (
        "import resource,sys,argparse;sys.path.insert(0,'bench');import fused_loss as f;"
        f"a=argparse.Namespace(**{vars(args)!r});f._inputs(a,a.tokens);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout)


def _trl_version() -> str | None:
    """TRL's version where its chunked divergence (trl/trainer/distillation_trainer.py, 1.16)
    imports, else None."""
    try:
        import trl
        from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or an incompatible version
        return None
    return trl.__version__


def _run(args, tokens: int) -> dict:
    args.tokens = tokens
    if args.device == "cpu":
        args.baseline_rss = _baseline_rss(args)
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "sizes", "compile", "frozen_weight")
    ] + (["--frozen-weight"] if args.frozen_weight else [])
    results = {}
    names = ("materialized", "fused", "gemm") + (("compiled",) if args.compile else ())
    if _trl_version():
        names += ("trl",)
    for name in names:
        out = subprocess.run(
            [sys.executable, __file__, f"--worker={name}", *flags],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=4096 if cuda else 512, help="T (4T is run too)")
    p.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32768)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also the fused path compiled")
    p.add_argument(
        "--frozen-weight",
        action="store_true",
        help="the output weight needs no gradient (LoRA): the fused forward computes the "
        "hidden-state gradient instead of the backward recomputing the logits",
    )
    p.add_argument(
        "--worker",
        choices=["materialized", "fused", "gemm", "compiled", "trl"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--baseline-rss", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    gib, t = 1 << 30, args.tokens
    print(
        f"fused linear JSD vs materialized: H={args.hidden} V={args.vocab} {args.dtype} on "
        f"{args.device}, weight {'frozen' if args.frozen_weight else 'trained'}"
    )
    runs = {n: _run(args, n) for n in (t, 4 * t)}
    for n, r in runs.items():
        m, f, g = r["materialized"], r["fused"], r["gemm"]
        diff = max(abs(a - b) for a, b in zip(m["head"], f["head"]))
        print(
            f"  T={n:6d}  materialized {m['ms']:9.1f} ms {m['peak'] / gib:7.3f} GiB | fused "
            f"{f['ms']:9.1f} ms {f['peak'] / gib:7.3f} GiB | time fused/mat "
            f"{f['ms'] / m['ms']:.2f}x"
            f"  memory mat/fused {m['peak'] / max(f['peak'], 1):.1f}x  |Δloss| {diff:.1e}"
            f"\n            bare GEMMs {g['ms']:9.1f} ms {g['peak'] / gib:7.3f} GiB | fused/GEMM "
            f"{f['ms'] / g['ms']:.2f}x time, +{(f['peak'] - g['peak']) / gib:.2f} GiB"
        )
        if "trl" in r:
            x = r["trl"]
            print(
                f"            TRL {_trl_version()} chunked {x['ms']:9.1f} ms "
                f"{x['peak'] / gib:7.3f} GiB"
                f" | fused/TRL {f['ms'] / x['ms']:.2f}x time  |Δmean loss| "
                f"{abs(x['mean'] - f['mean']):.1e}"
            )
        if "compiled" in r:
            c = r["compiled"]
            print(
                f"            fused compiled {c['ms']:9.1f} ms {c['peak'] / gib:7.3f} GiB | "
                f"eager/compiled {f['ms'] / c['ms']:.2f}x  compiled/GEMM {c['ms'] / g['ms']:.2f}x"
            )
    grow = runs[4 * t]["fused"]["peak"] / max(runs[t]["fused"]["peak"], 1)
    print(
        f"  fused peak from T to 4T: {grow:.2f}x (materialized: "
        f"{runs[4 * t]['materialized']['peak'] / max(runs[t]['materialized']['peak'], 1):.2f}x)"
    )


if __name__ == "__main__":
    main()
