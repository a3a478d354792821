"""The error responses each kind of route can give, declared once for the OpenAPI document.

Every route lists what it can answer besides its success (``responses=`` on the route);
``docs/openapi.json`` is generated from the app and a test fails when it drifts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["AUTHENTICATED", "BODY", "ErrorMessage", "NOT_FOUND", "UNAVAILABLE", "CONFLICT"]


class ErrorMessage(BaseModel):
    """The body of every error the gateway answers except ``422``: ``{"detail": "<what is wrong>"}``."""

    detail: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


#: Routes that need a tenant (every one reads the database): no valid key, over the tenant's limits,
#: or the database unreachable.
AUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: _error("No valid API key (`Authorization: Bearer <key>`)."),
    429: _error("Over the tenant's request rate or tasks in flight; retry after `Retry-After` seconds."),
    503: _error("The database is unreachable; retry after `Retry-After` seconds."),
}
#: Routes that read a task by id: unknown, or another tenant's.
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _error("No such task for this tenant.")}
#: Routes that take a JSON body.
BODY: dict[int | str, dict[str, Any]] = {
    413: {
        **_error(
            "The body is larger than `UMI_MAX_BODY_BYTES`; it was not read. JSON when the limit is reached while "
            "the body streams in; the plain text `Content Too Large` when `Content-Length` announces it."
        ),
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
#: An idempotency key used before for another request.
CONFLICT: dict[int | str, dict[str, Any]] = {409: _error("The `Idempotency-Key` was used for a different request.")}
#: The database or broker cannot be reached.
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: _error("A dependency (database or broker) is unreachable.")}
