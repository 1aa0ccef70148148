"""Tokenizers: an HF tokenizer directory (never ``trust_remote_code``), or the project's built-in
character tokenizer with a Qwen3-style chat template, so the tiny recipes need no download."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Protocol

BUILTIN = "builtin:arith"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template, reduced to what the prompts use: thinking off appends an empty think block.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif "
    "%}{% endif %}"
)


def builtin_tokenizer():
    """Character-level tokenizer over printable ASCII plus Qwen3's chat specials (≈105 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r")) + ["—", "’"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


class Tokenizer(Protocol):
    """What the library uses of a tokenizer (an HF ``PreTrainedTokenizerBase`` has it all)."""

    pad_token_id: int
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: list[dict], **kwargs): ...

    def __len__(self) -> int: ...


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer directory (local or cached Hub name; never remote code), or ``builtin:arith``."""
    if spec == BUILTIN:
        return builtin_tokenizer()
    from transformers import AutoTokenizer

    from opsd_megatron.data.sources import resolve

    kind, where = resolve("model.tokenizer", spec)  # a local path is never looked up on the Hub
    return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)


END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids that end a response: EOS, the chat templates' end-of-turn tokens the vocabulary
    has (ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...), and the ``eos_token_id`` (one or a list)
    of the ``generation_config.json`` beside the tokenizer — what the model was released to stop
    on."""
    ids = {tokenizer.eos_token_id}
    for t in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    gen = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if isinstance(i, int))
