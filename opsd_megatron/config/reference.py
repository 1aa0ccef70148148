"""The config reference, generated from the section dataclasses: every key with its type, default
and the comment that says what it does (the field's trailing comment, else the comment block right
above it), so the page users look keys up in cannot drift from the code.

    python -m opsd_megatron.config.reference --write docs/config_reference.md
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

from opsd_megatron.config.schema import OPSDConfig

HEADER = """# Config reference

Every key of a recipe, by section: its type, its default and what it does. Generated from the
dataclasses in `opsd_megatron/config/` by
`python -m opsd_megatron.config.reference --write docs/config_reference.md` (a test fails when this
page is stale). Set a key in a recipe's YAML or on the command line as `section.key=value`.
"""


def field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment lines directly above it (joined), then its trailing
    comment (in parentheses when both are there)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    trailing, own_line = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if lines[row - 1][: tok.start[1]].strip():
                trailing[row] = text
            else:
                own_line[row] = text
    out = {}
    for row, line in enumerate(lines, 1):
        m = re.match(r"^    (\w+)\s*:", line)
        if not m or m.group(1) not in {f.name for f in dataclasses.fields(cls)}:
            continue
        end = row  # a field written over several lines carries its comment on a later one
        while end < len(lines) and not re.match(r"^    (\w+\s*:|def |@|#)", lines[end]):
            end += 1
        tail = next((trailing[r] for r in range(row, end + 1) if r in trailing), "")
        above, r = [], row - 1
        while r in own_line:
            above.insert(0, own_line[r])
            r -= 1
        text = " ".join(above)
        out[m.group(1)] = f"{text} ({tail})" if text and tail else text or tail
    return out


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    text = str(tp).replace("typing.", "")
    m = re.fullmatch(r"Optional\[(.*)\]", text) or re.fullmatch(r"Union\[(.*), NoneType\]", text)
    return f"{m.group(1)} or null" if m else text


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value) -> str:
    if isinstance(value, str):
        text = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    else:
        text = repr(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _rows(prefix: str, cls) -> list[str]:
    hints, comments, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp):  # a nested section: its own keys
            out += _rows(f"{prefix}{f.name}.", tp)
            continue
        what = comments.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{_show(_default(f))}` | {what} |")
    return out


def _section(name: str, cls) -> list[str]:
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    out = [f"## `{name}`", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        out += [doc, ""]
    out += ["| key | type | default | what it does |", "|---|---|---|---|"]
    return out + _rows(f"{name}.", cls) + [""]


def render() -> str:
    """The whole page."""
    out = [HEADER]
    out += ["## Top level", "", "| key | type | default | what it does |", "|---|---|---|---|"]
    plain = {f.name for f in dataclasses.fields(OPSDConfig) if _sub(f) is None}
    out += [r for r in _rows("", OPSDConfig) if r.split("`")[1] in plain] + [""]
    for f in dataclasses.fields(OPSDConfig):
        cls = _sub(f)
        if dataclasses.is_dataclass(cls):
            out += _section(f.name, cls)
    return "\n".join(out).rstrip() + "\n"


def _sub(f: dataclasses.Field):
    """The dataclass a section field holds (``Optional[LoRAConfig]`` too), or None."""
    tp = typing.get_type_hints(OPSDConfig)[f.name]
    for cand in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(cand):
            return cand
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="FILE", help="write the page here (default: print it)")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
