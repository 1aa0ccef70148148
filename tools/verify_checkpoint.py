#!/usr/bin/env python3
"""Verify training checkpoints against their manifests (every file present, of the recorded size
and SHA-256), and with ``--safe`` also load their pickle-based files without running code: torch's
``.metadata`` index through an unpickler that allows only checkpoint-metadata classes, ``*.pt``
through ``torch.load(weights_only=True)``. Use --safe before loading a checkpoint you did not write.

DIR is one checkpoint (OUT/checkpoints/step_N), a checkpoints directory, or a run's OUT.
Exit 0 when every checkpoint verifies, 1 otherwise.

Example:
    python tools/verify_checkpoint.py runs/tiny_cpu --safe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opsd_megatron.train.checkpointing import STEP_DIR, problems_with
from opsd_megatron.train.manifest import MANIFEST, read_manifest, unlisted
from opsd_megatron.train.safe_metadata import check_untrusted


def checkpoints_in(root: Path) -> list[Path]:
    if STEP_DIR.match(root.name) or (root / MANIFEST).is_file():
        return [root]
    base = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    return (
        sorted(d for d in base.iterdir() if d.is_dir() and STEP_DIR.match(d.name))
        if base.is_dir()
        else []
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "dir", help="a checkpoint, a checkpoints/ directory, or a run's output directory"
    )
    p.add_argument(
        "--safe",
        action="store_true",
        help="also load .metadata/*.pt the safe way (untrusted files)",
    )
    args = p.parse_args(argv)
    found = checkpoints_in(Path(args.dir))
    if not found:
        print(
            f"verify_checkpoint: error: {args.dir}: no checkpoints (step_N directories) found",
            file=sys.stderr,
        )
        return 2
    bad = 0
    for ckpt in found:
        problems = problems_with(ckpt) + (check_untrusted(ckpt) if args.safe else [])
        has_manifest = (ckpt / MANIFEST).is_file()
        extra = unlisted(ckpt, read_manifest(ckpt)) if not problems and has_manifest else []
        status = (
            "FAILED"
            if problems
            else "OK"
            if has_manifest
            else "UNVERIFIED (written before manifests)"
        )
        print(
            f"{status}  {ckpt}" + (f"  (not in the manifest: {', '.join(extra)})" if extra else "")
        )
        for line in problems:
            print(f"    {line}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
