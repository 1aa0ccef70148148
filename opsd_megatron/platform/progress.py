"""Progress of long work (training steps, evaluation batches) for a person watching: a rich bar on
a terminal; in a log file (SLURM, CI, ``| tee``) plain lines instead — a redrawn bar there is
carriage returns and escape codes."""

from __future__ import annotations

import sys
import time

PLAIN_LINES = 20  # a non-terminal gets about this many lines over the run, and the last step


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """``update(step, info)`` after each step; ``close()`` at the end. ``label``: what is counted
    ("step", "gsm8k"); ``under``: the name the lines carry (default this process's, ``log.py``);
    ``stream``: where it goes (default stdout); ``terminal``: override the TTY check (tests)."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        label: str = "step",
        stream=None,
        terminal: bool | None = None,
        under: str | None = None,
    ):
        from opsd_megatron.platform import log

        self.name = under or log.name()
        self.stream = stream or sys.stdout
        self.total, self.start, self.label, self.t0 = total, start, label, time.monotonic()
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every = max(1, (total - start) // PLAIN_LINES)
        self.bar = None
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(f"[bold]{self.name} {label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream, force_terminal=True),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
            return
        if (step - self.start) % self.every and step != self.total:
            return
        done = step - self.start
        eta = (time.monotonic() - self.t0) / max(done, 1) * (self.total - step)
        pct = 100 * step // max(self.total, 1)
        print(
            f"[{self.name}] {self.label} {step}/{self.total} ({pct}%)  {info}  "
            f"eta {_duration(eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
