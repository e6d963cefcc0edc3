"""User-facing errors: one line naming the input that was wrong and what would be right.

The CLI prints `error: <message>` and exits with code 2 for any FxforgeError.
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
