"""The exceptions unipelt raises: one class per kind of bad input, each with one clear message."""
from __future__ import annotations


class UnipeltError(Exception):
    """Base class of every error unipelt raises on purpose."""


class SpecError(UnipeltError):
    """A spec that cannot be used: names the file, the field path and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        where = []
        if source:
            where.append(str(source))
        if path:
            where.append(path)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(UnipeltError):
    """A model the engine cannot adapt, or one that the spec does not fit."""


class AdapterFileError(UnipeltError):
    """A saved adapter that is corrupt, incomplete or made for another base model."""


class DataError(UnipeltError):
    """A data file that cannot be read: names the file and the line."""


class OutputError(UnipeltError, OSError):
    """An output path that cannot be written: under a file, an existing file or folder of another
    kind, a read-only or full disk. Names the path; nothing is half-written. An ``OSError`` too,
    so code that caught the disk error before still catches it."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginError(UnipeltError):
    """A plugin that does not honour the hook contract: names the plugin and the hook."""


class UnipeltWarning(UserWarning):
    """Something unipelt accepts but cannot vouch for (an adapter saved without checksums)."""
