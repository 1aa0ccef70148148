"""Steps after the first, recomputed in one process: the weights a run saved after step k-1 (its
adapters, or all weights in full-parameter training) loaded into an fp64 HF-transformers model
(adapters through HF ``peft``), then step k's loss and gradient norm on the run's own step-k
rollouts. Independent of the layout the run used, so a wrong DP/TP/PP gradient reduction, a
missing tied-embedding sum or a wrong update shows up as a mismatch at step k."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.train.tiny import RECIPE, hf_initial_model, rollouts

FUSED_A = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "fc1", "up_proj": "fc1"}


def saved_weights(out: str, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Rank function (one process): HF-named tensors of what checkpoint step_k holds, per k —
    PEFT-named adapters for a LoRA run, full HF weights for a full-parameter one."""
    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
    from opsd_megatron.models.hf_weights import iter_stage_hf_tensors
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.models.peft_export import stage_peft_tensors
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    base = Path(out) / "base_model"
    arch, _ = read_checkpoint_metadata(base)
    result = {}
    for k in steps:
        ckpt = Path(out) / "checkpoints" / f"step_{k:06d}" / "model"
        lora = read_checkpoint_metadata(ckpt)[1].get("lora")
        model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups)
        load_model_checkpoint(model, base)
        if lora:
            apply_lora(model, LoRAConfig(**lora))
            load_model_checkpoint(model, ckpt, adapters_only=True)
            result[k] = {n: t.clone() for n, t in stage_peft_tensors(model, arch).items()}
        else:
            load_model_checkpoint(model, ckpt)
            result[k] = {
                n: t.clone()
                for _, full in iter_stage_hf_tensors(model, arch, merge_lora=False)
                for n, t in full.items()
            }
    return result


def _grad_norm_lora(model) -> float:
    """Megatron fuses q/k/v (and gate/up) behind one shared A: its gradient is the sum of the three
    PEFT A gradients; the B parts are separate rows of one fused B."""
    a_groups, total = {}, 0.0
    for name, p in model.named_parameters():
        if "lora_" not in name or p.grad is None:
            continue
        module = name.split(".lora_")[0]
        proj = module.rsplit(".", 1)[1]
        if ".lora_A." in name and proj in FUSED_A:
            key = (module.rsplit(".", 1)[0], FUSED_A[proj])
            a_groups[key] = a_groups.get(key, 0) + p.grad
        else:
            total += float(p.grad.square().sum())
    return math.sqrt(total + sum(float(g.square().sum()) for g in a_groups.values()))


def _peft_student(cfg, lora: dict, weights: dict[str, torch.Tensor]):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        hf_initial_model(cfg),
        LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], target_modules=targets, lora_dropout=0.0
        ),
    ).double()
    set_peft_model_state_dict(model, weights)
    return model


def per_token_losses(s, t, tokens, loss: dict, beta: float, r=None):
    """The run's per-token loss on one sequence's response rows, in fp64 (tests/losses/reference);
    ``r``: the initial policy's logits on the student's sequence (``ref_kl_coef``)."""
    from tests.losses import reference as ref

    temperature = loss.get("temperature", 1.0)
    if loss.get("ref_kl_coef"):
        rest = {k: v for k, v in loss.items() if k != "ref_kl_coef"}
        kl = ref.jsd(s, r, 1.0, temperature)
        return (
            per_token_losses(s, t, tokens, rest, beta, r) + loss["ref_kl_coef"] * kl
        )  # unweighted
    if loss.get("token_weight") == "teacher_entropy":
        rest = {k: v for k, v in loss.items() if k != "token_weight"}
        h_t = ref.entropy(t, temperature)
        w = torch.where(h_t > loss["entropy_threshold"], loss["low_confidence_weight"], 1.0)
        return w * per_token_losses(s, t, tokens, rest, beta, r)
    if loss.get("token_clip"):  # the summed divergence capped; capped tokens pass no gradient
        c = loss["token_clip"]
        d = per_token_losses(
            s, t, tokens, {k: v for k, v in loss.items() if k != "token_clip"}, beta
        )
        return torch.where(d > c, torch.full_like(d, c).detach(), d)
    if loss.get("kind", "jsd") == "sampled_token":
        if loss.get("baseline") == "reverse_kl":  # Â = log-ratio + sg[KL(p_S || p_T)]
            ls = ref.token_logprobs(s, tokens, temperature)
            lt = ref.token_logprobs(t, tokens, temperature)
            adv = (lt - ls + ref.jsd(s, t, 1.0, temperature)).detach()
            return -adv * ls
        return ref.sampled_token_loss(s, t, tokens, temperature)
    if loss.get("teacher_top_k"):
        from tests.losses.test_topk_jsd import reference_topk_jsd

        k, mode = loss["teacher_top_k"], loss.get("top_k_mode", "tail")
        return reference_topk_jsd(
            s, t, beta, k, mode, temperature, loss.get("term_clip"), s.shape[-1]
        )
    return ref.jsd(s, t, beta, temperature, term_clip=loss.get("term_clip"))


