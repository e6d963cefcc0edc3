"""fxforge: a compiler for LLM inference.

    model = fxforge.load("smollm2-135m")
    opt = fxforge.optimize(model, passes=[...], calib=texts)
    opt.save("out/dir")

Names are loaded on first use (PEP 562), so `import fxforge.kernels.bfp` loads no IR and
`import fxforge` alone stays cheap.
"""

from __future__ import annotations

import importlib

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


__all__ = ["load", "optimize", "optimize_", "Engine", "Model", "OptimizedModel", "FxforgeError", "__version__"]
