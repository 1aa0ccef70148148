"""Where OPSD's signal sits on a real model: the per-token divergence (the recipe's JSD_β)
between SmolLM2's teacher (reading the reference) and its student on the student's own
rollouts, split by what each token is — a digit, an operator, the final 'Answer:' line, the
rest of the words — and by whether the rollout was right. If the divergence is concentrated on
the few tokens that decide the answer while the loss averages over every response token, the
per-step signal is diluted by the response length. And how heavy the tail is: what share of the
divergence, and of the digits, a per-token cap (``loss.token_clip``) at each of ``--caps`` would
take out of the gradient.

    PYTHONPATH=. python bench/smollm2_divergence.py          # the SVAMP comparison's OPSD arm
    PYTHONPATH=. python bench/smollm2_divergence.py --steps 2 --recipe OUT/opsd/recipe.yaml
    PYTHONPATH=. python bench/smollm2_divergence.py --steps 3 loss.beta=0   # forward KL's tail

Samples ``--steps`` batches of the recipe (the base model: LoRA adapters at zero), scores them as
the OPSD step does and prints one table (Markdown); nothing is trained.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("digit", "operator", "answer line", "other")


def token_class(text: str, after_answer: bool) -> str:
    if after_answer:
        return "answer line"
    t = text.strip()
    if t and t.isdigit():
        return "digit"
    if t and re.fullmatch(r"[-+*/×÷=().,$%]+", t):
        return "operator"
    return "other"


def measure(recipe: str, steps: int, overrides: list[str]) -> dict:
    """Rank function: per class, [tokens, summed divergence] over right and wrong rollouts."""
    import torch

    from opsd_megatron.config import load_config, validate_layout
    from opsd_megatron.data.grading import Grader
    from opsd_megatron.losses.distributions import Logits
    from opsd_megatron.models.from_config import arch_of
    from opsd_megatron.models.output_head import hidden_states_out, logits_of, output_weight
    from opsd_megatron.train.components import build_components

    quiet = [
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "trainer.save_rollouts=false",
    ]
    cfg = load_config(recipe, [*quiet, *overrides])
    c = build_components(cfg, validate_layout(cfg, 1, arch=arch_of(cfg.model)))
    grader = Grader(answer_format=cfg.eval.answer_format)
    tok = c.tokenizer
    out = {(ok, k): [0, 0.0] for ok in (True, False) for k in CLASSES}
    thirds = [[0, 0.0] for _ in range(3)]
    values = []  # (divergence, is a digit) per response token: the tail a cap would cut
    for step in range(steps):
        rollouts = c.algorithm.rollout(1000 + step)
        scored = c.algorithm.score(rollouts)
        c.model.eval()
        with torch.no_grad():
            for mb in scored.micro_batches:
                with hidden_states_out(c.model):
                    states = c.model(mb.student.tokens_BT, mb.student.position_ids_BT, None)
                rows = mb.student.response_rows(states, mb.response_mask_BR.shape[1])
                student = Logits(logits_of(rows, output_weight(c.model)))
                per_token, _ = c.algorithm.per_token_loss(student, mb, c.groups)
                for i, row in enumerate(mb.rows):
                    ids = rollouts.responses[row]
                    problem = rollouts.problems[row]
                    right = grader.grade(tok.decode(ids, skip_special_tokens=True),
                                         problem["answer"]).correct  # fmt: skip
                    text = ""
                    for n, t in enumerate(ids):
                        piece = tok.decode([t], skip_special_tokens=True)
                        cls = token_class(piece, "Answer" in text)
                        text += piece
                        d = float(per_token[i, n])
                        values.append((d, cls == "digit"))
                        out[(bool(right), cls)][0] += 1
                        out[(bool(right), cls)][1] += d
                        third = thirds[min(2, 3 * n // max(len(ids), 1))]
                        third[0] += 1
                        third[1] += d
    classes = {f"{ok}|{k}": v for (ok, k), v in out.items()}
    return {"classes": classes, "thirds": thirds, "values": values}


def tail(values: list[tuple[float, bool]], caps: list[float]) -> list[str]:
    """Per cap: the tokens above it, their share of the divergence and how many are digits."""
    total = sum(d for d, _ in values) or 1.0
    rows = [
        "| cap (nats per token) | tokens above | share of the divergence | digits among them |",
        "|---|---|---|---|",
    ]
    for cap in caps:
        over = [(d, digit) for d, digit in values if d > cap]
        digits = sum(digit for _, digit in over) / max(len(over), 1)
        rows.append(
            f"| {cap:g} | {100 * len(over) / max(len(values), 1):.2f} % | "
            f"{100 * sum(d for d, _ in over) / total:.1f} % | {100 * digits:.0f} % |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--recipe", default=str(ROOT / "runs" / "smollm2_svamp" / "opsd" / "recipe.yaml")
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--caps", default="0.1,0.3,1", help="per-token caps to read the tail at")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = p.parse_args()
    from opsd_megatron.testing import run_distributed

    r = run_distributed(measure, 1, args.recipe, args.steps, args.overrides, timeout=3600)[0]
    total_n = sum(v[0] for v in r["classes"].values())
    total_d = sum(v[1] for v in r["classes"].values())
    print("| rollouts | token | share of tokens | share of the divergence | mean per token |")
    print("|---|---|---|---|---|")
    for key, (n, d) in r["classes"].items():
        ok, cls = key.split("|")
        if n:
            print(f"| {'right' if ok == 'True' else 'wrong'} | {cls} | {100 * n / total_n:.1f} % | "
                  f"{100 * d / total_d:.1f} % | {d / n:.4f} |")  # fmt: skip
    print("\nby position in the response (first, middle, last third): mean divergence per token "
          + ", ".join(f"{d / max(n, 1):.4f}" for n, d in r["thirds"]))  # fmt: skip
    values = sorted(d for d, _ in r["values"])
    q = {p: values[min(len(values) - 1, int(p * len(values)))] for p in (0.5, 0.9, 0.99, 0.999)}
    print("\nper-token quantiles: " + ", ".join(f"p{100 * p:g} {v:.4f}" for p, v in q.items()))
    print("\n".join(["", *tail(r["values"], [float(c) for c in args.caps.split(",")])]))


if __name__ == "__main__":
    main()
