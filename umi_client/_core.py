"""What the sync and async clients share: configuration, requests, error mapping, retry rules, events.

Nothing here does I/O, so :class:`~umi_client.UmiClient` and :class:`~umi_client.AsyncUmiClient`
differ only in how they send and wait.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeAlias, TypeVar

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel, ValidationError

import umi_client.errors as errors
from shared.schemas import StepEvent, TaskCreate, TaskPublic

__all__ = [
    "ClientConfig",
    "DEFAULT_TIMEOUT",
    "EventStream",
    "TaskEvent",
    "check_event_stream",
    "decode_event",
    "error_for_response",
    "events_headers",
    "parse",
    "retry_hook",
    "submit_request",
    "transport_error",
]

#: Each phase bounded on its own: a dead gateway fails in ``connect`` seconds, a silent one in ``read``
#: (the events route sends a keep-alive comment every 15 s by default, well inside it).
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
#: How long to wait before reopening a dropped event stream, until the server's ``retry:`` hint says.
RECONNECT_S = 1.0

M = TypeVar("M", bound=BaseModel)

#: What :meth:`~umi_client.UmiClient.events` yields: each stored step, then the task's final state.
TaskEvent: TypeAlias = StepEvent | TaskPublic

_ERRORS_BY_STATUS: dict[int, type[errors.UmiHTTPError]] = {
    400: errors.InvalidRequest,
    401: errors.Unauthorized,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.InvalidRequest,
    422: errors.InvalidRequest,
    429: errors.RateLimited,
    503: errors.ServiceUnavailable,
}


class ClientConfig(BaseModel):
    """Where the gateway is, who is asking, and how patient a client is (shared by both clients)."""

    base_url: str
    api_key: str | None = None
    #: Retries of a refused or failed call (``429``/``503``, connection errors), after the first attempt.
    retries: int = 3
    #: A ``Retry-After`` longer than this is not waited for: the error is raised instead.
    max_retry_after_s: float = 60.0
    #: An event stream that drops this many times in a row without a new event gives up.
    max_reconnects: int = 5
    #: ``wait`` polls ``GET`` this often when the event stream cannot be used.
    poll_interval_s: float = 0.5

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, **options: Any) -> ClientConfig:
        """The constructor's values, else ``UMI_GATEWAY_URL`` / ``UMI_API_KEY``, else the local default."""
        return cls(
            base_url=(base_url or os.environ.get("UMI_GATEWAY_URL") or DEFAULT_GATEWAY_URL).rstrip("/"),
            api_key=api_key if api_key is not None else (os.environ.get("UMI_API_KEY") or None),
            **options,
        )

    def headers(self) -> dict[str, str]:
        """Headers every request carries; the key only in ``Authorization``, never anywhere logged."""
        headers = {"Accept": "application/json", "User-Agent": "umi-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def __repr__(self) -> str:
        return f"ClientConfig(base_url={self.base_url!r}, api_key={'***' if self.api_key else None})"

    __str__ = __repr__


def submit_request(task: TaskCreate | Mapping[str, Any], idempotency_key: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of ``POST /v1/tasks``.

    A dict is validated here first (a :class:`pydantic.ValidationError` names the bad field
    before anything is sent). Without ``idempotency_key`` a fresh one is generated, so a POST
    retried after a lost answer finds the task it created instead of creating a second one.
    """
    task_in = task if isinstance(task, TaskCreate) else TaskCreate.model_validate(task)
    body = task_in.model_dump(mode="json", exclude_unset=True, by_alias=True)
    return body, {"Idempotency-Key": idempotency_key or f"umi-client-{uuid.uuid4()}"}


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _detail(response: httpx.Response) -> object:
    """What the gateway said: ``{"detail": ...}`` (FastAPI) or ``{"error": {"message": ...}}``; else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return body["error"].get("message", body["error"])
        if "detail" in body:
            return body["detail"]
    return body


def error_for_response(response: httpx.Response) -> errors.UmiHTTPError | None:
    """The exception for an error status (its body must have been read), ``None`` for a success."""
    if response.is_success:
        return None
    error_type = _ERRORS_BY_STATUS.get(response.status_code, errors.UmiHTTPError)
    return error_type(response.status_code, _detail(response), retry_after_s=_retry_after_s(response))


def transport_error(exc: httpx.TransportError, what: str) -> errors.UmiError:
    """An httpx transport failure as the client's own error (the URL named, never a header)."""
    if isinstance(exc, httpx.TimeoutException):
        return errors.UmiTimeout(f"{what}: timed out ({type(exc).__name__})")
    return errors.UmiConnectionError(f"{what}: {type(exc).__name__}: {exc}")


def retry_hook(config: ClientConfig, *, idempotent: bool) -> Callable[[Exception], bool | float]:
    """stamina's ``on`` hook: whether (and how long after) a failed call may be sent again.

    Only safe cases: ``429``/``503`` (the gateway did nothing), waiting ``Retry-After`` when
    given (up to ``max_retry_after_s``); connection errors and timeouts only for an
    idempotent call (every ``GET``; a POST with an idempotency key; cancel, which is the same
    done twice). Everything else (``4xx``) is final.
    """

    def on(exc: Exception) -> bool | float:
        if isinstance(exc, errors.RateLimited | errors.ServiceUnavailable):
            if exc.retry_after_s is None:
                return True
            return exc.retry_after_s if exc.retry_after_s <= config.max_retry_after_s else False
        return idempotent and isinstance(exc, errors.UmiConnectionError | errors.UmiTimeout)

    return on


def remaining_s(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (a ``time.monotonic()`` value), ``None`` without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def stream_timeout(timeout: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    """The stream's timeouts, its read no longer than the time left before ``deadline``."""
    left = remaining_s(deadline)
    if left is None or timeout.read is None or left >= timeout.read:
        return timeout
    return httpx.Timeout(connect=timeout.connect, read=max(left, 0.05), write=timeout.write, pool=timeout.pool)


def events_headers(last_event_id: int | None) -> dict[str, str]:
    """Headers of ``GET /v1/tasks/{id}/events``, resuming after ``last_event_id`` if given."""
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def parse(model: type[M], content: str | bytes, what: str) -> M:
    """``content`` as ``model``; a body that is not one is a :class:`~umi_client.errors.UmiProtocolError`."""
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        raise errors.UmiProtocolError(f"{what}: the gateway's answer is not a {model.__name__}: {exc}") from exc


def check_event_stream(response: httpx.Response) -> httpx.Response:
    """``response`` if it is an event stream; else (a proxy's page, an older gateway) a protocol error."""
    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    if content_type != "text/event-stream":
        response.close()
        raise errors.UmiProtocolError(f"{response.request.url.path}: expected an event stream, got {content_type or 'no content type'!r}")
    return response


def decode_event(sse: ServerSentEvent) -> TaskEvent | None:
    """A ``step`` or ``end`` event as its model; other events (the retry hint, keep-alives) are ``None``."""
    if sse.event == "step":
        return parse(StepEvent, sse.data, f"event {sse.id}")
    if sse.event == "end":
        return parse(TaskPublic, sse.data, f"event {sse.id}")
    return None


def timed_out(task_id: uuid.UUID | str, timeout: float | None) -> errors.UmiTimeout:
    """The error of ``wait`` when the task did not end in time."""
    return errors.UmiTimeout(f"task {task_id} did not end within {timeout}s")


def stream_gave_up(task_id: uuid.UUID | str, drops: int, last: Exception | None) -> errors.UmiConnectionError:
    """The error of an event stream that dropped ``drops`` times in a row without a new event."""
    return errors.UmiConnectionError(f"the event stream of task {task_id} dropped {drops} times without progress: {last}")


class EventStream:
    """Following a task's events across connections — the policy both clients' loops share, without I/O.

    Each connection resumes after the last step seen (``Last-Event-ID``), so no step is missed
    or repeated; the stream ends with the end event. A connection that drops (or stays silent
    past its read timeout) is reopened after the server's ``retry:`` hint, at most
    ``max_reconnects`` times in a row without a new step and never past ``deadline`` (a
    ``time.monotonic()`` value). A client's loop::

        for delay in stream.connections():
            sleep(delay)
            response = send(stream.request(http, timeout))      # retried as any call
            with closing(response), stream.reading():
                for source_event in EventSource(check_event_stream(response)).iter_sse():
                    if (event := stream.take(source_event)) is not None:
                        yield event
                    if stream.ended:
                        break
    """

    def __init__(
        self,
        task_id: uuid.UUID | str,
        *,
        last_event_id: int | None,
        max_reconnects: int,
        deadline: float | None,
        timeout: float | None,
    ) -> None:
        self.task_id = task_id
        #: The last step seen: the next connection's ``Last-Event-ID``.
        self.after = last_event_id
        self.max_reconnects = max_reconnects
        self.deadline = deadline
        #: ``wait``'s timeout, for its error.
        self.timeout = timeout
        #: What a failed connection attempt is called in its error.
        self.what = f"events of task {task_id}"
        #: Whether the end event was taken (the stream is over).
        self.ended = False
        self.drops = 0
        self.reconnect_s = RECONNECT_S
        self.last_error: Exception | None = None
        self._error: Exception | None = None

    def connections(self) -> Iterator[float]:
        """One item per connection to open: the seconds to wait before opening it; over once the end was taken.

        Raises :class:`~umi_client.errors.UmiTimeout` past the deadline and
        :class:`~umi_client.errors.UmiConnectionError` after too many drops without progress.
        """
        delay = 0.0
        while True:
            self._error = None
            yield delay
            if self.ended:
                return
            delay = self._dropped(self._error)

    def request(self, http: httpx.Client | httpx.AsyncClient, timeout: httpx.Timeout) -> httpx.Request:
        """The next connection's ``GET /v1/tasks/{id}/events``, its read bounded by the time left."""
        url, headers = f"/v1/tasks/{self.task_id}/events", events_headers(self.after)
        return http.build_request("GET", url, headers=headers, timeout=stream_timeout(timeout, self.deadline))

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around reading one connection: a transport error (dropped, or silent past the read timeout) ends it, to be resumed."""
        try:
            yield
        except httpx.TransportError as exc:
            self._error = exc

    def take(self, source_event: ServerSentEvent) -> TaskEvent | None:
        """Decode one received event, remembering the server's retry hint and the last step's id.

        Past the deadline anything but the end raises :class:`~umi_client.errors.UmiTimeout`
        (keep-alives arrive as empty events, so a silent task is noticed too).
        """
        if source_event.retry is not None:
            self.reconnect_s = source_event.retry / 1000
        event = decode_event(source_event)
        if isinstance(event, TaskPublic):
            self.ended = True
            return event
        if isinstance(event, StepEvent):
            self.after = event.index
            self.drops = 0
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise timed_out(self.task_id, self.timeout)
        return event

    def _dropped(self, error: Exception | None) -> float:
        """Count a drop; the delay before reconnecting, or raise when out of time or patience."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise timed_out(self.task_id, self.timeout)
        self.drops += 1
        self.last_error = error or self.last_error
        if self.drops > self.max_reconnects:
            raise stream_gave_up(self.task_id, self.drops, self.last_error)
        return self.reconnect_s