def _diagnostic_rows(s, t, tokens, per_token, loss: dict) -> dict[str, torch.Tensor]:
    """Per response token of one sequence (fp64, full vocabulary): each diagnostic's value and
    the positions it is averaged over (losses/diagnostics.py's definitions)."""
    n, temperature = len(tokens), loss.get("temperature", 1.0)
    third = torch.arange(n) * 3 // n
    every = torch.ones(n, dtype=torch.bool)
    lp_t = torch.log_softmax(t / temperature, -1).gather(-1, tokens[:, None])[:, 0]
    per_token = per_token.detach()
    return {
        "top1_agreement": ((s.argmax(-1) == t.argmax(-1)).double(), every),
        "teacher_logprob": (lp_t, every),
        "divergence_first": (per_token, third == 0),
        "divergence_middle": (per_token, third == 1),
        "divergence_last": (per_token, third == 2),
    }


def _as_the_trainer_averages(rows: list[dict]) -> dict[str, float]:
    """The masked mean over every response token of the step: what ``student_pass`` and
    ``share_stats`` log (token sums and counts over micro-batches and DP ranks)."""
    out = {}
    for key in rows[0]:
        vals = torch.cat([r[key][0][r[key][1]] for r in rows])
        out[key] = vals.mean().item() if len(vals) else 0.0
    return out


def reference_step(
    out: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    lora: dict | None,
    beta: float = 0.5,
    loss: dict | None = None,
    teacher_weights: dict[str, torch.Tensor] | None = None,
    cfg_overrides: tuple[str, ...] = (),
    diagnostics: dict | None = None,
    teacher_solutions=None,
) -> tuple[float, float]:
    """(loss, gradient norm) of step ``step`` from the weights saved after the step before.
    ``loss``: the run's loss section (kind, temperature, term_clip, reduction); ``teacher_weights``:
    PEFT adapters the teacher uses (an EMA or current teacher), else the initial model.
    ``diagnostics``: filled with the step's OPSD diagnostics as the trainer aggregates them.
    ``teacher_solutions(rows) -> [text | None]``: what each rollout's teacher reads instead of the
    reference (None: the rollout is left out of the loss)."""
    from opsd_megatron.config import load_config
    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.prompts import student_prompt_ids, teacher_prompt_ids
    from opsd_megatron.data.tokenizer import load_tokenizer

    loss = loss or {}
    cfg = load_config(RECIPE, [f"trainer.output_dir={out}", *cfg_overrides])
    teacher = hf_initial_model(cfg)
    if teacher_weights is not None:
        teacher = _peft_student(cfg, lora, teacher_weights)
    if lora:
        student = _peft_student(cfg, lora, weights)
    else:
        student = hf_initial_model(cfg)
        missing = student.load_state_dict(weights, strict=False).missing_keys
        assert set(missing) <= {"lm_head.weight"}, missing  # tied: lm_head is embed_tokens
        for p in student.parameters():
            p.requires_grad_(True)
    tok = load_tokenizer(cfg.model.tokenizer)
    loaded = load_problems(cfg.data, solution_required=cfg.teacher.context == "reference")
    problems = {p["id"]: p for p in loaded.rows}
    rows = rollouts(out, step)
    solutions = [problems[r["id"]]["solution"] for r in rows]
    if teacher_solutions is not None:
        solutions = teacher_solutions(rows)
    per_seq, diag_rows = [], []
    for row, solution in zip(rows, solutions):
        if solution is None:
            continue
        p, resp = problems[row["id"]], row["response_ids"]
        s_prompt = student_prompt_ids(tok, cfg.data, p["problem"])
        t_prompt = teacher_prompt_ids(tok, cfg.data, p["problem"], solution, p["answer"])
        s = student(torch.tensor([s_prompt + resp])).logits[0, len(s_prompt) - 1 : -1]
        with torch.no_grad():
            t = teacher(torch.tensor([t_prompt + resp])).logits[0, len(t_prompt) - 1 : -1]
        r = None
        if loss.get("ref_kl_coef"):  # the initial policy (the fixed teacher) on ŷ after x alone
            with torch.no_grad():
                r = teacher(torch.tensor([s_prompt + resp])).logits[0, len(s_prompt) - 1 : -1]
        per_seq.append(per_token_losses(s, t, torch.tensor(resp), loss, beta, r))
        diag_rows.append(_diagnostic_rows(s.detach(), t, torch.tensor(resp), per_seq[-1], loss))
    if diagnostics is not None:
        diagnostics.update(_as_the_trainer_averages(diag_rows))
    if loss.get("reduction", "sequence_mean") == "token_mean":
        total = torch.cat(per_seq).mean()
    else:
        total = torch.stack([x.mean() for x in per_seq]).mean()
    total.backward()
    if lora:
        norm = _grad_norm_lora(student)
    else:
        norm = math.sqrt(
            sum(float(q.grad.square().sum()) for q in student.parameters() if q.grad is not None)
        )
    return float(total), norm
