"""The exceptions unipelt raises: one class per kind of bad input, each with one clear message.

The command line exits with the code of the first class in :data:`EXIT_CODES` that the error is
an instance of (the README's table lists them): 2 spec, 3 model, 4 adapter file, 5 data,
6 plugin, 7 output path, 1 any other unipelt error.
"""
from __future__ import annotations

import reprlib
from typing import Any

# A message quotes at most this much of a value the user wrote: a YAML alias bomb expands a few
# hundred bytes into gigabytes, and a message that printed the whole value would write them all
# to stderr (issue 14). Errors are one line to read, not a dump.
EXCERPT_CHARS = 80
MAX_MESSAGE_CHARS = 4000
MAX_PATH_CHARS = 200

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = 6
_repr.maxstring = EXCERPT_CHARS
_repr.maxother = EXCERPT_CHARS
_repr.maxlong = 40


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters without ever building the whole repr.

    reprlib stops at a few items per level and three levels deep, so a value that refers to the
    same list a million times costs as little as a short one. Integers too long to print (Python
    refuses ``repr`` beyond 4,300 digits) are described by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = _repr.repr(value)
    except (ValueError, RecursionError):  # a nested huge integer, or a pathological __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 30] + f"... [{len(text) - limit + 30:,} characters cut]"


class UnipeltError(Exception):
    """Base class of every error unipelt raises on purpose."""


class SpecError(UnipeltError):
    """A spec that cannot be used: names the file, the field path and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        # last guard: every message quotes values through excerpt(), but a path is made of the
        # user's keys and a plugin's message may quote anything
        path = _cut(path, MAX_PATH_CHARS) if path else path
        message = _cut(message, MAX_MESSAGE_CHARS)
        self.message = message  # without the file and field prefix (for a caller that adds to it)
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


# most specific first: OutputError before the UnipeltError catch-all
EXIT_CODES: tuple[tuple[type[UnipeltError], int], ...] = (
    (SpecError, 2), (ModelError, 3), (AdapterFileError, 4), (DataError, 5), (PluginError, 6), (OutputError, 7),
    (UnipeltError, 1),
)


def exit_code(error: UnipeltError) -> int:
    """The command line's exit code for ``error``."""
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))
