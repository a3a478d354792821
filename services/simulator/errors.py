"""SGLang's error types and body shapes, as the SGLang **simulator** reproduces them.

Real SGLang answers errors differently depending on the layer that raises them
(github.com/sgl-project/sglang, ``python/sglang/srt/entrypoints/http_server.py``):

* body fails FastAPI/pydantic parsing: 400
  ``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``;
* contract violation: 400 ``{"error": "<text>"}``;
* ``ValueError`` in tokenize/verify, or a scheduler abort with status 400: 400 ``{"error": {"message": "<text>"}}``;
* scheduler abort with another status, e.g. a full queue: 503
  ``{"object": "error", "message", "type": "503", "param": null, "code": 503}``;
* missing or wrong API key: 401 ``{"error": "Unauthorized"}``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

__all__ = [
    "RequestValueError",
    "SchedulerAbort",
    "SimulatorHTTPError",
    "bad_request_body",
    "contract_error_body",
    "http_exception_body",
    "openai_error_body",
    "value_error_body",
]


class SimulatorHTTPError(Exception):
    """An error answered before any generation, with a fixed status and JSON body."""

    def __init__(self, status_code: int, body: Any) -> None:
        super().__init__(str(body))
        self.status_code = status_code
        self.body = body


class RequestValueError(ValueError):
    """SGLang's ``ValueError`` layer (validation): 400 ``{"error": {"message"}}``, in-band when streaming."""


class SchedulerAbort(Exception):
    """A request the (simulated) scheduler aborts: grammar failures (400), a full queue (503)."""

    def __init__(self, message: str, status_code: int = HTTPStatus.BAD_REQUEST, err_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = int(status_code)
        self.err_type = err_type if err_type is not None else ("BadRequestError" if status_code == 400 else None)

    def finish_reason(self) -> dict[str, Any]:
        """The ``finish_reason`` a streamed abort chunk carries."""
        return {"type": "abort", "message": self.message, "status_code": self.status_code, "err_type": self.err_type}

    def http_error(self) -> SimulatorHTTPError:
        """The non-streaming answer: 400 as a ValueError body, other statuses as an HTTPException body."""
        if self.status_code == HTTPStatus.BAD_REQUEST:
            return SimulatorHTTPError(self.status_code, value_error_body(self.message))
        return SimulatorHTTPError(self.status_code, http_exception_body(self.status_code, self.message))


def bad_request_body(message: str) -> dict[str, Any]:
    """FastAPI request-validation failure, which SGLang turns into 400 (not 422)."""
    return {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}


def contract_error_body(text: str) -> dict[str, Any]:
    """The generated request contract's rejection (a plain string)."""
    return {"error": text}


def value_error_body(message: str) -> dict[str, Any]:
    """A ``ValueError`` raised while tokenizing or verifying a request."""
    return {"error": {"message": message}}


def http_exception_body(status_code: int, message: str) -> dict[str, Any]:
    """An ``HTTPException`` through SGLang's handler (``type`` is the status as a string)."""
    return {"object": "error", "message": message, "type": str(status_code), "param": None, "code": status_code}


def openai_error_body(message: str, err_type: str = "BadRequestError", status_code: int = 400) -> dict[str, Any]:
    """An error from the OpenAI-compatible routes."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status_code}
