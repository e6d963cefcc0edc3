"""fxforge: a compiler for LLM inference.

    model = fxforge.load("smollm2-135m")
    opt = fxforge.optimize(model, passes=[...], calib=texts)
    opt.save("out/dir")
"""

from fxforge.errors import FxforgeError
from fxforge.ir.model import Model
from fxforge.optimize import OptimizedModel, optimize

__version__ = "0.1.0"


def load(source, **kwargs) -> Model:
    """A Model from a name ("smollm2-135m", "llama-3-8b" with random_init=True, ...), a .gguf path,
    an HF checkpoint directory, an in-memory transformers model, or an fxforge artifact directory."""
    from fxforge.loading import load as _load

    return _load(source, **kwargs)


def Engine(model, **kwargs):
    """The continuous-batching engine (fxforge.runtime.engine.Engine) over a model or artifact."""
    from fxforge.runtime.engine import Engine as _Engine

    return _Engine(model, **kwargs)


__all__ = ["load", "optimize", "Engine", "Model", "OptimizedModel", "FxforgeError", "__version__"]
