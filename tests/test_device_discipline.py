"""What the device audit (``testing/device_audit.py``) cannot see, checked in the source: a
``torch.Generator`` without a device (a CPU stream cannot draw for CUDA tensors), a ``.cpu()``,
a literal CPU device (``torch.device("cpu")``, ``device="cpu"``, ``.to("cpu")``), which the
audit reads as the rank's device, and a ``"cpu"`` default in a signature (a caller that forgets
the device gets the host silently: how a micro-batch revert once hid). Each allowed use is listed
with why; a new one fails here until it is moved to the rank's device (``groups.device``) or added
with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "opsd_megatron"
SKIP = {"testing/device_audit.py", "platform/cpu_backend.py"}  # the harness and the CPU backend

ALLOWED = {
    # (file, kind): how many, and why
    ("models/random_init.py", "host generator"): (1, "weights drawn on the host, then placed"),
    ("models/peft_export.py", ".cpu()"): (1, "adapters gathered as objects to rank 0's file"),
    ("models/hf_io.py", ".cpu()"): (1, "safetensors writes host tensors"),
    ("models/teacher.py", "literal cpu"): (2, "teacher.offload: the frozen copy waits on the host"),
    ("platform/parallel.py", "literal cpu"): (1, "ParallelGroups' default before a device is set"),
}


def _is_cpu(node) -> bool:
    return isinstance(node, ast.Constant) and node.value == "cpu"


def _kinds(call: ast.Call):
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
    if name == "Generator" and not any(k.arg == "device" for k in call.keywords):
        if not call.args:
            yield "host generator"
    if name == "cpu" and isinstance(f, ast.Attribute) and not call.args:
        yield ".cpu()"
    if name == "device" and call.args and _is_cpu(call.args[0]):
        yield "literal cpu"
    if name == "to" and call.args and _is_cpu(call.args[0]):
        yield "literal cpu"
    if any(k.arg == "device" and _is_cpu(k.value) for k in call.keywords):
        yield "literal cpu"


def _default_kinds(fn: ast.FunctionDef | ast.AsyncFunctionDef):
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
    if any(_is_cpu(d) for d in defaults) and (positional or a.kwonlyargs):
        yield "cpu default"


def _found() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in SKIP:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            kinds = ()
            if isinstance(node, ast.Call):
                kinds = _kinds(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kinds = _default_kinds(node)
            for kind in kinds:
                found.setdefault((rel, kind), []).append(node.lineno)
    return found


def test_no_host_device_literals_beyond_the_listed_ones():
    found = _found()
    extra = {
        key: lines for key, lines in found.items() if len(lines) > ALLOWED.get(key, (0, ""))[0]
    }
    assert not extra, (
        "host-only objects where a CUDA rank needs its device (use groups.device), "
        f"or list them in ALLOWED with why: {extra}"
    )


def test_the_check_sees_each_kind():
    calls = [
        "torch.Generator()",
        "x.cpu()",
        'torch.device("cpu")',
        'x.to("cpu")',
        'torch.zeros(3, device="cpu")',
    ]
    kinds = [next(_kinds(ast.parse(c).body[0].value), None) for c in calls]
    assert kinds == ["host generator", ".cpu()", "literal cpu", "literal cpu", "literal cpu"]
    assert next(_kinds(ast.parse("torch.Generator(device=d)").body[0].value), None) is None
    for sig in ('def f(x, device="cpu"): pass', 'def f(x, *, device="cpu"): pass'):
        assert next(_default_kinds(ast.parse(sig).body[0]), None) == "cpu default"
    assert next(_default_kinds(ast.parse("def f(x, device): pass").body[0]), None) is None
