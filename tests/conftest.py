"""Suite ordering and the fast tier.

* With ``-n 2 --dist loadfile`` (pyproject) files go to the two workers in collection order, so
  the one long file (the demo, the suite's longest) is moved to the front and runs beside all the
  others instead of after them.
* ``pytest -m "not slow"`` is the edit loop's tier (pure functions, losses, config, grading,
  data, single-process units and short multi-process checks, the device audit as the 2-process
  smoke): the files below — whole training runs, the demo, the real model, SLURM jobs, resume
  and preemption runs — are marked ``slow``. Measured by file (``--durations``) on 2 cores.
"""

import pytest

LONGEST_FIRST = ("tests/test_demo.py",)
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
    items.sort(key=lambda item: 0 if item.nodeid.startswith(LONGEST_FIRST) else 1)
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
