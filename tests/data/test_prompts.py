"""Student/teacher sequences around one rollout: ŷ aligns token for token (also at the <think>
boundary and with a tokenizer that merges across it), no padding sits between prompt and
response, positions are contiguous, and the default templates are the official code's."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.config import DataConfig
from opsd_megatron.data.prompts import (
    pack,
    response_logit_rows,
    student_prompt_ids,
    teacher_prompt_ids,
)
from opsd_megatron.data.tokenizer import CHAT_TEMPLATE, builtin_tokenizer


def merging_bpe_tokenizer():
    """A byte-level BPE trained so that '\\n\\n' followed by text merges into one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "</think>\n\nThe answer is 3",
        "\n\nThe answer",
        "assistant\nThe",
        "Problem: 1+2",
    ] * 50
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.mark.parametrize(
    "make", [builtin_tokenizer, merging_bpe_tokenizer], ids=["chars", "merging-bpe"]
)
def test_response_aligns_token_for_token(make):
    tok = make()
    cfg = DataConfig()
    sp = student_prompt_ids(tok, cfg, "1+2")
    tp = teacher_prompt_ids(tok, cfg, "1+2", "1+2=3. \\boxed{3}")
    assert tok.decode(sp).endswith("<think>\n\n</think>\n\n"), (
        "student: thinking off (empty think block)"
    )
    assert tok.decode(tp).endswith("<|im_start|>assistant\n"), "teacher: thinking on"
    response = tok.encode("The answer is 3", add_special_tokens=False) + [tok.eos_token_id]
    if make is merging_bpe_tokenizer:  # the case that makes re-tokenising wrong
        joined = tok.encode(tok.decode(sp + response), add_special_tokens=False)
        assert joined != sp + response, (
            "this tokenizer should merge across the prompt/response boundary"
        )
    s = pack([sp], [response], tok.pad_token_id, device="cpu")
    t = pack([tp], [response], tok.pad_token_id, device="cpu")
    for batch, prompt in ((s, sp), (t, tp)):
        seq = batch.tokens_BT[0].tolist()
        assert (
            seq[: len(prompt)] == prompt
            and seq[len(prompt) : len(prompt) + len(response)] == response
        )
        rows = response_logit_rows(batch)[0]
        assert batch.targets_BT[0, rows].tolist() == response, "masked positions predict exactly ŷ"
    assert torch.equal(
        s.targets_BT[0, response_logit_rows(s)[0]], t.targets_BT[0, response_logit_rows(t)[0]]
    )


def test_no_padding_between_prompt_and_response_and_contiguous_positions():
    pad = 0
    batch = pack([[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[11, 12], [13]], pad, device="cpu")
    for i, (p, r) in enumerate([(3, 2), (6, 1)]):
        row = batch.tokens_BT[i].tolist()
        assert pad not in row[: p + r], "padding only after the response"
        assert all(x == pad for x in row[p + r :])
        assert batch.position_ids_BT[i].tolist() == list(range(batch.tokens_BT.shape[1]))
        mask = batch.response_mask_BT[i]
        assert mask.sum() == r and torch.nonzero(mask)[0].item() == p - 1
    with pytest.raises(ValueError, match="shorter than the longest"):
        pack([[1, 2, 3]], [[4]], pad, pad_to=3, device="cpu")


def test_default_templates_are_the_official_codes():
    cfg = DataConfig()
    s = cfg.student_template.format(problem="P")
    assert (
        s == "Problem: P\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    t = cfg.teacher_template.format(problem="P", solution="S")
    assert t.startswith(
        "Problem: P\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin"
        " ===\nS\n=== Reference Solution End ===\n\n\nAfter reading the reference solution above"
    )
    assert t.endswith(
        "if something doesn't work out:\n\nPlease reason step by step, and put your final answer "
        "within \\boxed{}."
    )


def test_stop_ids_come_from_the_tokenizer_and_the_generation_config(tmp_path):
    import json

    from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from tests.models.fixtures import build_tokenizer

    build_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert stop_token_ids(tok) == [tok.eos_token_id], "a vocabulary without end-of-turn tokens"
    the = tok.convert_tokens_to_ids("the")  # a model released to stop on another token, too
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [the, 1]}))
    assert stop_token_ids(load_tokenizer(str(tmp_path))) == sorted({tok.eos_token_id, the, 1})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": the}))
    assert the in stop_token_ids(load_tokenizer(str(tmp_path)))


def test_teacher_context_solution_answer_and_custom(tmp_path):
    import json

    from opsd_megatron.config import ConfigError, DataConfig
    from opsd_megatron.data.dataset import DataError, load_problems
    from opsd_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:arith")
    solution = "12+30: 2+0=2, 1+3=4. \\boxed{42}"
    full = tok.decode(teacher_prompt_ids(tok, DataConfig(), "12+30", solution, "42"))
    assert solution in full and "Reference Solution Begin" in full  # the paper's default
    answer_only = DataConfig(teacher_context="answer")
    text = tok.decode(teacher_prompt_ids(tok, answer_only, "12+30", solution, "42"))
    assert "The final answer to this problem is: 42" in text and "2+0=2" not in text
    custom = DataConfig(
        teacher_context="custom", teacher_template="{problem} ({answer}) {solution}"
    )
    text = tok.decode(teacher_prompt_ids(tok, custom, "12+30", solution, "42"))
    assert f"12+30 (42) {solution}" in text
    with pytest.raises(ConfigError, match="teacher_context=answer brings its own template"):
        DataConfig(teacher_context="answer", teacher_template="{problem} {solution}")
    with pytest.raises(ConfigError, match="solution\\|answer\\|custom"):
        DataConfig(teacher_context="hint")
    # answers come from the row, else from the solution (\boxed{} or '#### N'); none: named
    rows = [
        {"problem": "a", "solution": "so \\boxed{7}"},
        {"problem": "b", "solution": "so\n#### 8"},
        {"problem": "c", "solution": "no final answer written", "answer": 9},
        {"problem": "d", "solution": "no final answer written"},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(f), teacher_context="answer", skip_malformed=True)
    loaded = load_problems(cfg)
    assert sorted((r["problem"], r["answer"]) for r in loaded.rows) == [
        ("a", "7"),
        ("b", "8"),
        ("c", "9"),
    ]
    assert loaded.skipped_malformed == 1
    with pytest.raises(DataError, match=r"d.jsonl:4: data.teacher_template uses \{answer\}"):
        load_problems(DataConfig(source=str(f), teacher_context="answer"))
    assert len(load_problems(DataConfig(source=str(f))).rows) == 4, (
        "the solution context needs none"
    )
