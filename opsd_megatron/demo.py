"""``opsd-demo RECIPE.yaml [key=value ...]``: the learning demonstration, as ordinary training runs.

(1) build a base by SFT on the student *and* the teacher prompt, so it can use a reference solution
but solves only part of the problems alone; (2) evaluate it on held-out problems (alone and with the
reference); (3) train each arm — OPSD, and the SFT and GRPO baselines — from that base with the
same number of problems per step, evaluating as they go; (4) write ``summary.json`` and
``accuracy.png`` (held-out accuracy against sampled tokens; SFT, which samples nothing, against the
reference tokens it trained on; with each evaluation's Wilson 95 % band where it is greedy).

``base: null`` skips (1): the model of ``common`` (a pretrained model, ``model.hf_dir``) is the
base, evaluated once alone and with the reference (``OUT/base/eval/{alone,reference}.json``,
reused while ``common`` is unchanged), and every arm trains from it — the real-model comparison
(``recipes/smollm2_svamp.yaml``).

The recipe has ``output_dir``, ``common`` (a recipe every stage starts from), ``base`` and ``arms``
(name -> recipe overrides, ``opsd`` required) and ``seeds`` (seed triples [model init, trainer,
rollout]); each stage is written as ``OUT/<stage>/recipe.yaml`` and run by ``opsd-train``, so any
stage can be rerun or inspected alone. Overrides address the demo recipe:
``arms.opsd.trainer.max_steps=50``, ``common.model.init_seed=3``, ``arms.grpo=null``.

``--seeds N`` runs the whole demonstration (its own base, then every arm) for the first N seed
triples, each in ``OUT/seed_<init>_<trainer>_<rollout>/``, and writes the spread over seeds —
per arm and evaluation step the mean, min and max accuracy — to ``OUT/summary.json`` and
``OUT/accuracy.png`` (mean with a min-max band), so a single lucky curve cannot pass for a result;
``--jobs J`` runs J triples at once (on 2 cores: ``--seeds 5 --jobs 2``, one thread per rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from opsd_megatron import demo_report as report
from opsd_megatron.config import ConfigError, load_config, load_structured
from opsd_megatron.errors import UserError


@dataclass
class BaseUntil:
    """Train the base until it reads references: after ``base``'s own steps, continue in rounds of
    ``extend_steps`` (resuming the same run; past its warmup the rate is constant) until the
    accuracy with the reference reaches ``teacher_accuracy``, or ``max_steps``. 0 disables. Some
    initialisations learn to copy from a reference hundreds of steps later than others; a fixed step
    count gives them a teacher that is itself wrong on a fifth of the problems, which OPSD cannot
    lift."""

    teacher_accuracy: float = 0.0
    accuracy: float = 0.0  # ... and solves at least this fraction alone
    # ... judged by the Wilson 95 % lower bound of the accuracy alone: on 100 problems 5 solved
    # may be 2 % in truth (a base at the edge, which OPSD barely moved); 10 solved clear 5 %
    accuracy_lower_bound: bool = False
    extend_steps: int = 100
    max_steps: int = 0

    def __post_init__(self):
        if not (0.0 <= self.teacher_accuracy <= 1.0 and 0.0 <= self.accuracy <= 1.0):
            raise ConfigError(
                "base_until: teacher_accuracy and accuracy must be in [0, 1], got "
                f"{self.teacher_accuracy}, {self.accuracy}"
            )
        if self.extend_steps < 1:
            raise ConfigError(f"base_until.extend_steps must be >= 1, got {self.extend_steps}")


@dataclass
class Claim:
    """What the README claims of every seed triple: OPSD lifts held-out accuracy by at least
    ``lift`` over its base by step ``step``; ``--seeds N`` flags each triple that falls short."""

    step: int = 100
    lift: float = 0.0

    def __post_init__(self):
        if self.step < 1 or not -1.0 <= self.lift <= 1.0:
            raise ConfigError(f"claims: step must be >= 1 and lift in [-1, 1], got {self}")


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    common: dict = field(default_factory=dict)
    base: Optional[dict] = field(default_factory=dict)  # None: common's model is the base
    base_until: BaseUntil = field(default_factory=BaseUntil)
    arms: dict = field(default_factory=dict)
    seeds: list = field(default_factory=list)  # [[model init, trainer, rollout], ...] for --seeds
    claims: list[Claim] = field(default_factory=list)

    def seed_triples(self, n: int) -> list[tuple[int, int, int]]:
        """The first n triples of ``seeds``; beyond the list, (k, k, k) for k = 1, 2, ..."""
        out = [tuple(int(x) for x in t) for t in self.seeds[:n]]
        k = 0
        while len(out) < n:
            k += 1
            if (k, k, k) not in out:
                out.append((k, k, k))
        return out

    def with_seeds(self, triple, output_dir: str) -> "DemoConfig":
        init, trainer, rollout = triple
        common = OmegaConf.merge(
            OmegaConf.create(self.common),
            {
                "model": {"init_seed": init},
                "trainer": {"seed": trainer},
                "rollout": {"seed": rollout},
            },
        )
        return DemoConfig(
            output_dir,
            OmegaConf.to_container(common),
            self.base,
            self.base_until,
            self.arms,
            self.seeds,
            self.claims,
        )


def load_demo(path: str, overrides: list[str]) -> DemoConfig:
    """The demo recipe through the same loader as a run's (unknown keys, types and ``defaults_from``
    handled alike); each stage's recipe is then validated as a run's config."""
    d = load_structured(DemoConfig, path, overrides)
    d.arms = _inherit({k: v for k, v in (d.arms or {}).items() if v is not None}, path)
    if "opsd" not in d.arms:
        raise ConfigError(f"{path}: arms.opsd is required")
    if any(not isinstance(t, (list, tuple)) or len(t) != 3 for t in d.seeds or []):
        raise ConfigError(f"{path}: seeds must be a list of [model init, trainer, rollout] triples")
    return d


def _inherit(arms: dict, path: str) -> dict:
    """Arms written as ``{from: other, ...}``: the other arm's overrides, then these (one level,
    so a variant names what it changes and nothing else)."""
    out = {}
    for name, arm in arms.items():
        arm = dict(arm)
        parent = arm.pop("from", None)
        if parent is not None:
            if parent not in arms or "from" in (arms[parent] or {}):
                raise ConfigError(
                    f"{path}: arms.{name}.from={parent!r} must name an arm without a 'from' "
                    f"(arms: {', '.join(arms)})"
                )
            arm = OmegaConf.to_container(OmegaConf.merge(arms[parent], arm))
        out[name] = arm
    return out


def _stage_recipe(d: DemoConfig, name: str, stage: dict, base_model: str | None) -> Path:
    """Write OUT/<name>/recipe.yaml (common + stage, output under OUT/<name>) and validate it."""
    out = Path(d.output_dir) / name
    recipe = OmegaConf.merge(OmegaConf.create(d.common), OmegaConf.create(stage))
    recipe.trainer = OmegaConf.merge(recipe.get("trainer", {}), {"output_dir": str(out)})
    # each stage's lines carry its own name: [base], [opsd], [sft], [grpo]
    recipe.logging = OmegaConf.merge(recipe.get("logging", {}), {"name": Path(name).name})
    if base_model:
        recipe.model = OmegaConf.merge(
            recipe.get("model", {}), {"megatron_dir": base_model, "architecture": None}
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(recipe))
    try:
        load_config(path)
    except ConfigError as err:
        raise ConfigError(f"demo stage '{name}': {err}") from err
    return path


def _run(recipe: Path) -> None:
    from opsd_megatron.train.cli import main as train

    rc = train([str(recipe)])
    if rc != 0:
        raise RuntimeError(f"{recipe}: opsd-train exited with {rc}")


def _train_base(d: DemoConfig) -> dict:
    """The base stage, extended while ``base_until`` asks; its accuracy alone and with the
    reference at its last step, and its step count."""
    out, until, stage = Path(d.output_dir), d.base_until, OmegaConf.create(d.base)
    while True:
        recipe = _stage_recipe(d, "base", OmegaConf.to_container(stage), None)
        _run(recipe)
        last = json.loads((out / "base" / "metrics.jsonl").read_text().splitlines()[-1])
        steps = int(last["step"])  # a rerun may find the base already further along
        if "eval/avg@1" not in last or "eval_teacher/avg@1" not in last:
            raise ConfigError(
                "demo base stage must evaluate at its last step with eval.teacher_too=true "
                "(eval.interval dividing trainer.max_steps and base_until.extend_steps)"
            )
        alone, teacher = last["eval/avg@1"], last["eval_teacher/avg@1"]
        more = steps + until.extend_steps
        judged = _lower_bound(out / "base", steps) if until.accuracy_lower_bound else alone
        ready = teacher >= until.teacher_accuracy and judged >= until.accuracy
        if ready or more > until.max_steps:
            return {"accuracy": alone, "teacher_accuracy": teacher, "steps": steps}
        bound = f" (95 % lower bound {100 * judged:.1f}%)" if until.accuracy_lower_bound else ""
        print(
            f"[demo] base at step {steps}: {100 * alone:.0f}% alone{bound}, {100 * teacher:.0f}% "
            f"with the reference (asked: {100 * until.accuracy:.0f}%, "
            f"{100 * until.teacher_accuracy:.0f}%): training on to step {more}",
            flush=True,
        )
        # each round is evaluated at its end (evaluation does not touch the training RNG)
        stage = OmegaConf.merge(
            stage, {"trainer": {"max_steps": more}, "eval": {"interval": until.extend_steps}}
        )


def _lower_bound(run_dir: Path, step: int) -> float:
    """The Wilson 95 % lower bound of the run's accuracy alone at ``step`` (its first
    benchmark's evaluation report)."""
    path = run_dir / "eval" / f"step_{step:06d}.json"
    first = next(iter(json.loads(path.read_text())["benchmarks"].values()))
    return first["avg@1_ci95"][0]


