"""How the gateway answers what it cannot accept: always JSON, never a 500 for bad input.

:func:`install_error_handling` is called once by :func:`services.gateway.app.create_app`:

* ``422`` (``RequestValidationError``): FastAPI's ``{"detail": [{"type", "loc", "msg", ...}]}``,
  but built so that encoding it cannot fail: what the client sent is echoed only as a short,
  valid string (lone surrogates replaced, NaN spelled out, containers left out), and at
  most :data:`MAX_ERRORS` items. FastAPI's own handler answered ``500`` to ``"\\ud800"`` and NaN.
* a body FastAPI could not decode (not UTF-8, nested beyond the parser's recursion limit) is a
  ``422 json_invalid`` like malformed JSON, instead of FastAPI's ``400``.
* ``413`` (body over ``UMI_MAX_BODY_BYTES``, raised by FastAPI's ``max_body_size`` limiter while
  it streams the body) says the limit.
* anything unexpected: logged with its traceback, answered ``500 {"detail": "internal error"}``
  with nothing of the request or the error in it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["MAX_ECHO_CHARS", "MAX_ERRORS", "install_error_handling", "safe_validation_errors"]

logger = logging.getLogger(__name__)

#: Longest piece of client input echoed back in an error (the rest is cut, marked with "…").
MAX_ECHO_CHARS = 200
#: Most error items in one ``422``; a body with thousands of bad values gets the first ones.
MAX_ERRORS = 50


def install_error_handling(app: FastAPI) -> None:
    """Install the gateway's exception handlers on ``app`` (see the module docstring)."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def safe_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``errors`` (pydantic/FastAPI error dicts) as JSON-safe, bounded items: ``type``, ``loc``, ``msg``, and
    ``input``/``ctx`` when they are short scalars."""
    items: list[dict[str, Any]] = []
    for error in list(errors)[:MAX_ERRORS]:
        error = error if isinstance(error, Mapping) else {"msg": str(error)}
        item: dict[str, Any] = {
            "type": _text(error.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else _text(part) for part in error.get("loc", ())],
            "msg": _text(error.get("msg", "")),
        }
        if (echo := _scalar(error.get("input"))) is not None:
            item["input"] = echo
        if isinstance(context := error.get("ctx"), Mapping):
            item["ctx"] = {_text(key): _scalar(value) if _scalar(value) is not None else _text(value) for key, value in context.items()}
        items.append(item)
    return items


def _text(value: object) -> str:
    """``value`` as a valid UTF-8 string of at most :data:`MAX_ECHO_CHARS` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + "…"
    # Lone surrogates cannot be encoded; NUL is valid JSON (\u0000) and stays visible as such.
    return text.encode("utf-8", "replace").decode("utf-8")


def _scalar(value: object) -> str | int | float | bool | None:
    """A short scalar as it can be echoed in JSON (non-finite floats spelled out); None for anything else."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value)
    return None


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _unprocessable(safe_validation_errors(exc.errors()))


#: Why FastAPI could not decode a body it answers ``400`` for (it raises that with the cause attached).
_UNDECODABLE = {
    UnicodeDecodeError: "the body is not valid UTF-8",
    RecursionError: "the body is nested too deeply to parse",
}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail: Any = exc.detail
    if exc.status_code == status.HTTP_400_BAD_REQUEST:
        for cause, reason in _UNDECODABLE.items():
            if isinstance(exc.__cause__, cause):
                return _unprocessable([{"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {reason}"}])
    if exc.status_code == status.HTTP_413_CONTENT_TOO_LARGE:
        limit = request.app.state.settings.max_body_bytes
        detail = f"the request body is larger than {limit} bytes (UMI_MAX_BODY_BYTES); it was not read"
    elif not isinstance(detail, str):
        detail = safe_validation_errors(detail) if isinstance(detail, list) else _text(detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, where operators look; the client learns nothing of the internals.
    logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)
