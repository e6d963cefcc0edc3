"""The runtime's imports go one way: each module imports only the layers below it."""

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
# Lowest first; a module may import only modules to its left.
LAYERS = ["config", "sequence", "sampling", "page_pool", "skip_pages", "scheduler", "expert_offload", "model_runner",
          "loop_runner", "skip_runner", "engine"]


def _imports(module: str) -> set[str]:
    """Absolute names of the modules `runtime/<module>.py` imports, wherever in the file."""
    names = set()
    for node in ast.walk(ast.parse((RUNTIME / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # relative: `from .x import y` or `from . import x`
            names.update(f"fxforge.runtime.{m}" for m in ([node.module] if node.module else [a.name for a in node.names]))
    return names


def test_every_runtime_module_has_a_layer():
    assert sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_lower_layers_and_the_ir(module):
    below = {f"fxforge.runtime.{m}" for m in LAYERS[: LAYERS.index(module)]}
    for name in _imports(module):
        if name.startswith("fxforge.runtime."):
            assert name in below, f"runtime/{module}.py imports {name}, which is not below it in {LAYERS}"
        elif name.startswith("fxforge"):
            assert name.startswith("fxforge.ir."), f"runtime/{module}.py imports {name}: the runtime sits below fxforge"


def test_config_is_a_leaf_without_torch():
    assert not {n for n in _imports("config") if n.split(".")[0] in ("torch", "numpy", "fxforge")}
