"""fxforge: a compiler for LLM inference.

    model = fxforge.load("smollm2-135m")
    opt = fxforge.optimize(model, passes=[...], calib=texts)
    opt.save("out/dir")

Names are loaded on first use (PEP 562), so `import fxforge.kernels.bfp` loads no IR and
`import fxforge` alone stays cheap: it does not even import torch. It does register the torch.compile
backend "fxforge" with Dynamo, without importing Dynamo (~5 s): at once if Dynamo's backend registry is
loaded, else by a one-shot import hook the moment it loads (see _register_compile_backend).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

__version__ = "0.1.0"

_LAZY = {"Model": "fxforge.ir.model", "OptimizedModel": "fxforge.optimizer", "optimize": "fxforge.optimizer",
         "optimize_": "fxforge.optimizer", "FxforgeError": "fxforge.ir.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxforge' has no attribute {name!r}")


def load(source, **kwargs):
    """A Model from a name ("smollm2-135m", "llama-3-8b" with random_init=True, ...), a .gguf path,
    an HF checkpoint directory, an in-memory transformers model, or an fxforge artifact directory."""
    from fxforge.loading import load as _load

    return _load(source, **kwargs)


def Engine(model, **kwargs):
    """The continuous-batching engine (fxforge.runtime.engine.Engine) over a model, or over anything
    `load` accepts (an artifact directory, a model name, ...)."""
    from fxforge.runtime.engine import Engine as _Engine

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = load(str(model))
    return _Engine(model, **kwargs)


def _compile_backend(gm, example_inputs, **kwargs):
    """backend="fxforge" (fxforge.compile_backend.fxforge_backend, imported on first compile)."""
    from fxforge.compile_backend import fxforge_backend

    return fxforge_backend(gm, example_inputs, **kwargs)


_DYNAMO_REGISTRY = "torch._dynamo.backends.registry"


def _register_with(registry) -> None:
    # Once Dynamo has read the entry point (_BACKENDS holds it), Dynamo loads the backend itself, and a
    # second registration under the name would be refused as a duplicate.
    if "fxforge" not in registry._BACKENDS and "fxforge" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=_compile_backend, name="fxforge")


class _RegisterWhenDynamoLoads:
    """Meta-path finder that waits for Dynamo's backend registry module, lets the normal finders load
    it, then registers the backend with it, and removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != _DYNAMO_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                _register_with(module)

            spec.loader.exec_module = exec_and_register
        return spec


def _register_compile_backend() -> None:
    registry = sys.modules.get(_DYNAMO_REGISTRY)
    if registry is not None:
        _register_with(registry)
    elif not any(isinstance(f, _RegisterWhenDynamoLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenDynamoLoads())


_register_compile_backend()

__all__ = ["load", "optimize", "optimize_", "Engine", "Model", "OptimizedModel", "FxforgeError", "__version__"]