def _eval_base(d: DemoConfig) -> dict:
    """``base: null``: common's model, evaluated alone and with the reference (``opsd-eval``).
    The reports are reused while the stage recipe they were made with is unchanged."""
    from opsd_megatron.eval.cli import main as evaluate

    recipe = _stage_recipe(d, "base", {}, None)
    out = recipe.parent / "eval"
    made_with = out / "made_with.yaml"
    fresh = made_with.is_file() and made_with.read_text() == recipe.read_text()
    figures = {}
    for tag, reference in (("alone", "false"), ("reference", "true")):
        path = out / f"{tag}.json"
        if not (fresh and path.is_file()):
            if evaluate([str(recipe), f"eval.with_reference={reference}", "--tag", tag]) != 0:
                raise RuntimeError(f"{recipe}: opsd-eval --tag {tag} failed")
        benchmarks = json.loads(path.read_text())["benchmarks"]
        figures[tag] = next(iter(benchmarks.values()))
    made_with.write_text(recipe.read_text())
    alone, ref = figures["alone"], figures["reference"]
    return {
        "accuracy": alone["avg@1"],
        "teacher_accuracy": ref["avg@1"],
        "steps": 0,
        "ci95": alone.get("avg@1_ci95"),
        "teacher_ci95": ref.get("avg@1_ci95"),
        "final": {k: alone[k] for k in report.FIGURES if k in alone},
    }


