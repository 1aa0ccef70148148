"""Every command shown in the README's and docs/*.md's code blocks and in the tools' ``Example:``
epilogues at least
parses with the paths it names: recipes and scripts exist, overrides load and the layout validates,
``opsd-*`` commands get through ``--dry-run`` (or stop only on a model/data path that exists on a
cluster, not here), tools answer ``--help``, SLURM scripts pass ``bash -n``."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from opsd_megatron.config import load_config, validate_layout
from opsd_megatron.models.from_config import arch_of

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = re.compile(
    r"\s\[(?:--|key=|DIR)[^\]]*\]"
)  # "[--gpu-gib 80]", "[key=value ...]": placeholders


def _blocks(text: str) -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        cmds += [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return cmds


def _examples() -> list[str]:
    cmds = []
    for tool in sorted((ROOT / "tools").glob("*.py")):
        doc = tool.read_text().split('"""')[1]
        if "Example:" in doc:
            cmds += [
                c
                for c in doc.split("Example:")[1]
                .replace("\\\\\n", " ")
                .replace("\\\n", " ")
                .splitlines()
                if c.strip()
            ]
    return cmds


COMMANDS = [
    re.sub(r"\s+#.*$", "", OPTIONAL.sub("", c)).strip()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for c in _blocks(page.read_text())
] + [re.sub(r"\s+#.*$", "", OPTIONAL.sub("", c)).strip() for c in _examples()]
ENVIRONMENT = (
    "model.megatron_dir=",
    "model.hf_dir=",
    "model.tokenizer=",
    "data.source=",
    "--checkpoint",
)


def _recipe_and_overrides(argv: list[str]) -> tuple[str, list[str], list[str]]:
    recipe = next(a for a in argv if a.endswith(".yaml"))
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    flags = [a for a in argv if a not in overrides and a != recipe]
    return recipe, overrides, flags


def _opsd(prog: str, argv: list[str], capsys) -> None:
    from opsd_megatron.eval.cli import main as eval_main
    from opsd_megatron.plan_cli import main as plan_main
    from opsd_megatron.train.cli import main as train_main

    recipe, overrides, flags = _recipe_and_overrides(argv)
    assert (ROOT / recipe).is_file(), recipe
    cfg = load_config(ROOT / recipe, overrides)
    validate_layout(cfg, arch=arch_of(cfg.model))
    if prog == "opsd-plan":
        assert plan_main([str(ROOT / recipe), *overrides, *flags]) == 0
        return
    main = train_main if prog == "opsd-train" else eval_main
    code = main([str(ROOT / recipe), *overrides, *flags, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and any(k in err for k in ENVIRONMENT)), err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[:60])
def test_documented_command_parses(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = shlex.split(command)
    env = {}
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # PYTHONPATH=. python ...: the environment
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    if (
        "venv" in argv
    ):  # the two fresh-machine commands: CI runs the second, the demo test the first
        assert ".venv/bin/" in command
        return
    prog = argv[0]
    if prog == "torchrun":
        prog, argv = "opsd-train", argv[argv.index("-m") + 2 :]
    elif prog.startswith("opsd-"):
        argv = argv[1:]
    if prog == "opsd-demo":
        from opsd_megatron.demo import load_demo

        while argv and argv[0] in ("--seeds", "--jobs"):  # opsd-demo's own options: N >= 1
            assert int(argv[1]) >= 1, command
            argv = argv[2:]
        load_demo(str(ROOT / (argv[0] if argv else "recipes/demo_cpu.yaml")), argv[1:])
    elif prog.startswith("opsd-"):
        _opsd(prog, argv, capsys)
    elif prog == "sbatch":
        at = next(i for i, a in enumerate(argv) if a.endswith(".slurm"))  # sbatch options first
        script = ROOT / argv[at]
        assert script.is_file() and subprocess.run(["bash", "-n", str(script)]).returncode == 0
        overrides = [a for a in argv[at + 1 :] if "=" in a]
        if overrides or "RECIPE" in env:  # overrides go to the script's (or RECIPE's) recipe
            recipe = env.get("RECIPE") or re.search(r"RECIPE:-([^}]+)}", script.read_text())[1]
            cfg = load_config(ROOT / recipe, overrides)
            validate_layout(cfg, arch=arch_of(cfg.model))
    elif prog in ("python", "python3"):
        tool = ROOT / argv[1]
        assert tool.is_file(), tool
        res = subprocess.run(
            [sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr[-2000:]
        for flag in (a for a in argv[2:] if a.startswith("--")):
            assert flag in res.stdout, f"{tool.name} has no {flag}"
    elif argv[:3] == [".venv/bin/python", "-m", "pytest"]:  # the fast tier: a real marker over
        from tests.conftest import SLOW  # files that exist (the list cannot go stale silently)

        assert "slow:" in (ROOT / "pyproject.toml").read_text() and "-m" in argv
        assert all((ROOT / path).exists() for path in SLOW), [
            p for p in SLOW if not (ROOT / p).exists()
        ]
    elif prog == "pip":  # extra packages the README names: pinned, so the command is reproducible
        assert argv[1] == "install" and all("==" in a for a in argv[2:] if not a.startswith("-"))
    else:
        pytest.fail(f"a README command this test does not know how to check: {command}")
