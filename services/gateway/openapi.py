"""The gateway's OpenAPI document as checked into ``docs/openapi.json`` (``umi openapi --out docs/openapi.json``).

Generated from the app, so routes, bodies and every declared status come from one place; a
test compares the checked-in file with the app's document and fails when they drift.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI

__all__ = ["OPENAPI_PATH", "REGENERATE_COMMAND", "openapi_document"]

#: Where the document is checked in, relative to the repository root.
OPENAPI_PATH = Path("docs") / "openapi.json"
REGENERATE_COMMAND = f".venv/bin/umi openapi --out {OPENAPI_PATH}"


def openapi_document(app: FastAPI) -> str:
    """``app``'s OpenAPI document as stable text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
