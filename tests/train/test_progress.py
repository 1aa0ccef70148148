"""Progress display: plain lines in a log file (no escape codes, no carriage returns, about 20
lines per run plus the last step, counted from a resumed start), a rich bar on a terminal."""

from __future__ import annotations

import io
import re

from opsd_megatron.platform.progress import Progress

LINE = re.compile(r"^\[opsd\] step (\d+)/100 \((\d+)%\)  loss 0\.\d{4}  eta \d+m\d\ds$")


def _run(start: int, terminal: bool | None = None) -> str:
    stream = io.StringIO()
    p = Progress(100, start, stream=stream, terminal=terminal)
    for step in range(start + 1, 101):
        p.update(step, f"loss {1 / step:.4f}")
    p.close()
    return stream.getvalue()


def test_a_log_file_gets_plain_lines():
    text = _run(0)
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    steps = [int(LINE.match(ln).group(1)) for ln in lines]
    assert steps == list(range(5, 101, 5)), steps
    resumed = [int(LINE.match(ln).group(1)) for ln in _run(40).splitlines()]
    assert resumed[0] == 43 and resumed[-1] == 100 and len(resumed) == 20


def test_a_terminal_gets_the_bar():
    text = _run(0, terminal=True)
    assert "100/100" in text and "\x1b[" in text and not LINE.search(text)
