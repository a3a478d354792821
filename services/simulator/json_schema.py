"""JSON-schema checks for the SGLang **simulator**'s ``json_schema`` constraint.

SGLang takes ``json_schema`` as a *string* (``"$$ANY$$"`` means any JSON). The
simulator checks that an answer is JSON and fits the schema's core keywords —
``type``, ``enum``, ``const``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``anyOf``/``oneOf``/``allOf``, string and
array length bounds, numeric bounds — and can build a minimal instance for
synthetic answers. Other keywords are accepted and ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["ANY_JSON", "JsonSchema", "JsonSchemaError"]

#: xgrammar's marker for "any JSON value".
ANY_JSON = "$$ANY$$"

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_MINIMAL = {"object": {}, "array": [], "string": "", "integer": 0, "number": 0, "boolean": False, "null": None}


class JsonSchemaError(ValueError):
    """The schema string is not a usable JSON schema (SGLang: ``Failed to compile json grammar: ...``)."""


class JsonSchema:
    """A parsed ``json_schema`` constraint."""

    def __init__(self, source: str) -> None:
        self.source = source
        if source == ANY_JSON:
            self.schema: dict[str, Any] | bool = True
            return
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as exc:
            raise JsonSchemaError(f"invalid JSON schema: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise JsonSchemaError("a JSON schema must be an object or a boolean")
        _check_schema(schema)
        self.schema = schema

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is one JSON value that fits the schema."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return _matches(value, self.schema)

    def example(self) -> str | None:
        """A minimal JSON text that fits the schema (None if none was found)."""
        value = _minimal(self.schema)
        text = json.dumps(value)
        return text if self.accepts(text) else None


def _check_schema(schema: Any) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise JsonSchemaError(f"schema must be an object, got {type(schema).__name__}")
    declared = schema.get("type")
    types = declared if isinstance(declared, list) else [declared] if declared is not None else []
    for name in types:
        if name not in _TYPE_CHECKS:
            raise JsonSchemaError(f"unsupported type {name!r}")
    for sub in (schema.get("properties") or {}).values():
        _check_schema(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            _check_schema(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            _check_schema(sub)


def _matches(value: Any, schema: dict[str, Any] | bool) -> bool:
    if isinstance(schema, bool):
        return schema
    checks = (_matches_type, _matches_enum, _matches_object, _matches_array, _matches_bounds, _matches_combinators)
    return all(check(value, schema) for check in checks)


def _matches_type(value: Any, schema: dict[str, Any]) -> bool:
    declared = schema.get("type")
    if declared is None:
        return True
    types = declared if isinstance(declared, list) else [declared]
    return any(_TYPE_CHECKS[name](value) for name in types)


def _matches_enum(value: Any, schema: dict[str, Any]) -> bool:
    if "const" in schema and value != schema["const"]:
        return False
    return "enum" not in schema or value in schema["enum"]


def _matches_object(value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(value, dict):
        return True
    properties = schema.get("properties") or {}
    if any(name not in value for name in schema.get("required") or []):
        return False
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        sub = properties.get(name, extra)
        if not _matches(item, sub):
            return False
    return True


def _matches_array(value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(value, list):
        return True
    items = schema.get("items", True)
    if isinstance(items, dict | bool) and not all(_matches(item, items) for item in value):
        return False
    return schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf)


def _matches_bounds(value: Any, schema: dict[str, Any]) -> bool:
    if isinstance(value, str):
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    return True


def _matches_combinators(value: Any, schema: dict[str, Any]) -> bool:
    if "allOf" in schema and not all(_matches(value, sub) for sub in schema["allOf"]):
        return False
    if "anyOf" in schema and not any(_matches(value, sub) for sub in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(_matches(value, sub) for sub in schema["oneOf"]) != 1:
        return False
    return "not" not in schema or not _matches(value, schema["not"])


def _minimal(schema: dict[str, Any] | bool) -> Any:
    if isinstance(schema, bool):
        return {}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _minimal(schema[key][0])
    declared = schema.get("type", "object")
    kind = declared[0] if isinstance(declared, list) else declared
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _minimal(properties.get(name, True)) for name in schema.get("required") or []}
    if kind == "array":
        return [_minimal(schema.get("items", True)) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        return max(0, schema.get("minimum", 0))
    return _MINIMAL[kind]
