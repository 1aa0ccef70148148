"""The demonstration's figures: each arm's accuracy curve against sampled tokens, its final
per-benchmark figures (accuracy, response length, marker and repetition rates — the in-domain and
an out-of-distribution split side by side when an arm evaluates both), the spread over seeds, and
the plots and the text table."""

from __future__ import annotations

import json
from pathlib import Path

FIGURES = (
    "avg@1",
    "avg@1_ci95",
    "response_length",
    "marker_rate",
    "repetition_rate",
    "truncation_rate",
)


def _first_benchmark_accuracy(run_dir: Path, step: int, average: float):
    """The first benchmark's accuracy at ``step`` and its Wilson 95 % interval (None unless the
    evaluation is greedy) — the curve follows the in-domain split when an arm evaluates several;
    the logged average when the step's report is not there."""
    report = run_dir / "eval" / f"step_{step:06d}.json"
    if not report.is_file():
        return average, None
    benchmarks = json.loads(report.read_text())["benchmarks"]
    if not benchmarks:
        return average, None
    first = next(iter(benchmarks.values()))
    return first["avg@1"], first.get("avg@1_ci95")


def _evaluations(run_dir: Path):
    """(step, tokens so far, accuracy, 95 % interval or None) per periodic evaluation of a run."""
    tokens = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        tokens += m.get("generated_tokens", 0.0) or m.get("reference_tokens", 0.0)
        if "eval/avg@1" in m:
            acc, ci = _first_benchmark_accuracy(run_dir, m["step"], m["eval/avg@1"])
            yield int(m["step"]), tokens, acc, ci


def curve(run_dir: Path, start_acc: float, start_ci=None) -> list[tuple]:
    """[(tokens so far, held-out accuracy, 95 % low, 95 % high)] from a run's metrics.jsonl,
    starting at the base; the interval is (None, None) where the evaluation gives none."""
    lo, hi = start_ci or (None, None)
    points = [(0.0, start_acc, lo, hi)]
    for _, tokens, acc, ci in _evaluations(run_dir):
        points.append((tokens, acc, *(ci or (None, None))))
    return points


def accuracy_by_step(run_dir: Path) -> dict[int, float]:
    """{step: held-out accuracy} of a run's periodic evaluations."""
    return {step: acc for step, _, acc, _ in _evaluations(run_dir)}


def final_figures(run_dir: Path) -> dict:
    """{benchmark: {figure: value}} of the run's last periodic evaluation ({} when none)."""
    reports = sorted(p for p in (run_dir / "eval").glob("step_*.json") if "teacher" not in p.name)
    if not reports:
        return {}
    benchmarks = json.loads(reports[-1].read_text())["benchmarks"]
    return {name: {k: b[k] for k in FIGURES if k in b} for name, b in benchmarks.items()}


def _accuracy(f: dict) -> str:
    if "avg@1" not in f:
        return ""
    ci = f.get("avg@1_ci95")
    return f"{100 * f['avg@1']:.1f} %" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


# per-step figures of the training rollouts (OPSD adds the teacher's agreement, GRPO its reward)
TRACE = (
    "response_length",
    "truncation_rate",
    "repetition_rate",
    "marker_rate",
    "top1_agreement",
    "teacher_logprob",
    "reward",
)


