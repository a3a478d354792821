"""The client's exceptions: every failure of a call is a :class:`UmiError`.

::

    UmiError
    ├── UmiHTTPError(status, detail)      the gateway answered with an error status
    │   ├── InvalidRequest                400, 413, 422: the request is wrong; fix it
    │   ├── Unauthorized                  401: no valid API key
    │   ├── NotFound                      404: no such task for this tenant
    │   ├── Conflict                      409: the idempotency key was used for another request
    │   ├── RateLimited(retry_after_s)    429: over the tenant's limits
    │   └── ServiceUnavailable            503: the gateway's database or broker is unreachable
    ├── UmiTimeout                        no answer in time (the HTTP timeouts, or ``wait(timeout=...)``)
    ├── UmiConnectionError                the gateway could not be reached, or a stream kept dropping
    └── UmiProtocolError                  the gateway's answer is not what the API promises (another version?)
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "UmiConnectionError",
    "UmiError",
    "UmiHTTPError",
    "UmiProtocolError",
    "UmiTimeout",
]


class UmiError(Exception):
    """Any failure of a :class:`~umi_client.UmiClient` call."""


class UmiHTTPError(UmiError):
    """The gateway answered ``status``; ``detail`` is what it said was wrong."""

    def __init__(self, status: int, detail: object, *, retry_after_s: float | None = None) -> None:
        self.status = status
        self.detail = detail
        #: The ``Retry-After`` the gateway sent, in seconds, if any.
        self.retry_after_s = retry_after_s
        super().__init__(f"HTTP {status}: {detail}")


class InvalidRequest(UmiHTTPError):
    """``400``/``413``/``422``: the request is malformed, too large, or names a bad field (see ``detail``)."""


class Unauthorized(UmiHTTPError):
    """``401``: no API key, or an unknown or revoked one."""


class NotFound(UmiHTTPError):
    """``404``: no such task for this tenant (another tenant's task looks the same)."""


class Conflict(UmiHTTPError):
    """``409``: the idempotency key was used before for a different request."""


class RateLimited(UmiHTTPError):
    """``429``: over the tenant's request rate or tasks in flight; retry after ``retry_after_s``."""


class ServiceUnavailable(UmiHTTPError):
    """``503``: the gateway cannot reach its database or broker."""


class UmiTimeout(UmiError):
    """No answer within the timeout (connect, read, write, pool, or the ``wait`` deadline)."""


class UmiConnectionError(UmiError):
    """The gateway could not be reached, or an event stream dropped again and again without progress."""


class UmiProtocolError(UmiError):
    """The gateway answered something the API does not promise (a client and gateway of different versions?)."""
