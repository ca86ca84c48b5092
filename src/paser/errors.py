"""User-facing errors. The CLI prints these as one clear message, never a traceback."""

from __future__ import annotations


class PaserError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class InputError(PaserError):
    """Bad input data: names the file, line and field so the user can find it."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ModelError(PaserError):
    """A model cannot be loaded or two models do not fit together."""
