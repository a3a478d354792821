"""``umi_client`` (sync and async) and ``umi submit`` against a real gateway over HTTP.

Most tests run the gateway in-process on the session's PostgreSQL and write the task's
steps to the database themselves (``tests/stored_steps.py``), so they control when each
step appears; one runs a recorded trajectory through the real workers on RabbitMQ.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import ServerSentEvent
from sqlmodel import select

from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.lifecycle import TaskStatus
from shared.models import Task
from shared.tenants import create_api_key
from tests.conftest import REPO, TRAIN_FILES, UMI, load_trajectories, single_chain_indices
from tests.stored_steps import TASK, add_step, finish_task, gateway_settings, start_gateway
from tests.tcp_proxy import TcpProxy
from umi.deployment import Deployment
from umi_client import (
    AsyncUmiClient,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    StepEvent,
    TaskAccepted,
    TaskPublic,
    UmiClient,
    UmiConnectionError,
    UmiHTTPError,
    UmiProtocolError,
    UmiTimeout,
    Unauthorized,
)
from umi_client._core import DEFAULT_TIMEOUT, EventStream, error_for_response, parse


@pytest.fixture(scope="module")
def gateway(postgres_url: str) -> Iterator[ServerThread]:
    with start_gateway(gateway_settings(postgres_url)) as server:
        yield server


def _later(*actions: object, delay_s: float = 0.15) -> threading.Thread:
    """Run each callable ``delay_s`` after the previous one, in a thread (a worker storing steps)."""

    def run() -> None:
        for action in actions:
            time.sleep(delay_s)
            action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _summary(events: list[StepEvent | TaskPublic]) -> list[int | str]:
    return [event.index if isinstance(event, StepEvent) else f"end:{event.status}" for event in events]


def test_sync_client_submits_follows_waits_and_cancels(gateway: ServerThread, postgres_url: str) -> None:
    with UmiClient(gateway.url, retries=0) as umi:
        accepted = umi.submit(TASK)
        assert accepted.status == "queued"
        assert umi.get(accepted.id).steps[0].output == TASK["query"]
        producer = _later(
            lambda: add_step(postgres_url, accepted.id, 1),
            lambda: add_step(postgres_url, accepted.id, 2),
            lambda: finish_task(postgres_url, accepted.id),
        )
        events = list(umi.events(accepted.id))
        producer.join()
        assert _summary(events) == [0, 1, 2, 3, "end:succeeded"]
        final = events[-1]
        assert isinstance(final, TaskPublic) and final.answer == "It is valid."
        assert final.steps[1].latency_ms == 250.0 and final.steps[1].next_role is None
        assert umi.wait(accepted.id, timeout=5) == final == umi.get(accepted.id)
        assert _summary(list(umi.events(accepted.id, last_event_id=2))) == [3, "end:succeeded"]

        other = umi.submit(TASK)
        assert umi.cancel(other.id).status == "cancelled"
        assert umi.cancel(other.id).status == "cancelled"  # the same, done twice
        with pytest.raises(UmiTimeout, match="did not end within 0.5s"):
            umi.wait(umi.submit(TASK).id, timeout=0.5)
        with pytest.raises(NotFound):
            umi.get(uuid.uuid4())


def test_async_client_submits_follows_waits_and_cancels(gateway: ServerThread, postgres_url: str) -> None:
    async def scenario() -> None:
        async with AsyncUmiClient(gateway.url, retries=0) as umi:
            accepted = await umi.submit(TASK)
            assert (await umi.get(accepted.id)).steps[0].output == TASK["query"]
            producer = _later(lambda: add_step(postgres_url, accepted.id, 1), lambda: finish_task(postgres_url, accepted.id))
            events = [event async for event in umi.events(accepted.id)]
            producer.join()
            assert _summary(events) == [0, 1, 2, "end:succeeded"]
            assert await umi.wait(accepted.id, timeout=5) == events[-1]
            cancelled = await umi.cancel((await umi.submit(TASK)).id)
            assert cancelled.status == "cancelled"
            with pytest.raises(UmiTimeout):
                await umi.wait((await umi.submit(TASK)).id, timeout=0.5)
            with pytest.raises(NotFound):
                await umi.cancel(uuid.uuid4())

    asyncio.run(scenario())


def test_events_resume_transparently_after_the_connection_drops(gateway: ServerThread, postgres_url: str) -> None:
    with TcpProxy("127.0.0.1", gateway.port) as proxy, UmiClient(f"http://127.0.0.1:{proxy.port}") as umi:
        accepted = umi.submit(TASK)
        add_step(postgres_url, accepted.id, 1)
        add_step(postgres_url, accepted.id, 2)
        events = umi.events(accepted.id)
        seen = [next(events), next(events), next(events)]
        connections = proxy.accepted
        proxy.cut()  # the stream drops; new connections are refused for a while
        add_step(postgres_url, accepted.id, 3)  # stored while the client is cut off
        producer = _later(proxy.restore, lambda: add_step(postgres_url, accepted.id, 4), lambda: finish_task(postgres_url, accepted.id), delay_s=0.4)
        seen += list(events)
        producer.join()
    assert _summary(seen) == [0, 1, 2, 3, 4, 5, "end:succeeded"]  # every step once, in order
    assert proxy.accepted > connections  # it did reconnect


def test_async_events_resume_after_the_connection_drops(gateway: ServerThread, postgres_url: str) -> None:
    async def scenario(proxy: TcpProxy) -> list[StepEvent | TaskPublic]:
        async with AsyncUmiClient(f"http://127.0.0.1:{proxy.port}") as umi:
            accepted = await umi.submit(TASK)
            seen: list[StepEvent | TaskPublic] = []
            async for event in umi.events(accepted.id):
                seen.append(event)
                if _summary(seen) == [0]:
                    proxy.cut()
                    add_step(postgres_url, accepted.id, 1)
                    _later(proxy.restore, lambda: finish_task(postgres_url, accepted.id), delay_s=0.4)
            return seen

    with TcpProxy("127.0.0.1", gateway.port) as proxy:
        assert _summary(asyncio.run(scenario(proxy))) == [0, 1, 2, "end:succeeded"]


class _WithoutEventStream(httpx.BaseTransport):
    """The real gateway, except that the events route answers ``events_answer`` (an older gateway's 404,
    a proxy's page)."""

    def __init__(self, events_answer: httpx.Response) -> None:
        self.inner = httpx.HTTPTransport()
        self.events_answer = events_answer
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if request.url.path.endswith("/events"):
            return self.events_answer
        return self.inner.handle_request(request)


@pytest.mark.parametrize(
    "events_answer",
    [httpx.Response(404, json={"detail": "Not Found"}), httpx.Response(200, html="<html>Please log in</html>")],
    ids=["older-gateway", "proxy-page"],
)
def test_wait_falls_back_to_polling_when_there_is_no_event_stream(
    gateway: ServerThread, postgres_url: str, events_answer: httpx.Response
) -> None:
    transport = _WithoutEventStream(events_answer)
    with UmiClient(gateway.url, transport=transport, poll_interval_s=0.05) as umi:
        accepted = umi.submit(TASK)
        with pytest.raises(NotFound if events_answer.status_code == 404 else UmiProtocolError):
            next(umi.events(accepted.id))
        producer = _later(lambda: finish_task(postgres_url, accepted.id), delay_s=0.3)
        task = umi.wait(accepted.id, timeout=10)
        producer.join()
        assert task.status == "succeeded" and task.answer == "It is valid."
        with pytest.raises(NotFound):
            umi.wait(uuid.uuid4(), timeout=5)  # an unknown task stays NotFound, stream or not
    assert transport.paths.count(f"/v1/tasks/{accepted.id}/events") == 2
    assert transport.paths.count(f"/v1/tasks/{accepted.id}") >= 2  # polled


class _LoseFirstAnswer(httpx.BaseTransport):
    """The real gateway, but the first POST's answer is lost on the way back (it was processed)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if len(self.keys) == 1:
                response.close()
                raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response


def test_a_retried_submit_sends_the_same_idempotency_key(gateway: ServerThread, postgres_url: str) -> None:
    transport = _LoseFirstAnswer()
    with UmiClient(gateway.url, transport=transport) as umi:
        retried = umi.submit(TASK)
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1] and transport.keys[0]
        # The lost answer's request did store the task: the retry got the same one, not a second.
        with session_scope(get_engine(postgres_url)) as session:
            stored = session.exec(select(Task).where(Task.idempotency_key == transport.keys[0])).all()
        assert [task.id for task in stored] == [retried.id]
        umi.submit(TASK)
        assert transport.keys[2] != transport.keys[0]  # a new call, a new key
        umi.submit(TASK, idempotency_key="order-42")
        assert transport.keys[3] == "order-42"
        with pytest.raises(Conflict) as conflict:  # the same key for another task: a real 409 from the gateway
            umi.submit({**TASK, "query": "another question"}, idempotency_key="order-42")
        assert conflict.value.status == 409
    lossy = _LoseFirstAnswer()
    with UmiClient(gateway.url, transport=lossy, retries=0) as umi, pytest.raises(UmiConnectionError):
        umi.submit(TASK)


def test_list_pages_through_the_tenants_tasks_sync_and_async(postgres_url: str) -> None:
    with session_scope(get_engine(postgres_url)) as session:
        key = create_api_key(session=session, tenant_name=f"lister-{uuid.uuid4().hex[:6]}").key
    with start_gateway(gateway_settings(postgres_url, auth=True)) as server:
        with UmiClient(server.url, api_key=key) as umi:
            submitted = [umi.submit({**TASK, "query": f"question {n}"}).id for n in range(5)]
            cancelled = umi.cancel(submitted[0])
            seen, cursor = [], None
            while True:
                page = umi.list(limit=2, cursor=cursor)
                seen += [task.id for task in page.items]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert seen == submitted[::-1]  # newest first, each once, only this tenant's
            assert [task.id for task in umi.list(status="cancelled").items] == [cancelled.id]

        async def listed() -> list[uuid.UUID]:
            async with AsyncUmiClient(server.url, api_key=key) as umi:
                return [task.id for task in (await umi.list(status=TaskStatus.QUEUED, limit=10)).items]

        assert asyncio.run(listed()) == submitted[:0:-1]


def test_http_errors_map_to_the_client_exceptions_and_the_key_is_never_shown(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("UMI_API_KEY", raising=False)
    with session_scope(get_engine(postgres_url)) as session:
        key = create_api_key(session=session, tenant_name=f"client-{uuid.uuid4().hex[:6]}").key
        slow_key = create_api_key(session=session, tenant_name=f"slow-{uuid.uuid4().hex[:6]}").key
    with start_gateway(gateway_settings(postgres_url, auth=True, tenant_rate_per_s=0.5, tenant_burst=2)) as server:
        with UmiClient(server.url, retries=0) as anonymous, pytest.raises(Unauthorized) as unauthorized:
            anonymous.get(uuid.uuid4())
        assert unauthorized.value.status == 401 and "API key" in str(unauthorized.value.detail)
        with UmiClient(server.url, api_key="umi_not-a-key", retries=0) as wrong, pytest.raises(Unauthorized):
            wrong.get(uuid.uuid4())
        monkeypatch.setenv("UMI_API_KEY", key)  # the key from the environment
        with UmiClient(server.url, retries=0) as umi:
            assert key not in repr(umi) and key not in str(umi.config)
            with pytest.raises(NotFound) as not_found:
                umi.get(uuid.uuid4())
            assert not_found.value.status == 404
        with UmiClient(server.url, api_key=slow_key, retries=0) as slow:
            for _ in range(2):  # the burst
                with pytest.raises(NotFound):
                    slow.get(uuid.uuid4())
            with pytest.raises(RateLimited) as limited:
                slow.get(uuid.uuid4())
            assert limited.value.status == 429 and limited.value.retry_after_s == 2
        with UmiClient(server.url, api_key=slow_key, retries=2) as patient:
            started = time.monotonic()
            with pytest.raises(NotFound):  # the 429 was waited out (Retry-After), then answered
                patient.get(uuid.uuid4())
            assert time.monotonic() - started >= 1.5
    assert key not in caplog.text and slow_key not in caplog.text
    assert key not in str(not_found.value) and key not in str(limited.value)


def test_every_error_status_has_its_exception() -> None:
    request = httpx.Request("POST", "http://gateway/v1/tasks")
    cases = {
        409: (Conflict, {"detail": "the Idempotency-Key was used for a different request"}),
        413: (InvalidRequest, {"detail": "body too large"}),
        422: (InvalidRequest, {"detail": [{"loc": ["body", "query"], "msg": "query must not be blank"}]}),
        503: (ServiceUnavailable, {"error": {"type": "unavailable", "message": "the broker is unreachable"}}),
        500: (UmiHTTPError, {"detail": "Internal Server Error"}),
    }
    for status, (error_type, body) in cases.items():
        error = error_for_response(httpx.Response(status, json=body, headers={"Retry-After": "3"}, request=request))
        assert type(error) is error_type, status
        assert error.status == status and error.retry_after_s == 3
    assert error_for_response(httpx.Response(503, json={"error": {"type": "x", "message": "the broker is unreachable"}}, request=request)).detail == "the broker is unreachable"  # type: ignore[union-attr]
    assert error_for_response(httpx.Response(202, json={}, request=request)) is None
    with pytest.raises(UmiProtocolError, match="not a TaskAccepted"):
        parse(TaskAccepted, b'{"task": 1}', "POST /v1/tasks")


def test_the_event_stream_policy_resumes_after_the_last_step_stops_at_the_end_and_gives_up_without_progress() -> None:
    """The loop both clients run (``umi_client._core.EventStream``), without a server."""
    task_id = uuid.uuid4()
    http = httpx.Client(base_url="http://gateway")

    def step(index: int) -> ServerSentEvent:
        data = {"task_id": str(task_id), "index": index, "role": "planner", "output": "x", "created_at": "2026-01-01T00:00:00Z"}
        return ServerSentEvent(event="step", data=json.dumps(data), id=str(index))

    stream = EventStream(task_id, last_event_id=None, max_reconnects=1, deadline=None, timeout=None)
    connections = stream.connections()
    assert next(connections) == 0.0  # the first connection at once, from the start
    assert "Last-Event-ID" not in stream.request(http, DEFAULT_TIMEOUT).headers
    assert stream.take(ServerSentEvent(retry=250)) is None  # the server's retry hint
    assert isinstance(stream.take(step(0)), StepEvent) and isinstance(stream.take(step(1)), StepEvent)
    with stream.reading():
        raise httpx.ReadError("connection reset")  # the connection drops
    assert next(connections) == 0.25  # reopened after the hinted delay, after step 1
    assert stream.request(http, DEFAULT_TIMEOUT).headers["Last-Event-ID"] == "1"
    stream.take(step(2))  # progress: the drops in a row start again
    assert next(connections) == 0.25  # the server closed the stream without the end: one drop
    with pytest.raises(UmiConnectionError, match="dropped 2 times without progress: connection reset"):
        next(connections)  # a second drop in a row without a step: more than max_reconnects

    ending = EventStream(task_id, last_event_id=4, max_reconnects=1, deadline=None, timeout=None)
    connections = ending.connections()
    assert next(connections) == 0.0 and ending.request(http, DEFAULT_TIMEOUT).headers["Last-Event-ID"] == "4"
    end = {"id": str(task_id), "query": "q", "status": "succeeded", "max_steps": 12, "deadline_at": "2026-01-01T00:00:00Z", "steps": []}
    assert isinstance(ending.take(ServerSentEvent(event="end", data=json.dumps(end))), TaskPublic) and ending.ended
    assert list(connections) == []  # nothing is opened after the end
    http.close()


def _lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's stdout, line by line, as it is printed."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout or ()], daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str]) -> str:
    return lines.get(timeout=20)


def test_umi_submit_wait_prints_each_step_as_it_arrives(gateway: ServerThread, postgres_url: str, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TASK["tools"]))
    command = [str(UMI), "submit", str(TASK["query"]), "--tools", str(tools), "--wait", "--gateway", gateway.url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = _lines(process)
    task_id = uuid.UUID(_next_line(lines).removeprefix("task ").removesuffix(" queued"))
    add_step(postgres_url, task_id, 1)
    assert _next_line(lines) == "[1] planner: thought 1"  # printed before the task goes on
    add_step(postgres_url, task_id, 2)
    assert _next_line(lines) == "[2] planner: thought 2"
    finish_task(postgres_url, task_id)
    assert process.wait(20) == 0, process.stderr.read() if process.stderr else ""
    assert [_next_line(lines) for _ in range(3)] == ["[3] summarizer: It is valid.", "status: succeeded (answered)", "answer: It is valid."]

    cancelled = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = _lines(cancelled)
    task_id = uuid.UUID(_next_line(lines).removeprefix("task ").removesuffix(" queued"))
    assert httpx.post(f"{gateway.url}/v1/tasks/{task_id}/cancel", timeout=10).status_code == 200
    assert cancelled.wait(20) == 1
    assert [_next_line(lines) for _ in range(2)] == ["status: cancelled (cancelled)", "error: cancelled by request"]


def test_umi_submit_sends_the_api_key_and_exits_2_when_refused(postgres_url: str, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TASK["tools"]))
    with session_scope(get_engine(postgres_url)) as session:
        key = create_api_key(session=session, tenant_name=f"cli-{uuid.uuid4().hex[:6]}").key
    with start_gateway(gateway_settings(postgres_url, auth=True)) as server:
        command = [str(UMI), "submit", str(TASK["query"]), "--tools", str(tools), "--gateway", server.url]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "the gateway refused the task (401)" in refused.stderr
        with_option = subprocess.run([*command, "--api-key", key], capture_output=True, text=True, timeout=30)
        assert with_option.returncode == 0 and with_option.stdout.startswith("task "), with_option.stderr
        from_env = subprocess.run(command, capture_output=True, text=True, timeout=30, env={**os.environ, "UMI_API_KEY": key})
        assert from_env.returncode == 0, from_env.stderr
        for result in (refused, with_option, from_env):
            assert key not in result.stdout + result.stderr
    unreachable = subprocess.run([*command[:-1], server.url], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 2 and "cannot reach the gateway" in unreachable.stderr


@pytest.fixture(scope="module")
def deployment(rabbitmq_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    system = Deployment(
        rabbitmq_url=rabbitmq_url,
        postgres_url=postgres_url,
        log_dir=tmp_path_factory.mktemp("client-logs"),
        simulator={"data": TRAIN_FILES},
        settings={"events_poll_interval_s": 0.05},
    )
    try:
        system.start_all_workers()
        yield system
    finally:
        system.close()


def test_client_and_umi_submit_follow_a_real_run_through_the_workers(deployment: Deployment, tmp_path: Path) -> None:
    record = load_trajectories()[single_chain_indices()[0]]
    query, turns = record["conversations"][0]["value"], record["conversations"][1:]
    role = {"assistant": "planner", "caller": "caller", "observation": "tools", "conclusion": "summarizer"}
    with UmiClient(deployment.gateway.url) as umi:
        accepted = umi.submit({"query": query, "tools": record["tools"]})
        events = list(umi.events(accepted.id))
    steps, final = events[:-1], events[-1]
    assert isinstance(final, TaskPublic) and final.status == "succeeded" and final.answer == turns[-1]["value"]
    assert [(s.role, s.output) for s in steps[1:]] == [(role[t["from"]], t["value"]) for t in turns]  # type: ignore[union-attr]
    assert all(isinstance(s, StepEvent) and s.started_at is not None and s.latency_ms is not None for s in steps[1:])

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(record["tools"]))
    result = subprocess.run(
        [str(UMI), "submit", query, "--tools", str(tools), "--wait", "--gateway", deployment.gateway.url],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = "".join(f"[{i}] {role[t['from']]}: {t['value']}\n" for i, t in enumerate(turns, start=1))
    assert printed in result.stdout
    assert result.stdout.endswith(f"status: succeeded (answered)\nanswer: {turns[-1]['value']}\n")


def test_the_client_imports_only_the_api_schemas_from_the_product() -> None:
    """``umi_client`` can be read (and one day shipped) alone: of the product it needs only the API's models."""
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for path in (REPO / "umi_client").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    product = {name for name in imported if name and name.split(".")[0] in ("shared", "services", "umi", "evaluation")}
    assert product == {"shared.schemas", "shared.lifecycle"}
