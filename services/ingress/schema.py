"""The ingress envelope as a JSON Schema, for producers in any language.

``docs/ingress-envelope.schema.json`` is this output (``umi schema ingress``), generated
from :class:`~shared.schemas.IngressEnvelope`; a test fails when the file drifts.
"""

from __future__ import annotations

import json
from typing import Any

from shared.schemas import IngressEnvelope

__all__ = ["JSON_SCHEMA_DIALECT", "envelope_json_schema", "envelope_json_schema_text"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def envelope_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a message body on ``umi.ingress``."""
    return {"$schema": JSON_SCHEMA_DIALECT, **IngressEnvelope.model_json_schema()}


def envelope_json_schema_text() -> str:
    """:func:`envelope_json_schema` as the file ``docs/ingress-envelope.schema.json`` holds it."""
    return json.dumps(envelope_json_schema(), indent=2, ensure_ascii=False) + "\n"
