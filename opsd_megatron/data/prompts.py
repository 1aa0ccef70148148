"""Student and teacher sequences around one rollout ŷ.

Both prompts go through the tokenizer's chat template (thinking mode set per role); ŷ is appended
as token ids, never re-tokenized, so its positions align token for token between the two
sequences whatever the tokenizer would merge across the boundary. Sequences are right-padded
after ŷ only: no padding sits between prompt and response, and position ids are contiguous
(0..len-1), unlike the reference code's left-padded layout, which shifts RoPE positions.

Legend: B batch, T padded length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def chat_prompt_ids(tokenizer, text: str, thinking: bool) -> list[int]:
    """``text`` as one user turn through the tokenizer's chat template, ready for the assistant."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        enable_thinking=thinking,
        tokenize=True,
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def student_prompt_ids(tokenizer, data_cfg, problem: str) -> list[int]:
    """The student's prompt: the problem in ``data.student_template``, chat-formatted."""
    return chat_prompt_ids(
        tokenizer, data_cfg.student_template.format(problem=problem), data_cfg.student_thinking
    )


def teacher_prompt_ids(
    tokenizer, data_cfg, problem: str, solution: str, answer: str | None = None
) -> list[int]:
    """The teacher's prompt: problem + reference (solution and/or final answer, as
    ``data.teacher_template`` / ``data.teacher_context`` say), chat-formatted."""
    text = data_cfg.teacher_template.format(problem=problem, solution=solution, answer=answer)
    return chat_prompt_ids(tokenizer, text, data_cfg.teacher_thinking)


@dataclass
class PackedBatch:
    """Right-padded sequences; ``response_mask_BT`` marks the positions whose next token is ŷ."""

    tokens_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    response_mask_BT: torch.Tensor  # True at the positions t whose logits predict ŷ (t+1 is ŷ)
    targets_BT: torch.Tensor  # tokens_BT shifted left: what position t predicts
    prompt_lengths: list[int]
    response_lengths: list[int]

    def response_rows(self, states_BTX: torch.Tensor, r_max: int) -> torch.Tensor:
        """``states_BTX`` (logits or hidden states) at the positions that predict the response,
        aligned by response index: ``[B, R, X]``."""
        b, _, x = states_BTX.shape
        out = states_BTX.new_zeros(b, r_max, x)
        for i in range(b):
            start, n = self.prompt_lengths[i] - 1, self.response_lengths[i]
            out[i, :n] = states_BTX[i, start : start + n]
        return out


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    pad_to: int | None = None,
    *,
    device: torch.device | str,
) -> PackedBatch:
    """[prompt ++ ŷ ++ pad...] per row; position ids 0..T-1; mask over the positions predicting ŷ.
    Built on the host, then moved to ``device`` (the rank's) in one copy per tensor."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({max(lengths)})")
    b = len(prompts)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = True
    targets = torch.cat([tokens[:, 1:], torch.full((b, 1), pad_id, dtype=torch.long)], dim=1)
    positions = torch.arange(width).expand(b, width).contiguous()
    return PackedBatch(
        tokens.to(device),
        positions.to(device),
        mask.to(device),
        targets.to(device),
        [len(p) for p in prompts],
        [len(r) for r in responses],
    )


def response_logit_rows(batch: PackedBatch) -> list[torch.Tensor]:
    """Per row, the positions whose logits score ŷ — in the same order in any packed batch."""
    return [
        torch.nonzero(batch.response_mask_BT[i], as_tuple=True)[0]
        for i in range(batch.tokens_BT.shape[0])
    ]
