"""Errors of the tool execution library, and the ToolBench error observation they turn into.

A failed tool call never stops the agent: the executor turns every :class:`ToolCallError`
into a ToolBench-style error observation, ``json.dumps({"error": ..., "response": ...})``,
which the planner reads like any other observation. Set-up problems (a bad catalog or
mirror file) are :class:`ToolSetupError` and surface when the executor is built.

::

    ToolError                          base of everything raised by services.tools
    ├── ToolSetupError                 bad mirror file / catalog / registry use (build time)
    └── ToolCallError                  one call failed; carries its error observation
        ├── CallRejected               the call never reached a backend
        │   ├── UnknownToolError       action is not one of the task's tool Names
        │   ├── ToolInputError         Action Input is not a JSON object
        │   └── NoBackendError         no configured backend serves the tool
        └── BackendError               a backend could not produce an answer
            ├── TransientBackendError  retried with exponential backoff
            │   ├── BackendTimeout     the call ran past its timeout
            │   ├── BackendUnavailable connection refused / reset / protocol error
            │   └── RetryableStatus    HTTP 5xx or 429
            └── PermanentBackendError  not retried
                ├── HttpStatusError    any other non-2xx (redirects are not followed)
                ├── BadResponseError   a reply the protocol does not allow
                ├── EgressRefused      the network guard refused the destination
                ├── InvalidArgumentsError  missing / unexpected parameters
                ├── MirrorMissError    no recording matches (mirror backend)
                ├── ToolFunctionError  a registered Python function raised or hung
                └── ApiReportedError   a /virtual server answered with an error
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "ApiReportedError",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BadResponseError",
    "CallRejected",
    "EgressRefused",
    "HttpStatusError",
    "InvalidArgumentsError",
    "MirrorMissError",
    "NoBackendError",
    "PermanentBackendError",
    "RetryableStatus",
    "TIMEOUT_MESSAGE",
    "TOOL_INPUT_PARSE_MESSAGE",
    "ToolCallError",
    "ToolError",
    "ToolErrorKind",
    "ToolFunctionError",
    "ToolInputError",
    "ToolSetupError",
    "TransientBackendError",
    "UnknownToolError",
    "error_observation",
    "status_message",
]

#: ToolBench's wording (``server.py::get_rapidapi_response``), trailing newline included.
TOOL_INPUT_PARSE_MESSAGE = "Tool input parse error...\n"
#: α-UMi's client-side wording for a call that did not answer in time.
TIMEOUT_MESSAGE = "request time out"


def error_observation(message: str, response: Any = "") -> str:
    """The ToolBench error observation: ``{"error": message, "response": response}`` as JSON."""
    return json.dumps({"error": message, "response": response})


def status_message(status_code: int) -> str:
    """ToolBench's client wording for a non-200 reply."""
    return f"request invalid, data error. status_code={status_code}"


class ToolErrorKind(StrEnum):
    """A machine-readable class of failure (stored with the call, usable as a metric label)."""

    UNKNOWN_TOOL = "unknown_tool"
    INVALID_INPUT = "invalid_input"
    NO_BACKEND = "no_backend"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    HTTP_STATUS = "http_status"
    BAD_RESPONSE = "bad_response"
    REFUSED = "refused"
    INVALID_ARGUMENTS = "invalid_arguments"
    MIRROR_MISS = "mirror_miss"
    FUNCTION_ERROR = "function_error"
    API_ERROR = "api_error"
    INTERNAL = "internal"


class ToolError(Exception):
    """Base of every error raised by :mod:`services.tools`."""


class ToolSetupError(ToolError):
    """The configuration cannot work (unreadable mirror file, bad catalog, duplicate registration)."""


