"""One guarded HTTP exchange, shared by the HTTP and /virtual backends.

Maps transport failures onto the library's errors (timeouts and connection errors are
transient, so the executor retries them), caps the body it reads, and classifies status
codes: 5xx and 429 are retried, other non-2xx replies (redirects included — they are never
followed) become error observations carrying the status code.

Usage::

    reply = send(client, "GET", url, params={"q": "x"}, timeout_s=10)
    raise_for_status(reply)
    reply.text
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from services.tools.errors import (
    BackendTimeout,
    BackendUnavailable,
    EgressRefused,
    HttpStatusError,
    InvalidArgumentsError,
    RetryableStatus,
)

__all__ = ["MAX_BODY_BYTES", "HttpReply", "raise_for_status", "send"]

#: Observations are cut at 1024 characters; no tool reply needs more than this read.
MAX_BODY_BYTES = 1 << 20
_ALLOWED_SCHEMES = frozenset({"http", "https"})


class HttpReply(BaseModel):
    """A reply's status, decoded body and the two headers the backends look at."""

    model_config = ConfigDict(frozen=True)

    status_code: int
    text: str
    location: str | None = None
    retry_after_s: float | None = None


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    timeout_s: float,
    params: dict[str, Any] | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> HttpReply:
    """Send one request and read at most ``max_body_bytes`` of the reply within ``timeout_s``."""
    request = _build(client, method, url, params=params, json_body=json_body, headers=headers, timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        response = client.send(request, stream=True, follow_redirects=False)
        try:
            body = _read_capped(response, max_body_bytes, deadline, timeout_s)
        finally:
            response.close()
    except httpx.TimeoutException as exc:
        raise BackendTimeout(f"{type(exc).__name__} after {timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from None
    return HttpReply(
        status_code=response.status_code,
        text=_decode(body, response),
        location=response.headers.get("location"),
        retry_after_s=_retry_after(response.headers.get("retry-after")),
    )


def raise_for_status(reply: HttpReply) -> None:
    """Raise the error a non-2xx reply stands for; return quietly for 2xx."""
    code = reply.status_code
    if 200 <= code < 300:
        return
    if code == 429 or code >= 500:
        raise RetryableStatus(code, response=reply.text, retry_after_s=reply.retry_after_s)
    if 300 <= code < 400:
        raise HttpStatusError(code, response=reply.text, detail=f"redirect to {reply.location!r} not followed")
    raise HttpStatusError(code, response=reply.text)


def _build(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    params: dict[str, Any] | None,
    json_body: Any,
    headers: dict[str, str] | None,
    timeout_s: float,
) -> httpx.Request:
    try:
        request = client.build_request(method, url, params=params, json=json_body, headers=headers, timeout=timeout_s)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidArgumentsError("request invalid, the request could not be built", detail=str(exc)) from None
    if request.url.scheme not in _ALLOWED_SCHEMES or not request.url.host:
        raise EgressRefused(f"only http(s) URLs with a host may be called, not {request.url.scheme}://{request.url.host}")
    return request


def _read_capped(response: httpx.Response, limit: int, deadline: float, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
        if time.monotonic() > deadline:
            raise BackendTimeout(f"body not read within {timeout_s:g}s")
    return b"".join(chunks)[:limit]


def _decode(body: bytes, response: httpx.Response) -> str:
    try:
        return body.decode(response.encoding or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # the HTTP-date form is ignored; exponential backoff applies
    return max(seconds, 0.0)