def trace(run_dir: Path, window: int = 4) -> dict:
    """{figure: [mean over the first ``window`` steps, over the last ``window``]} of the run's
    per-step training figures — whether responses grow, get cut off or repeat as it trains (the
    collapse the OPSD follow-ups describe) and whether the student moves toward the teacher."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in rows if m.get("generated_tokens")]  # SFT samples nothing: no trace
    out = {}
    for key in TRACE:
        values = [m[key] for m in rows if isinstance(m.get(key), (int, float))]
        if values:
            ends = values[:window], values[-window:]
            out[key] = [sum(v) / len(v) for v in ends]
    return out


def trace_table(arms: dict) -> str:
    """Each sampling arm's training figures, first steps -> last steps."""
    keys = [k for k in TRACE if any(k in a.get("trace", {}) for a in arms.values())]
    rows = ["| arm | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
    for name, a in arms.items():
        t = a.get("trace", {})
        if "response_length" not in t:  # SFT samples nothing
            continue
        cells = [f"{t[k][0]:.3g} → {t[k][1]:.3g}" if k in t else "" for k in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table(base: dict, arms: dict) -> str:
    """The arms side by side: final accuracy (with its 95 % interval when greedy), length,
    truncation, repetition and marker rate per benchmark, tokens sampled."""
    names = sorted({b for a in arms.values() for b in a.get("final", {})})
    cols = ("acc", "length", "truncated", "repeated 4-grams", "markers/1k")
    head = "| arm | tokens | " + " | ".join(f"{b} {c}" for b in names for c in cols)
    rows = [head + " |", "|---" * (2 + len(cols) * len(names)) + "|"]
    if base.get("final") and len(names) == 1:  # an evaluated pretrained base: its row first
        arms = {"base (no training)": {"tokens": 0, "final": {names[0]: base["final"]}}, **arms}
    for arm, a in arms.items():
        cells = [arm, f"{a['tokens']:.0f}"]
        for b in names:
            f = a.get("final", {}).get(b, {})
            cells += [
                _accuracy(f),
                f"{f['response_length']:.1f}" if "response_length" in f else "",
                f"{100 * f['truncation_rate']:.1f} %" if "truncation_rate" in f else "",
                f"{100 * f['repetition_rate']:.1f} %" if "repetition_rate" in f else "",
                f"{f['marker_rate']:.2f}" if "marker_rate" in f else "",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    ci = base.get("ci95")
    band = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    return f"base: {100 * base['accuracy']:.1f} %{band} alone\n" + "\n".join(rows)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5))


def _save(plt, fig, ax, out_png: Path, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot(curves: dict, base: dict, out_png: Path) -> None:
    plt, fig, ax = _figure()
    for name, pts in curves.items():
        label = f"{name} (x: reference tokens trained on)" if name == "sft" else name
        x = [p[0] for p in pts]
        (line,) = ax.plot(x, [100 * p[1] for p in pts], marker="o", ms=3, label=label)
        banded = [p for p in pts if len(p) > 3 and p[2] is not None]
        if len(banded) > 1:  # greedy evaluations: the Wilson 95 % interval as a band
            ax.fill_between(
                [p[0] for p in banded],
                [100 * p[2] for p in banded],
                [100 * p[3] for p in banded],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.axhline(
        100 * base["teacher_accuracy"],
        color="gray",
        ls=":",
        label="base with the reference (teacher)",
    )
    _save(plt, fig, ax, out_png, "tokens sampled during training", "held-out accuracy (%)")


def spread(runs: list[dict]) -> dict:
    """Per arm: accuracy at each evaluation step over seeds (mean, min, max) and the lift's
    spread."""
    out = {}
    for name in runs[0]["arms"]:
        curves = [r["arms"][name]["curve"] for r in runs]
        n = min(len(c) for c in curves)
        points = []
        for i in range(n):
            accs = [c[i][1] for c in curves]
            points.append(
                {
                    "tokens": sum(c[i][0] for c in curves) / len(curves),
                    "mean": sum(accs) / len(accs),
                    "min": min(accs),
                    "max": max(accs),
                }
            )
        lifts = [r["arms"][name]["final_accuracy"] - r["base_accuracy"] for r in runs]
        out[name] = {
            "points": points,
            "lift_mean": sum(lifts) / len(lifts),
            "lift_min": min(lifts),
            "lift_max": max(lifts),
        }
    return out


def lifts_at(runs: list[dict], step: int) -> list[float | None]:
    """Each run's OPSD lift over its base at ``step`` (None: not evaluated there)."""
    out = []
    for r in runs:
        acc = r["arms"]["opsd"].get("accuracy_at", {}).get(str(step))
        out.append(None if acc is None else acc - r["base_accuracy"])
    return out


def below_claims(runs: list[dict], claims) -> list[str]:
    """One line per (seed triple, claim) whose lift falls short of the claim (or was not
    evaluated at its step)."""
    out = []
    for claim in claims:
        for r, lift in zip(runs, lifts_at(runs, claim.step)):
            if lift is None or lift < claim.lift:
                got = "not evaluated" if lift is None else f"{100 * lift:+.0f} points"
                out.append(
                    f"seeds {r['seeds']}: lift at step {claim.step} {got}, claim "
                    f"{100 * claim.lift:+.0f}"
                )
    return out


def plot_spread(spread: dict, out_png: Path) -> None:
    plt, fig, ax = _figure()
    for name, arm in spread.items():
        x = [p["tokens"] for p in arm["points"]]
        (line,) = ax.plot(
            x, [100 * p["mean"] for p in arm["points"]], marker="o", ms=3, label=f"{name} (mean)"
        )
        ax.fill_between(
            x,
            [100 * p["min"] for p in arm["points"]],
            [100 * p["max"] for p in arm["points"]],
            color=line.get_color(),
            alpha=0.2,
        )
    _save(
        plt,
        fig,
        ax,
        out_png,
        "tokens sampled during training (SFT: reference tokens trained on)",
        "held-out accuracy (%), band: min-max over seeds",
    )
