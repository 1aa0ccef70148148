"""docs/config_reference.md is what ``python -m opsd_megatron.config.reference`` writes from the
dataclasses today (rerun it after changing a config section), and it lists every key with a
description."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from opsd_megatron.config import OPSDConfig
from opsd_megatron.config.reference import render

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config_reference.md"


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        sub = next(
            (c for c in (f.type, *getattr(f.type, "__args__", ())) if dataclasses.is_dataclass(c)),
            None,
        )
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if sub is None and dataclasses.is_dataclass(default):
            sub = type(default)
        if sub is not None:
            yield from _keys(sub, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_the_page_is_current():
    assert PAGE.read_text() == render(), (
        "docs/config_reference.md is stale: python -m opsd_megatron.config.reference "
        "--write docs/config_reference.md"
    )


def test_every_key_is_listed_with_what_it_does():
    rows = {
        line.split("`")[1]: line.rsplit("|", 2)[1].strip()
        for line in render().splitlines()
        if line.startswith("| `")
    }
    keys = list(_keys(OPSDConfig))
    assert len(keys) > 100 and set(keys) == set(rows), set(keys) ^ set(rows)
    assert not [k for k in keys if not rows[k]], "keys without a description"
