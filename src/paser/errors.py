"""User-facing errors. The CLI prints these as one clear message, never a traceback.

Four kinds, so that a caller can tell them apart: data (`InputError`: a record file, named
with line and field), options (`OptionError`: a command-line option or a YAML key), models
(`ModelError`: weights, tokenizer, two models that do not fit together) and files
(`FileError`: a path that cannot be read or written). All are `PaserError`s: exit status 2.
"""

from __future__ import annotations

import errno
import os


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


DataError = InputError  # the name the docs use for the data kind


class OptionError(InputError):
    """A bad option value. From a YAML file it names file, line and key (like `InputError`);
    from the command line or the Python API it names the option as `--flag`."""

    def __init__(self, option: str, message: str, path: str | None = None, line: int | None = None):
        self.option = option
        if path:
            super().__init__(path, message, line=line, field=option)
        else:
            PaserError.__init__(self, f"--{option.replace('_', '-')}: {message}")
            self.path, self.line, self.field, self.reason = "", None, option, message


class ModelError(PaserError):
    """A model cannot be loaded or two models do not fit together."""


class FileError(PaserError):
    """A file or directory that cannot be read or written (permissions, full disk, wrong kind)."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


# OSError numbers a user fixes (space, permissions, a wrong path), with what to say.
_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "is a directory where a file is meant",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


def user_os_error(e: OSError) -> FileError | None:
    """The `FileError` for an OSError a user can fix (full disk, read-only, permissions, a file
    where a directory is meant), else None (then it is treated as a bug)."""
    reason = _OS_REASONS.get(e.errno or -1)
    if reason is None:
        return None
    path = e.filename if e.filename is not None else "(unknown file)"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    return FileError(path, reason)


class ResultText(str):
    """A command's printed summary that also says how many of its stages failed (`failed`):
    the CLI prints it and exits non-zero when any did. A plain str to every other caller."""

    failed: int = 0

    def __new__(cls, text: str, failed: int = 0):
        obj = super().__new__(cls, text)
        obj.failed = int(failed)
        return obj