class ToolCallError(ToolError):
    """One tool call failed; :meth:`observation` is what the agent sees.

    ``message`` becomes the observation's ``error`` field (ToolBench wording where ToolBench
    has one); ``detail`` is extra text for logs and the stored call, never shown to the model.
    """

    kind: ClassVar[ToolErrorKind] = ToolErrorKind.INTERNAL

    def __init__(self, message: str, *, response: Any = "", detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.response = response
        self.detail = detail

    def observation(self) -> str:
        """The ToolBench error observation for this failure."""
        return error_observation(self.message, self.response)

    def describe(self) -> str:
        """One line for logs and :attr:`ToolOutcome.error`: the message plus any detail."""
        text = self.message.strip()
        return f"{text} ({self.detail})" if self.detail else text


class CallRejected(ToolCallError):
    """The call was invalid before any backend was asked."""


class UnknownToolError(CallRejected):
    """The action is not one of the task's tool Names."""

    kind = ToolErrorKind.UNKNOWN_TOOL

    def __init__(self, name: str) -> None:
        super().__init__(f"No such function name: {name}")


class ToolInputError(CallRejected):
    """The Action Input is not a JSON object."""

    kind = ToolErrorKind.INVALID_INPUT

    def __init__(self, detail: str) -> None:
        super().__init__(TOOL_INPUT_PARSE_MESSAGE, detail=detail)


class NoBackendError(CallRejected):
    """No configured backend can serve the tool."""

    kind = ToolErrorKind.NO_BACKEND

    def __init__(self, name: str) -> None:
        super().__init__(f"No backend is configured to serve the tool {name}")


class BackendError(ToolCallError):
    """A backend could not produce an answer."""


class TransientBackendError(BackendError):
    """A failure that may go away: retried with exponential backoff."""

    #: Seconds the server asked us to wait (``Retry-After``), if it said.
    retry_after_s: float | None = None


class BackendTimeout(TransientBackendError):
    """The call ran past its timeout."""

    kind = ToolErrorKind.TIMEOUT

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(TIMEOUT_MESSAGE, detail=detail)


class BackendUnavailable(TransientBackendError):
    """The connection failed (refused, reset, protocol error)."""

    kind = ToolErrorKind.CONNECTION

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("request failed, connection error", detail=detail)


class RetryableStatus(TransientBackendError):
    """HTTP 5xx or 429."""

    kind = ToolErrorKind.HTTP_STATUS

    def __init__(self, status_code: int, *, response: Any = "", retry_after_s: float | None = None) -> None:
        super().__init__(status_message(status_code), response=response)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class PermanentBackendError(BackendError):
    """A failure that retrying will not fix."""


class HttpStatusError(PermanentBackendError):
    """A non-2xx reply that is not retried (4xx other than 429, redirects)."""

    kind = ToolErrorKind.HTTP_STATUS

    def __init__(self, status_code: int, *, response: Any = "", detail: str | None = None) -> None:
        super().__init__(status_message(status_code), response=response, detail=detail)
        self.status_code = status_code


class BadResponseError(PermanentBackendError):
    """The server's reply does not follow the protocol (e.g. a /virtual reply that is not JSON)."""

    kind = ToolErrorKind.BAD_RESPONSE

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("request invalid, data error", detail=detail)


class EgressRefused(PermanentBackendError):
    """The network guard refused the destination; the message says why."""

    kind = ToolErrorKind.REFUSED

    def __init__(self, reason: str) -> None:
        super().__init__(f"request refused: {reason}")
        self.reason = reason


class InvalidArgumentsError(PermanentBackendError):
    """The arguments do not fit the tool's declared parameters."""

    kind = ToolErrorKind.INVALID_ARGUMENTS


class MirrorMissError(PermanentBackendError):
    """The mirror backend has no recording of this call."""

    kind = ToolErrorKind.MIRROR_MISS

    def __init__(self, name: str) -> None:
        super().__init__(
            f"mirror backend: no recorded call of {name} matches these arguments "
            "(the mirror only replays recorded trajectories)"
        )


class ToolFunctionError(PermanentBackendError):
    """A registered Python function raised, or did not return within its timeout."""

    kind = ToolErrorKind.FUNCTION_ERROR

    def __init__(self, message: str, *, detail: str | None = None, kind: ToolErrorKind | None = None) -> None:
        super().__init__(message, detail=detail)
        if kind is not None:
            self.kind = kind  # type: ignore[misc]


class ApiReportedError(PermanentBackendError):
    """A /virtual server answered ``{"error": <non-empty>, "response": ...}``."""

    kind = ToolErrorKind.API_ERROR
