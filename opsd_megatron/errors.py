"""User errors: bad config, paths, data or layout. The CLIs print them as one line
(``opsd-train: error: <where>: <what>``, exit 2) and show the traceback only with ``--debug``;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
import traceback


class UserError(ValueError):
    """Something the user can fix; the message names the file/line or key and the value."""


class ConfigError(UserError):
    """A recipe or override is invalid; the message names the key and where it was set."""


class PathError(UserError):
    """A configured path does not exist, has the wrong form, or a Hub name cannot be fetched."""


USAGE_EXIT = 2  # argparse's code for a usage error
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def user_error_of(err: BaseException) -> str | None:
    """The one-line message if ``err`` is (or, from a rank, carries) a user error, else None."""
    if isinstance(err, UserError):
        return str(err)
    return getattr(err, "user_error", None)


def report(prog: str, err: BaseException, debug: bool) -> int:
    """Print ``prog: error: ...`` (traceback too with ``debug``); the exit code to return."""
    if debug:
        traceback.print_exception(err)
    message = user_error_of(err) or str(err)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def guarded(prog: str, debug: bool, launch):
    """Run ``launch()`` (the ranks); (None, result), or (exit code, None) after one line for Ctrl-C
    (130; the ranks are stopped by then) or a rank's user error (2). Bugs keep their traceback."""
    try:
        return None, launch()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT, None
    except Exception as err:  # noqa: BLE001 - only user errors are shortened
        if user_error_of(err) is None:
            raise
        return report(prog, err, debug), None
