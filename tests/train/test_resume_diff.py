"""The resume comparison: a key missing from an older checkpoint's config.yaml counts as its
default (adding an option must not strand older runs); a changed value is still named."""

from __future__ import annotations

import dataclasses

from opsd_megatron.config import load_config
from opsd_megatron.train.resume import config_diff
from tests.train.tiny import RECIPE


def test_keys_newer_than_the_checkpoint_count_as_their_defaults():
    current = dataclasses.asdict(load_config(RECIPE, []))
    older = dataclasses.asdict(load_config(RECIPE, []))
    del older["data"]["teacher_context"]  # written before the option existed
    del older["rollout"]["vllm"]["memory_fraction"]
    assert config_diff(older, current) == []
    changed = dataclasses.asdict(load_config(RECIPE, ["data.teacher_context=answer"]))
    keys = [k for k, _, _ in config_diff(older, changed)]
    assert "data.teacher_context" in keys and "data.teacher_template" in keys
