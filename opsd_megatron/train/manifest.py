"""A checkpoint's manifest: every file it holds with its size and SHA-256, written last (before the
atomic rename) and verified before resume, so a truncated, corrupted or partly deleted checkpoint
is reported by path and skipped instead of being loaded. Hashing is split over the ranks
(``names[rank::world]``), so a large checkpoint is read once, in parallel."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "opsd-manifest-v1"


def files_of(ckpt: Path) -> list[str]:
    """Every file below ``ckpt`` except the manifest, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(ckpt).as_posix()
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe(ckpt: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (ckpt / n).stat().st_size, "sha256": digest(ckpt / n)} for n in names}


def write_manifest(ckpt: Path, entries: dict[str, dict]) -> None:
    text = json.dumps({"format": FORMAT, "files": dict(sorted(entries.items()))}, indent=1)
    (ckpt / MANIFEST).write_text(text)


def read_manifest(ckpt: Path) -> dict[str, dict]:
    """The recorded files; ValueError saying what is wrong with the manifest itself."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        assert data["format"] == FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{path} is unreadable or not an {FORMAT} manifest") from None
    return files


def check_files(
    ckpt: Path, recorded: dict[str, dict], names: list[str] | None = None, checksums: bool = True
) -> list[str]:
    """Problems with ``names`` (default: all recorded) against the manifest; [] when they verify.
    Without ``checksums`` only presence and sizes are checked (cheap: for the launcher)."""
    problems = []
    for name in recorded if names is None else names:
        path, want = ckpt / name, recorded[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, the manifest says {want['bytes']}"
            )
        elif checksums and digest(path) != want["sha256"]:
            problems.append(f"{path}: contents changed (SHA-256 differs from the manifest)")
    return problems


def unlisted(ckpt: Path, recorded: dict[str, dict]) -> list[str]:
    """Files present but not in the manifest (not an error: reported for the verify tool)."""
    return [n for n in files_of(ckpt) if n not in recorded]
