"""Errors, in a leaf module every layer may import (kernels excepted: they raise ValueError).

FxforgeError is bad input from the user: one line naming the input that was wrong and what would be
right; the CLI prints `error: <message>` and exits with code 2. fxforge.errors re-exports these.
"""


class FxforgeError(ValueError):
    """Bad input from the user (model name, file, pass config, output path, ...)."""


class UnknownModelError(FxforgeError):
    pass


class CorruptModelFileError(FxforgeError):
    pass


class UnsupportedArchitectureError(FxforgeError):
    pass


class PassConfigError(FxforgeError):
    pass


class OutputPathError(FxforgeError):
    pass


class PipelineError(RuntimeError):
    """A pass (or the IR check after it) failed: not bad input but a fault, named with its position."""
