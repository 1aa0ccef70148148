"""Suite ordering and the fast tier.

* With ``-n 2 --dist loadfile`` (pyproject) files go to the two workers in collection order, so
  the longest files (by ``--durations`` on 2 cores, longest first: the demo, then the SLURM jobs
  and the real-model runs) go to the front: the demo runs beside all the others, and the suite
  ends on short files instead of one worker finishing a long one alone.
* ``pytest -m "not slow"`` is the edit loop's tier (pure functions, losses, config, grading,
  data, single-process units and short multi-process checks, the device audit as the 2-process
  smoke): the files below — whole training runs, the demo, the real model, SLURM jobs, resume
  and preemption runs — are marked ``slow``. Measured by file (``--durations``) on 2 cores.
"""

import pytest

LONGEST_FIRST = (  # seconds on 2 idle cores (2026-12-08, a clean clone)
    "tests/test_demo.py",  # 449
    "tests/launch/test_multinode_slurm.py",  # 260
    "tests/rollout/test_vllm_cpu_training.py",  # 202
    "tests/models/test_real_model.py",  # ~190
    "tests/train/test_resume.py",  # 135
    "tests/train/test_megatron_optimizer.py",  # ~140
    "tests/train/test_variants.py",  # ~200 over 13 runs
    "tests/train/test_resume_safety.py",  # ~120
)
SLOW = (
    "tests/test_demo.py",
    "tests/test_demo_seeds.py",
    "tests/models/test_real_model.py",
    "tests/models/test_converter_cli.py",
    "tests/models/test_conversion.py",
    "tests/train/test_megatron_optimizer.py",
    "tests/train/test_variants.py",
    "tests/train/test_resume_safety.py",
    "tests/train/test_resume.py",
    "tests/train/test_resume_diff.py",
    "tests/train/test_preemption.py",
    "tests/train/test_e2e.py",
    "tests/train/test_sequence_parallel.py",
    "tests/train/test_torchrun.py",
    "tests/rollout/test_vllm_engine.py",
    "tests/rollout/test_vllm_cpu_engine.py",
    "tests/rollout/test_vllm_cpu_training.py",
    "tests/eval/test_runner.py",
    "tests/launch/",
    "tests/test_documented_commands.py",
    "tests/testing/test_device_audit_tools.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next(
            (i for i, f in enumerate(LONGEST_FIRST) if item.nodeid.startswith(f)),
            len(LONGEST_FIRST),
        )

    items.sort(key=rank)  # stable: the rest keep their collection order
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
