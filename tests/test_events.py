"""``GET /v1/tasks/{id}/events``: server-sent events from the database, resumable with ``Last-Event-ID``.

A real gateway over HTTP on the session's PostgreSQL; steps are written to the database
directly, as a worker's transaction would, so the test controls when each appears.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from prometheus_client import REGISTRY

from services.gateway.app import create_app
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.schemas import StepEvent, TaskPublic
from shared.tenants import create_api_key
from tests.pipeline_helpers import CollectingDispatcher
from tests.stored_steps import TASK, add_step, finish_task, gateway_settings, start_gateway
from tests.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def gateway(postgres_url: str) -> Iterator[ServerThread]:
    with start_gateway(gateway_settings(postgres_url)) as server:
        yield server


@pytest.fixture
def http(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(10.0)) as client:
        yield client


def _submit(http: httpx.Client) -> uuid.UUID:
    response = http.post("/v1/tasks", json=TASK)
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["id"])


def _events(http: httpx.Client, task_id: uuid.UUID, *, last_event_id: str | None = None, limit: int | None = None) -> list[ServerSentEvent]:
    """The ``step``/``end`` events of one connection (at most ``limit``; then the connection is dropped)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    received: list[ServerSentEvent] = []
    with connect_sse(http, "GET", f"/v1/tasks/{task_id}/events", headers=headers) as source:
        assert source.response.status_code == 200
        for event in source.iter_sse():
            if event.event in ("step", "end"):
                received.append(event)
                if limit is not None and len(received) == limit:
                    break
    return received


def test_every_step_then_end_with_the_same_json_as_get_and_the_stream_closes(http: httpx.Client, postgres_url: str) -> None:
    task_id = _submit(http)

    def produce() -> None:
        for index in (1, 2, 3):
            time.sleep(0.15)
            add_step(postgres_url, task_id, index)
        time.sleep(0.15)
        finish_task(postgres_url, task_id)

    producer = threading.Thread(target=produce)
    producer.start()
    events = _events(http, task_id)  # returns only when the server closes the stream
    producer.join()
    assert [(e.event, e.id) for e in events] == [("step", "0"), ("step", "1"), ("step", "2"), ("step", "3"), ("step", "4"), ("end", "5")]
    steps = [StepEvent.model_validate_json(e.data) for e in events[:-1]]
    assert [s.index for s in steps] == [0, 1, 2, 3, 4] and {s.task_id for s in steps} == {task_id}
    assert steps[0].output == TASK["query"] and steps[2].output == "thought 2" and steps[2].latency_ms == 250.0
    final = http.get(f"/v1/tasks/{task_id}").json()
    assert final["status"] == "succeeded"
    assert TaskPublic.model_validate_json(events[-1].data).model_dump(mode="json", by_alias=True) == final
    assert '"next":' in events[-1].data  # the same field names as GET


def test_reconnecting_with_last_event_id_resumes_exactly_while_the_task_runs(http: httpx.Client, postgres_url: str) -> None:
    task_id = _submit(http)
    add_step(postgres_url, task_id, 1)
    add_step(postgres_url, task_id, 2)
    first = _events(http, task_id, limit=2)  # steps 0 and 1, then the client drops the connection
    assert [e.id for e in first] == ["0", "1"]
    add_step(postgres_url, task_id, 3)  # stored while nobody listens

    def produce() -> None:
        time.sleep(0.3)
        add_step(postgres_url, task_id, 4)
        time.sleep(0.2)
        finish_task(postgres_url, task_id)

    producer = threading.Thread(target=produce)
    producer.start()
    rest = _events(http, task_id, last_event_id=first[-1].id)
    producer.join()
    assert [(e.event, e.id) for e in rest] == [("step", "2"), ("step", "3"), ("step", "4"), ("step", "5"), ("end", "6")]
    seen = [StepEvent.model_validate_json(e.data).index for e in first + rest[:-1]]
    assert seen == list(range(6))  # every step once, in order


def test_an_ended_task_replays_everything_and_a_reconnect_after_end_gets_nothing(http: httpx.Client, postgres_url: str) -> None:
    task_id = _submit(http)
    add_step(postgres_url, task_id, 1)
    finish_task(postgres_url, task_id)
    events = _events(http, task_id)
    assert [(e.event, e.id) for e in events] == [("step", "0"), ("step", "1"), ("step", "2"), ("end", "3")]
    assert _events(http, task_id, last_event_id="3") == []  # after the end: the stream closes at once
    assert [(e.event, e.id) for e in _events(http, task_id, last_event_id="2")] == [("end", "3")]
    cancelled = _submit(http)
    assert http.post(f"/v1/tasks/{cancelled}/cancel").status_code == 200
    ended = _events(http, cancelled)
    assert [e.event for e in ended] == ["step", "end"]
    assert TaskPublic.model_validate_json(ended[-1].data).status == "cancelled"


