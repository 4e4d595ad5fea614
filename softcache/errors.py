"""Errors that the CLI turns into one line on stderr and an exit code.

Exit codes are part of the contract scripts rely on: 1 means the data or the cache is bad,
2 means the command was used wrongly (including refusing to clobber existing output).
"""

from __future__ import annotations


class SoftcacheError(Exception):
    """Base class: anything raised as this is reported without a traceback."""

    exit_code: int = 1


class CacheError(SoftcacheError):
    """The cache, the data or the teacher output is bad or does not match."""

    exit_code = 1


class UsageError(SoftcacheError):
    """The request itself is wrong: bad arguments, missing paths, output already present."""

    exit_code = 2


def first_validation_error(exc: Exception, default_where: str) -> str:
    """One line from a pydantic ValidationError: where the first problem is, what it is, and
    how many there are, so a bad manifest or config file reads as a single error line."""
    errors = exc.errors()  # type: ignore[attr-defined]
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or default_where
    return f"{where}: {first['msg']} ({len(errors)} error(s))"
