"""The Python clients of the umi gateway: :class:`UmiClient` (sync) and :class:`AsyncUmiClient` (asyncio).

Both send ``Authorization: Bearer <key>`` (the ``api_key`` argument, else ``UMI_API_KEY``) to
``base_url`` (else ``UMI_GATEWAY_URL``), bound every phase of a request by a timeout, raise
only :class:`~umi_client.errors.UmiError` subclasses, and retry only what is safe to send
again (``429``/``503`` after ``Retry-After``; connection errors and timeouts for idempotent
calls). Every call of this API is idempotent: the ``GET``\ s, ``cancel`` (cancelling twice is
cancelling once) and ``submit``, which always carries an idempotency key, so a retried POST cannot
create a second task.
Retries are run by ``stamina``; server-sent events are parsed by ``httpx-sse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx
import stamina
from httpx_sse import EventSource

from shared.lifecycle import TERMINAL_STATUSES, TaskStatus
from shared.schemas import TaskAccepted, TaskCreate, TaskPage, TaskPublic
from umi_client._core import (
    DEFAULT_TIMEOUT,
    ClientConfig,
    EventStream,
    M,
    TaskEvent,
    check_event_stream,
    error_for_response,
    parse,
    remaining_s,
    retry_hook,
    submit_request,
    timed_out,
    transport_error,
)
from umi_client.errors import NotFound, ServiceUnavailable, UmiConnectionError, UmiProtocolError

__all__ = ["AsyncUmiClient", "UmiClient"]

class _ClientBase:
    """Configuration and the request plumbing both clients share."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_reconnects: int = 5,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.config = ClientConfig.resolve(
            base_url, api_key, retries=retries, max_reconnects=max_reconnects, poll_interval_s=poll_interval_s
        )
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.base_url!r})"

    def _retrying(self, *, idempotent: bool, deadline: float | None = None) -> Any:
        """stamina's retry loop for one call (``for``/``async for`` over it)."""
        return stamina.retry_context(
            on=retry_hook(self.config, idempotent=idempotent),
            attempts=self.config.retries + 1,
            timeout=remaining_s(deadline),
            wait_initial=0.2,
            wait_max=10.0,
            wait_jitter=0.2,
        )

    def _event_stream(
        self, task_id: uuid.UUID | str, last_event_id: int | None, deadline: float | None, timeout: float | None
    ) -> EventStream:
        """Where a new event stream of the task starts (see :class:`~umi_client._core.EventStream`)."""
        return EventStream(
            task_id, last_event_id=last_event_id, max_reconnects=self.config.max_reconnects, deadline=deadline, timeout=timeout
        )

    def _poll_delay(self, task: TaskPublic, deadline: float | None, timeout: float | None) -> float | None:
        """While ``wait`` polls: ``None`` once the task ended, else how long to sleep (or raise when out of time)."""
        if task.status in TERMINAL_STATUSES:
            return None
        if deadline is not None and time.monotonic() + self.config.poll_interval_s >= deadline:
            raise timed_out(task.id, timeout)
        return self.config.poll_interval_s


def _raise_for(response: httpx.Response) -> httpx.Response:
    error = error_for_response(response)
    if error is not None:
        raise error
    return response


