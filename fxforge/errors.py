"""User-facing errors (defined in the leaf module fxforge.ir.errors, which every layer may import).

The CLI prints `error: <message>` and exits with code 2 for any FxforgeError.
"""

from fxforge.ir.errors import (CorruptModelFileError, FxforgeError, OutputPathError, PassConfigError, PipelineError,
                               UnknownModelError, UnsupportedArchitectureError)

__all__ = ["FxforgeError", "UnknownModelError", "CorruptModelFileError", "UnsupportedArchitectureError",
           "PassConfigError", "OutputPathError", "PipelineError"]
