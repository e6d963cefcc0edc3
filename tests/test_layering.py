"""Imports go one way: kernels <- ir <- passes and runtime <- fxforge (the public surface).

Checked on the source (every import statement, wherever it sits in a file) and, for the promise that
a kernel module stands alone, in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name prefix
PACKAGES = {"kernels": "fxforge.kernels", "ir": "fxforge.ir", "passes": "fxforge.passes", "runtime": "fxforge.runtime"}
# what each layer may import from fxforge (besides itself)
ALLOWED = {
    "kernels": (),
    "ir": ("fxforge.kernels",),
    "passes": ("fxforge.kernels", "fxforge.ir"),
    "runtime": ("fxforge.kernels", "fxforge.ir"),
}


def _fxforge_imports(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # relative imports stay inside the package
            names.add(package)
    return {n for n in names if n == "fxforge" or n.startswith("fxforge.")}


def _modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_each_layer_imports_only_the_layers_below(folder):
    own = PACKAGES[folder]
    for path in _modules(folder):
        for name in _fxforge_imports(path, own):
            ok = name.startswith(own) or any(name.startswith(p) for p in ALLOWED[folder])
            assert ok, f"{path.relative_to(ROOT)} imports {name}; {folder}/ may import {own} and {ALLOWED[folder]}"


def test_no_cycle_between_kernels_and_the_ir_ops():
    for path in _modules("kernels"):
        assert not any(n.startswith("fxforge.ir") for n in _fxforge_imports(path, "fxforge.kernels")), path


def test_a_kernel_module_loads_no_ir():
    code = ("import sys, fxforge.kernels.bfp, fxforge.kernels.paged_attention; "
            "print(sorted(m for m in sys.modules if m.startswith(('fxforge.ir', 'fxforge.passes', 'fxforge.runtime'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing kernels loaded {done.stdout.strip()}"


def test_errors_live_in_a_leaf_module():
    assert _fxforge_imports(ROOT / "ir" / "errors.py", "fxforge.ir") == set()
