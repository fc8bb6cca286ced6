"""The package's shape: imports run downward, and files and functions stay small.

The layers, low to high (docs/architecture.md explains each):

    0  errors, io.atomic            typed errors, atomic writes
    1  methods                      compressed twins (no graph knowledge)
    2  graph                        capture → normalize → select → calibrate → duplicate → vanish
    3  sources, data, schedules     model sources, data readers, β curves
    4  io                           the artifact folder (recipe.json + model.safetensors)
    5  bench                        onnxruntime timing (no torch in its worker)
    6  training, export, integrations
    7  demo
    8  cli, __main__, the package's own __init__

A module may import its own layer or lower ones, never a higher one; lazy imports inside
functions count too, since they are the usual way to hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vcon_fx"

LAYERS = {
    "vcon_fx.errors": 0, "vcon_fx.io.atomic": 0,
    "vcon_fx.methods": 1,
    "vcon_fx.graph": 2,
    "vcon_fx.sources": 3, "vcon_fx.data": 3, "vcon_fx.schedules": 3,
    "vcon_fx.io": 4,
    "vcon_fx.bench": 5,
    "vcon_fx.training": 6, "vcon_fx.export": 6, "vcon_fx.integrations": 6,
    "vcon_fx.demo": 7,
    "vcon_fx.cli": 8, "vcon_fx.__main__": 8, "vcon_fx": 8,
}
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60  # body lines, docstring excluded
# A file or function may be longer when a comment says why: "# long module: …" in its first
# lines, "# long function: …" in the function's first lines.
LONG_MODULE, LONG_FUNCTION = "# long module:", "# long function:"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS prefix that names `module` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def imported_modules(name: str, path: Path) -> set[str]:
    """Every vcon_fx module `path` imports, at top level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vcon_fx"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vcon_fx"):
                continue
            # `from . import x` may name a submodule: count the submodule when it is one
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs or [target])
    return found


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_downward(name):
    own = layer_of(name)
    upward = sorted(m for m in imported_modules(name, MODULES[name]) if layer_of(m) > own)
    assert not upward, (f"{name} (layer {own}) imports {upward} from a higher layer: move the shared code down "
                        "(see docs/architecture.md)")


def test_every_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in MODULES)


def test_layer_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "methods_fake.py"
    fake.write_text("def f():\n    from ..cli.main import main\n    return main\n")
    assert any(layer_of(m) > layer_of("vcon_fx.methods") for m in imported_modules("vcon_fx.methods.fake", fake))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    path = MODULES[name]
    text = path.read_text()
    lines = text.splitlines()
    if len(lines) > MAX_MODULE_LINES:
        assert any(LONG_MODULE in line for line in lines[:40]), (
            f"{path.relative_to(PACKAGE.parent)} has {len(lines)} lines (> {MAX_MODULE_LINES}): split it by idea, "
            f"or say why in a '{LONG_MODULE}' comment")
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body[1:] if ast.get_docstring(node) else node.body
        if not body:
            continue
        length = node.end_lineno - body[0].lineno + 1
        head = lines[node.lineno - 1: body[0].lineno + 2]
        if length > MAX_FUNCTION_LINES and not any(LONG_FUNCTION in line for line in head):
            pytest.fail(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} has {length} body lines "
                        f"(> {MAX_FUNCTION_LINES}): split it, or say why in a '{LONG_FUNCTION}' comment")