class UmiClient(_ClientBase):
    """A synchronous client of the umi gateway (httpx).

    Usage::

        from umi_client import UmiClient

        with UmiClient("http://127.0.0.1:8000", api_key="umi_...") as umi:
            accepted = umi.submit({"query": "Is test@example.com valid?", "tools": tools})
            for event in umi.events(accepted.id):     # StepEvent ..., then the final TaskPublic
                print(event)
            task = umi.wait(accepted.id, timeout=120)  # or just wait for the end
    """

    def __init__(self, base_url: str | None = None, *, transport: httpx.BaseTransport | None = None, **options: Any) -> None:
        """``options``: ``api_key``, ``timeout`` (an ``httpx.Timeout``), ``retries``, ``max_reconnects``,
        ``poll_interval_s``; ``transport`` is passed to httpx."""
        super().__init__(base_url, **options)
        self._http = httpx.Client(base_url=self.config.base_url, headers=self.config.headers(), timeout=self.timeout, transport=transport)

    def __enter__(self) -> UmiClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, send: Callable[[], httpx.Response], *, idempotent: bool, what: str, deadline: float | None = None) -> httpx.Response:
        for attempt in self._retrying(idempotent=idempotent, deadline=deadline):
            with attempt:
                try:
                    response = send()
                except httpx.TransportError as exc:
                    raise transport_error(exc, what) from exc
                if not response.is_success:
                    response.read()
                    response.close()
                return _raise_for(response)
        raise AssertionError("unreachable: stamina re-raises the last error")

    def _request(self, model: type[M], method: str, url: str, **kwargs: Any) -> M:
        """One JSON call, retried where safe (every call of this API is idempotent: see the module doc)."""
        what = f"{method} {url}"
        response = self._call(lambda: self._http.request(method, url, **kwargs), idempotent=True, what=what)
        return parse(model, response.content, what)

    def submit(self, task: TaskCreate | Mapping[str, Any], *, idempotency_key: str | None = None) -> TaskAccepted:
        """Submit a task (``POST /v1/tasks``); the same ``idempotency_key`` always means the same task."""
        body, headers = submit_request(task, idempotency_key)
        return self._request(TaskAccepted, "POST", "/v1/tasks", json=body, headers=headers)

    def get(self, task_id: uuid.UUID | str) -> TaskPublic:
        """The task, its status and its steps so far (``GET /v1/tasks/{id}``)."""
        return self._request(TaskPublic, "GET", f"/v1/tasks/{task_id}")

    def list(self, *, status: TaskStatus | str | None = None, limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """A page of the tenant's tasks, newest first (``GET /v1/tasks``); pass ``next_cursor`` on."""
        params = {k: str(v) for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._request(TaskPage, "GET", "/v1/tasks", params=params)

    def cancel(self, task_id: uuid.UUID | str) -> TaskPublic:
        """Cancel the task (a task that already ended is returned unchanged, so this is safe to retry)."""
        return self._request(TaskPublic, "POST", f"/v1/tasks/{task_id}/cancel")

    def events(self, task_id: uuid.UUID | str, *, last_event_id: int | None = None) -> Iterator[TaskEvent]:
        """Each stored step (:class:`~shared.schemas.StepEvent`) as it is stored, then the final
        :class:`~shared.schemas.TaskPublic`, after which the iterator ends.

        A dropped connection is reopened with ``Last-Event-ID`` (the last step seen), so no step
        is missed or repeated; ``last_event_id`` starts after that step.
        """
        return self._stream(task_id, last_event_id=last_event_id, deadline=None, timeout=None)

    def _stream(
        self, task_id: uuid.UUID | str, *, last_event_id: int | None, deadline: float | None, timeout: float | None
    ) -> Generator[TaskEvent, None, None]:
        stream = self._event_stream(task_id, last_event_id, deadline, timeout)
        for delay in stream.connections():
            time.sleep(delay)
            request = stream.request(self._http, self.timeout)
            response = self._call(
                lambda: self._http.send(request, stream=True), idempotent=True, what=stream.what, deadline=deadline
            )
            with contextlib.closing(response), stream.reading():
                for source_event in EventSource(check_event_stream(response)).iter_sse():
                    if (event := stream.take(source_event)) is not None:
                        yield event
                    if stream.ended:
                        break

    def wait(self, task_id: uuid.UUID | str, *, timeout: float | None = None) -> TaskPublic:
        """Block until the task ends and return it, following its events (falling back to polling
        ``GET`` where the stream cannot be used); :class:`~umi_client.errors.UmiTimeout` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with contextlib.closing(self._stream(task_id, last_event_id=None, deadline=deadline, timeout=timeout)) as stream:
                for event in stream:
                    if isinstance(event, TaskPublic):
                        return event
        except (NotFound, ServiceUnavailable, UmiConnectionError, UmiProtocolError):
            pass  # no usable stream (an older gateway, a proxy that buffers or rewrites it): poll instead
        while (delay := self._poll_delay(task := self.get(task_id), deadline, timeout)) is not None:
            time.sleep(delay)
        return task


class AsyncUmiClient(_ClientBase):
    """The asyncio client of the umi gateway; the same calls as :class:`UmiClient`, awaited.

    Usage::

        from umi_client import AsyncUmiClient

        async with AsyncUmiClient("http://127.0.0.1:8000", api_key="umi_...") as umi:
            accepted = await umi.submit({"query": "Is test@example.com valid?", "tools": tools})
            async for event in umi.events(accepted.id):
                print(event)
            task = await umi.wait(accepted.id, timeout=120)
    """

    def __init__(self, base_url: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        """The same options as :class:`UmiClient`."""
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(base_url=self.config.base_url, headers=self.config.headers(), timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncUmiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _call(
        self, send: Callable[[], Awaitable[httpx.Response]], *, idempotent: bool, what: str, deadline: float | None = None
    ) -> httpx.Response:
        async for attempt in self._retrying(idempotent=idempotent, deadline=deadline):
            with attempt:
                try:
                    response = await send()
                except httpx.TransportError as exc:
                    raise transport_error(exc, what) from exc
                if not response.is_success:
                    await response.aread()
                    await response.aclose()
                return _raise_for(response)
        raise AssertionError("unreachable: stamina re-raises the last error")

    async def _request(self, model: type[M], method: str, url: str, **kwargs: Any) -> M:
        """One JSON call, retried where safe (every call of this API is idempotent: see the module doc)."""
        what = f"{method} {url}"
        response = await self._call(lambda: self._http.request(method, url, **kwargs), idempotent=True, what=what)
        return parse(model, response.content, what)

    async def submit(self, task: TaskCreate | Mapping[str, Any], *, idempotency_key: str | None = None) -> TaskAccepted:
        """Submit a task (``POST /v1/tasks``); the same ``idempotency_key`` always means the same task."""
        body, headers = submit_request(task, idempotency_key)
        return await self._request(TaskAccepted, "POST", "/v1/tasks", json=body, headers=headers)

    async def get(self, task_id: uuid.UUID | str) -> TaskPublic:
        """The task, its status and its steps so far (``GET /v1/tasks/{id}``)."""
        return await self._request(TaskPublic, "GET", f"/v1/tasks/{task_id}")

    async def list(self, *, status: TaskStatus | str | None = None, limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """A page of the tenant's tasks, newest first (``GET /v1/tasks``); pass ``next_cursor`` on."""
        params = {k: str(v) for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return await self._request(TaskPage, "GET", "/v1/tasks", params=params)

    async def cancel(self, task_id: uuid.UUID | str) -> TaskPublic:
        """Cancel the task (a task that already ended is returned unchanged, so this is safe to retry)."""
        return await self._request(TaskPublic, "POST", f"/v1/tasks/{task_id}/cancel")

    def events(self, task_id: uuid.UUID | str, *, last_event_id: int | None = None) -> AsyncIterator[TaskEvent]:
        """As :meth:`UmiClient.events`, an async iterator (``async for event in client.events(id)``)."""
        return self._stream(task_id, last_event_id=last_event_id, deadline=None, timeout=None)

    async def _stream(
        self, task_id: uuid.UUID | str, *, last_event_id: int | None, deadline: float | None, timeout: float | None
    ) -> AsyncGenerator[TaskEvent, None]:
        stream = self._event_stream(task_id, last_event_id, deadline, timeout)
        for delay in stream.connections():
            await asyncio.sleep(delay)
            request = stream.request(self._http, self.timeout)
            response = await self._call(
                lambda: self._http.send(request, stream=True), idempotent=True, what=stream.what, deadline=deadline
            )
            async with contextlib.aclosing(response):
                with stream.reading():
                    async for source_event in EventSource(check_event_stream(response)).aiter_sse():
                        if (event := stream.take(source_event)) is not None:
                            yield event
                        if stream.ended:
                            break

    async def wait(self, task_id: uuid.UUID | str, *, timeout: float | None = None) -> TaskPublic:
        """As :meth:`UmiClient.wait`, awaited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._stream(task_id, last_event_id=None, deadline=deadline, timeout=timeout)
        try:
            async for event in stream:
                if isinstance(event, TaskPublic):
                    return event
        except (NotFound, ServiceUnavailable, UmiConnectionError, UmiProtocolError):
            pass  # no usable stream (an older gateway, a proxy that buffers or rewrites it): poll instead
        finally:
            await stream.aclose()
        while (delay := self._poll_delay(task := await self.get(task_id), deadline, timeout)) is not None:
            await asyncio.sleep(delay)
        return task