@pytest.mark.parametrize("bad", ["abc", "-2", "1.5", ""])
def test_a_bad_last_event_id_is_a_422_naming_the_header(http: httpx.Client, bad: str) -> None:
    task_id = _submit(http)
    response = http.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": bad})
    assert response.status_code == 422, response.text
    assert "Last-Event-ID" in response.text  # named, whatever the shape of the 422 body


def _streams_open() -> float:
    return REGISTRY.get_sample_value("umi_event_streams_open") or 0.0


def _until_no_stream_is_open() -> None:
    """Every stream this process served ends soon after its client left (earlier tests' too)."""
    deadline = time.monotonic() + 5
    while _streams_open() != 0:
        assert time.monotonic() < deadline, f"{_streams_open()} streams still open after their clients left"
        time.sleep(0.05)


def test_the_stream_sends_a_retry_hint_and_keep_alives_and_ends_when_the_client_leaves(http: httpx.Client) -> None:
    task_id = _submit(http)  # never runs: the stream waits, sending keep-alives
    _until_no_stream_is_open()
    lines: list[str] = []
    with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        # Keep the line iterator referenced: a dropped one is closed, which closes the connection.
        incoming = response.iter_lines()
        while (line := next(incoming)) != ": keep-alive":
            lines.append(line)
        assert _streams_open() == 1
    assert lines[0] == "retry: 1000"
    assert "event: step" in lines and "id: 0" in lines
    _until_no_stream_is_open()


def test_another_tenants_task_is_404_before_any_stream_and_no_key_is_401(postgres_url: str) -> None:
    engine = get_engine(postgres_url)
    with session_scope(engine) as session:
        alice = create_api_key(session=session, tenant_name=f"alice-{uuid.uuid4().hex[:6]}").key
        bob = create_api_key(session=session, tenant_name=f"bob-{uuid.uuid4().hex[:6]}").key
    with start_gateway(gateway_settings(postgres_url, auth=True)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            accepted = http.post("/v1/tasks", json=TASK, headers={"Authorization": f"Bearer {alice}"})
            assert accepted.status_code == 202, accepted.text
            url = f"/v1/tasks/{accepted.json()['id']}/events"
            as_bob = http.get(url, headers={"Authorization": f"Bearer {bob}"})
            assert as_bob.status_code == 404 and as_bob.headers["content-type"] == "application/json"
            assert http.get(f"/v1/tasks/{uuid.uuid4()}/events", headers={"Authorization": f"Bearer {alice}"}).status_code == 404
            assert http.get(url).status_code == 401
            with connect_sse(http, "GET", url, headers={"Authorization": f"Bearer {alice}"}) as source:
                first = next(e for e in source.iter_sse() if e.event == "step")
            assert StepEvent.model_validate_json(first.data).output == TASK["query"]


def test_the_openapi_document_shows_the_stream_and_json_errors(gateway: ServerThread) -> None:
    route = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()["paths"]["/v1/tasks/{task_id}/events"]["get"]
    media = {status: list(response["content"]) for status, response in route["responses"].items()}
    assert media == {"200": ["text/event-stream"], **{s: ["application/json"] for s in ("401", "404", "422", "429", "503")}}
    assert [p["name"] for p in route["parameters"]] == ["task_id", "Last-Event-ID"]


def test_the_stream_outlives_a_database_outage(postgres_url: str) -> None:
    with TcpProxy("127.0.0.1", 5432) as database:
        proxied_url = postgres_url.replace("127.0.0.1:5432/", f"127.0.0.1:{database.port}/")
        with start_gateway(gateway_settings(proxied_url)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
            task_id = _submit(http)
            received: list[str | None] = []
            with connect_sse(http, "GET", f"/v1/tasks/{task_id}/events") as source:
                for event in source.iter_sse():
                    if event.event not in ("step", "end"):
                        continue
                    received.append(event.id)
                    if event.id == "0":
                        database.cut()  # the gateway's polls fail for a while
                        add_step(postgres_url, task_id, 1)
                        finish_task(postgres_url, task_id)
                        threading.Timer(0.5, database.restore).start()
    assert received == ["0", "1", "2", "3"]  # one connection: the client never noticed


def test_open_streams_do_not_hold_up_a_gateway_shutdown(postgres_url: str) -> None:
    """A stream never ends by itself; stopping the gateway cuts it after the grace period (the client resumes elsewhere)."""
    server = ServerThread(create_app(gateway_settings(postgres_url), dispatcher=CollectingDispatcher()), graceful_shutdown_s=0.5).start()
    http = httpx.Client(base_url=server.url, timeout=10)
    task_id = _submit(http)
    ended = threading.Event()

    def follow() -> None:
        with contextlib.suppress(httpx.TransportError), http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            for _ in response.iter_lines():
                pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.5)
    started = time.monotonic()
    server.stop(timeout_s=10)
    assert time.monotonic() - started < 3 and ended.wait(5)
    http.close()