def _check_data(d: DemoConfig) -> None:
    """Every stage's data source exists before the first step (an arm's missing file would
    otherwise fail after the base and the arms before it have trained)."""
    from opsd_megatron.data.sources import resolve

    for name, stage in {"base": d.base or {}, **d.arms}.items():
        recipe = OmegaConf.merge(OmegaConf.create(d.common), OmegaConf.create(stage))
        source = OmegaConf.select(recipe, "data.source", default="synthetic:arith")
        for spec in [source] if isinstance(source, str) else list(source):
            if not str(spec).startswith("synthetic:"):
                try:
                    resolve(f"demo stage '{name}': data.source", str(spec), "dataset")
                except UserError as err:
                    raise ConfigError(str(err)) from None


def run_demo(d: DemoConfig) -> dict:
    """The whole demonstration for one seed triple; returns (and writes) its summary."""
    t0 = time.perf_counter()
    out = Path(d.output_dir)
    _check_data(d)
    if d.base is None:
        base, base_model = _eval_base(d), None
    else:
        base = _train_base(d)
        base_model = str(out / "base" / "checkpoints" / f"step_{base['steps']:06d}" / "model")
    arms = {}
    for name, stage in d.arms.items():
        recipe = _stage_recipe(d, name, stage, base_model)
        _run(recipe)
        curve = report.curve(out / name, base["accuracy"], base.get("ci95"))
        arms[name] = {
            "algorithm": load_config(recipe).algorithm,
            "steps": load_config(recipe).trainer.max_steps,
            "final_accuracy": curve[-1][1],
            "best_accuracy": max(p[1] for p in curve),
            "tokens": curve[-1][0],
            "curve": curve,
            "accuracy_at": {str(k): v for k, v in report.accuracy_by_step(out / name).items()},
            "final": report.final_figures(out / name),
            "trace": report.trace(out / name),
        }
    opsd = arms["opsd"]
    summary = {
        "base_accuracy": base["accuracy"],
        "base_teacher_accuracy": base["teacher_accuracy"],
        "final_accuracy": opsd["final_accuracy"],
        "lift": opsd["final_accuracy"] - base["accuracy"],
        "steps": opsd["steps"],
        "generated_tokens": opsd["tokens"],
        "base": base,
        "arms": arms,
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = report.table(base, arms) + "\n\nDuring training (first 4 steps → last 4 steps):\n\n"
    (out / "table.md").write_text(text + report.trace_table(arms) + "\n")
    report.plot({k: v["curve"] for k, v in arms.items()}, base, out / "accuracy.png")
    return summary


SUMMARY_KEYS = ("base_accuracy", "base_teacher_accuracy", "final_accuracy", "lift", "arms")


def _one_seed(d: DemoConfig, triple) -> dict:
    sub = Path(d.output_dir) / ("seed_" + "_".join(str(s) for s in triple))
    summary = run_demo(d.with_seeds(triple, str(sub)))
    return {"seeds": list(triple), **{k: summary[k] for k in SUMMARY_KEYS}}


def run_seeds(d: DemoConfig, n: int, jobs: int = 1, executor=None) -> dict:
    """The demonstration for each of n seed triples, then the spread (``OUT/summary.json``).
    ``jobs`` > 1 runs that many triples at once, each rank with ``threads_per_rank // jobs``
    threads (at least 1), in separate processes (``executor``: a stand-in for tests)."""
    t0 = time.perf_counter()
    triples = d.seed_triples(n)
    if jobs <= 1:
        runs = [_one_seed(d, t) for t in triples]
    else:
        trainer = d.common.get("trainer", {}) or {}
        threads = max(1, int(trainer.get("threads_per_rank", 1)) // jobs)
        common = OmegaConf.merge(
            OmegaConf.create(d.common), {"trainer": {"threads_per_rank": threads}}
        )
        shared = dataclasses.replace(d, common=OmegaConf.to_container(common))
        print(f"[demo] {len(triples)} seed triples, {jobs} at a time, {threads} thread(s) per rank")
        if executor is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
        with executor as pool:
            runs = list(pool.map(_one_seed, [shared] * len(triples), triples))
    spread = report.spread(runs)
    summary = {
        "seeds": [r["seeds"] for r in runs],
        "runs": runs,
        "spread": spread,
        "lift": {k: spread["opsd"][k] for k in ("lift_mean", "lift_min", "lift_max")},
        "lift_at": {str(c.step): report.lifts_at(runs, c.step) for c in d.claims},
        "below_claim": report.below_claims(runs, d.claims),
        "wall_time_s": time.perf_counter() - t0,
    }
    (Path(d.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    report.plot_spread(spread, Path(d.output_dir) / "accuracy.png")
    return summary


def main(argv=None) -> int:
    """``opsd-demo``: base by SFT, then every arm from it, evaluated on held-out problems; with
    ``--seeds N`` the same for N seed triples and their spread. Returns the exit code."""
    p = argparse.ArgumentParser(
        prog="opsd-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", nargs="?", default="recipes/demo_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="run the demonstration for the recipe's first N seed triples and report the spread",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="with --seeds: run J seed triples at once (threads per rank divided by J)",
    )
    args = p.parse_intermixed_args(argv)
    try:
        demo = load_demo(args.recipe, args.overrides)
        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        if args.jobs < 1 or (args.jobs > 1 and not args.seeds):
            raise ConfigError(f"--jobs must be >= 1 and needs --seeds, got --jobs {args.jobs}")
        if args.seeds:
            summary = run_seeds(demo, args.seeds, args.jobs)
            for r in summary["runs"]:
                print(
                    f"[demo] seeds {r['seeds']}: base {100 * r['base_accuracy']:.0f}% -> OPSD "
                    f"{100 * r['final_accuracy']:.0f}% ({100 * r['lift']:+.0f} points)"
                )
            for step, lifts in summary["lift_at"].items():
                print(
                    f"[demo] OPSD lift at step {step}: "
                    + ", ".join(f"{100 * x:+.0f}" if x is not None else "n/a" for x in lifts)
                )
            for miss in summary["below_claim"]:
                print(f"[demo] BELOW THE CLAIM: {miss}")
            lift = summary["lift"]
            print(
                f"[demo] OPSD lift over {args.seeds} seeds: mean {100 * lift['lift_mean']:+.1f}, "
                "min "
                f"{100 * lift['lift_min']:+.1f}, max {100 * lift['lift_max']:+.1f} points; "
                f"{Path(demo.output_dir) / 'summary.json'}, accuracy.png"
            )
            return 0
        summary = run_demo(demo)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"[demo] base {100 * summary['base_accuracy']:.1f}% alone, "
        f"{100 * summary['base_teacher_accuracy']:.1f}% "
        f"with the reference; after {summary['steps']} steps:\n"
        + report.table(summary["base"], summary["arms"])
        + f"\n[demo] OPSD lift {100 * summary['lift']:+.1f} points; "
        f"{Path(demo.output_dir) / 'summary.json'}, accuracy.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
