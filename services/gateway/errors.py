"""How the gateway answers what it cannot accept: always JSON, never a 500 for bad input.

:func:`install_error_handling` is called once by :func:`services.gateway.app.create_app`:

* ``422`` (``RequestValidationError``): FastAPI's ``{"detail": [{"type", "loc", "msg", ...}]}``,
  but built so that encoding it cannot fail: what the client sent is echoed only as a short,
  valid string (lone surrogates replaced, NaN spelled out, containers left out), and a
  bounded number of items (:func:`shared.schemas.safe_validation_errors`). FastAPI's own handler answered ``500`` to ``"\\ud800"`` and NaN.
* a body that is not ``application/json``: a ``422`` saying so (FastAPI said "Input should be a valid dictionary").
* a body FastAPI could not decode (not UTF-8, nested beyond the parser's recursion limit, an integer
  of thousands of digits) is a
  ``422 json_invalid`` like malformed JSON, instead of FastAPI's ``400``.
* ``413`` (body over ``UMI_MAX_BODY_BYTES``, raised by FastAPI's ``max_body_size`` limiter while
  it streams the body) says the limit.
* the database unreachable (a connection refused, dropped or timed out): ``503`` with
  ``Retry-After``, so clients and the Python client retry instead of treating it as a bug.
* anything unexpected: logged with its traceback, answered ``500 {"detail": "internal error"}``
  with nothing of the request or the error in it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.schemas import bounded_text, safe_validation_errors

__all__ = ["install_error_handling"]

logger = logging.getLogger(__name__)


def install_error_handling(app: FastAPI) -> None:
    """Install the gateway's exception handlers on ``app`` (see the module docstring)."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(InterfaceError, _database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = safe_validation_errors(exc.errors())
    content_type = request.headers.get("content-type")
    if any(item["loc"] == ["body"] for item in items) and not _is_json(content_type):
        # FastAPI hands a non-JSON body to the model as bytes ("Input should be a valid dictionary"); say why.
        sent = f"not {bounded_text(content_type)!r}" if content_type else "none was sent"
        return _unprocessable([{"type": "content_type", "loc": ["body"], "msg": f"Content-Type must be application/json ({sent})"}])
    return _unprocessable(items)


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of ``content_type`` as JSON (``application/json`` or ``application/*+json``)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _undecodable_reason(cause: BaseException | None) -> str | None:
    """Why FastAPI could not decode a body it answers ``400`` for (it raises that from the parser's error)."""
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the body is nested too deeply to parse"
    if isinstance(cause, ValueError):  # e.g. an integer of more than 4,300 digits
        return bounded_text(cause)
    return None


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail: Any = exc.detail
    if exc.status_code == status.HTTP_400_BAD_REQUEST and (reason := _undecodable_reason(exc.__cause__)):
        return _unprocessable([{"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {reason}"}])
    if exc.status_code == status.HTTP_413_CONTENT_TOO_LARGE:
        limit = request.app.state.settings.max_body_bytes
        detail = f"the request body is larger than {limit} bytes (UMI_MAX_BODY_BYTES); it was not read"
    elif not isinstance(detail, str):
        detail = safe_validation_errors(detail) if isinstance(detail, list) else bounded_text(detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _database_unavailable(request: Request, exc: OperationalError | InterfaceError) -> JSONResponse:
    # The driver's message may name hosts; the log keeps it, the client gets the kind only.
    logger.warning("database unavailable answering %s %s: %s", request.method, request.url.path, exc.orig or exc)
    return JSONResponse(
        {"detail": "the database is unavailable; retry later"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, where operators look; the client learns nothing of the internals.
    logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)
