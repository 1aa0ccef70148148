"""The package DAG of docs/architecture.md, checked on every import in the library (function-level
ones included): a module imports only from its own package or from a lower layer, and only
``platform/`` asks megatron's ``parallel_state`` for process groups."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "opsd_megatron"

# bottom to top; a module is placed by its most specific entry
LAYERS = [
    {"errors"},
    {"config"},  # typed config and the one Layout type: every package may import it
    {"platform", "losses"},
    {"data", "testing"},
    {"models"},
    {"rollout", "planner"},
    {"algorithms", "plan_config", "preflight"},
    {"eval"},
    {"train"},
    {"train.cli", "eval.cli", "plan_cli"},  # the command lines
    {"demo_report"},  # the demonstration's curves, tables and plots (reads run outputs)
    {"demo"},  # runs opsd-train once per stage
]


def _layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for n in (2, 1):
        key = ".".join(parts[:n])
        for i, layer in enumerate(LAYERS):
            if key in layer:
                return i
    if parts == ["__init__"]:
        return len(LAYERS)
    raise AssertionError(f"{module}: not placed in any layer of tests/test_architecture.py")


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(), str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _violations(root: Path = ROOT):
    bad = []
    for name, path, tree in _modules(root):
        mine, package = _layer(name), name.split(".")[1] if "." in name else ""
        for line, target, names in _imports(tree):
            where = f"{path.relative_to(root.parent)}:{line}"
            if (
                target.startswith("megatron.core")
                and "parallel_state" in target + " ".join(names)
                and package != "platform"
            ):
                bad.append(f"{where}: parallel_state outside platform/ (use ParallelGroups)")
            if not target.startswith("opsd_megatron.") or target == "opsd_megatron":
                continue
            theirs = _layer(target)
            same_package = target.split(".")[1] == package
            if theirs > mine or (theirs == mine and not same_package):
                bad.append(f"{where}: {name} (layer {mine}) imports {target} (layer {theirs})")
    return bad


def test_imports_follow_the_package_dag():
    bad = _violations()
    assert not bad, "imports against the DAG:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an algorithms module importing the trainer is reported."""
    fake = tmp_path / "opsd_megatron"
    (fake / "algorithms").mkdir(parents=True)
    (fake / "algorithms" / "bad.py").write_text(
        "def f():\n    from opsd_megatron.train.step import train_step\n"
    )
    (fake / "models").mkdir()
    (fake / "models" / "ps.py").write_text("from megatron.core import parallel_state as ps\n")
    bad = _violations(fake)
    assert any("algorithms/bad.py:2" in b and "train.step" in b for b in bad), bad
    assert any("models/ps.py:1" in b and "parallel_state" in b for b in bad), bad
