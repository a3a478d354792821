"""The opaque cursor of ``GET /v1/tasks``: the ``(created_at, id)`` of the last task of a page.

It is URL-safe base64 of that pair as JSON; clients pass it back unchanged and must not
build one (the encoding may change). A cursor that does not decode is a ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "decode_cursor", "encode_cursor"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    """The cursor that continues after the task created at ``created_at`` with id ``task_id``."""
    raw = json.dumps([created_at.isoformat(), str(task_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` in ``cursor`` (``ValueError``, with a message for the client, if it is not one)."""
    try:
        created_at, task_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), uuid.UUID(task_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError("not a cursor from this API: pass next_cursor of the previous page unchanged") from exc
