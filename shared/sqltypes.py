"""Column types that store any Python string, on SQLite and PostgreSQL alike.

PostgreSQL text cannot hold the NUL character (U+0000): psycopg refuses the whole
statement. A model output, a tool observation or error, or a user's query may carry
one, so every free-text column stores NUL as U+FFFD (the Unicode replacement
character, ``�``) — on every backend, so a trajectory reads the same wherever it
was stored. The same replacement applies to values compared in queries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["NUL", "NUL_REPLACEMENT", "SafeString", "SafeText", "without_nul"]

NUL = "\x00"
NUL_REPLACEMENT = "\ufffd"


def without_nul(value: str) -> str:
    """``value`` with every NUL character replaced by U+FFFD."""
    return value.replace(NUL, NUL_REPLACEMENT) if NUL in value else value


class _NulAsReplacement:
    """Bind parameters with NUL replaced (mixed into the types below)."""

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return without_nul(value) if isinstance(value, str) else value


class SafeText(_NulAsReplacement, TypeDecorator[str]):
    """``TEXT`` that stores NUL characters as U+FFFD."""

    impl = Text
    cache_ok = True  # SQLAlchemy reads it from each class itself


class SafeString(_NulAsReplacement, TypeDecorator[str]):
    """``VARCHAR(n)`` that stores NUL characters as U+FFFD (names a model wrote, e.g. a tool name)."""

    impl = String
    cache_ok = True
