"""The gateway's HTTP API against real PostgreSQL (and RabbitMQ where it publishes): tenants, keys, limits,
idempotency, listing, readiness, and the step timings of a real run.

Each test makes its own tenants (unique names), so the tests share the session's database.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from services.gateway.app import create_app
from shared import tenants
from shared.asgi import ServerThread, free_port
from shared.db import get_engine, session_scope
from shared.models import Task
from shared.pipeline import Runtime
from shared.roles import StepRole
from shared.settings import Settings, load_settings
from tests.conftest import TRAJECTORIES, load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, run_to_end
from tests.tcp_proxy import TcpProxy
from umi.embedded import embedded_settings

TOOLS = [{"Name": "lookup", "function": "Look a word up.", "input": {"word": "string, the word"}}]


def a_task(query: str = "What does idempotent mean?") -> dict[str, Any]:
    return {"query": query, "tools": TOOLS}


def issue_key(database_url: str, tenant: str | None = None, **limits: float) -> str:
    """A new API key for ``tenant`` (a fresh tenant by default), with the given limits on the tenant."""
    with session_scope(get_engine(database_url)) as session:
        issued = tenants.create_api_key(
            session=session, tenant_name=tenant or f"t-{uuid.uuid4().hex[:10]}", limits=tenants.TenantLimits(**limits)
        )
    return issued.key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def auth_settings(postgres_url: str, rabbitmq_url: str, **overrides: object) -> Settings:
    return load_settings(database_url=postgres_url, broker_url=rabbitmq_url, auth=True, **overrides)


@pytest.fixture(scope="module")
def settings(postgres_url: str, rabbitmq_url: str) -> Settings:
    return auth_settings(postgres_url, rabbitmq_url)


@pytest.fixture(scope="module")
def dispatcher() -> CollectingDispatcher:
    return CollectingDispatcher()


@pytest.fixture(scope="module")
def client(settings: Settings, dispatcher: CollectingDispatcher) -> Iterator[TestClient]:
    with TestClient(create_app(settings, dispatcher=dispatcher)) as test_client:
        yield test_client


def stored_tasks(database_url: str, key: str) -> int:
    with Session(get_engine(database_url)) as session:
        return session.exec(select(func.count()).select_from(Task).where(Task.idempotency_key == key)).one()


# --- idempotency ---------------------------------------------------------------------------------------


def test_a_retried_request_with_the_same_idempotency_key_returns_the_same_task(
    client: TestClient, postgres_url: str, dispatcher: CollectingDispatcher
) -> None:
    key, idem = issue_key(postgres_url), f"order-{uuid.uuid4()}"
    published = len(dispatcher.jobs)
    first = client.post("/v1/tasks", json=a_task(), headers={**bearer(key), "Idempotency-Key": idem})
    again = client.post("/v1/tasks", json=a_task(), headers={**bearer(key), "Idempotency-Key": idem})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert stored_tasks(postgres_url, idem) == 1
    assert len(dispatcher.jobs) == published + 1  # the replay published nothing

    changed = client.post("/v1/tasks", json=a_task("Something else"), headers={**bearer(key), "Idempotency-Key": idem})
    assert changed.status_code == 409
    assert idem in changed.json()["detail"]

    # Another tenant's identical key is its own task.
    other = client.post("/v1/tasks", json=a_task(), headers={**bearer(issue_key(postgres_url)), "Idempotency-Key": idem})
    assert other.status_code == 202 and "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
    assert stored_tasks(postgres_url, idem) == 2


def test_concurrent_duplicates_over_the_network_make_one_task_published_once(
    postgres_url: str, rabbitmq_url: str
) -> None:
    """Real uvicorn, real RabbitMQ publishing: eight copies at once, one task."""
    settings = auth_settings(postgres_url, rabbitmq_url)
    key, idem = issue_key(postgres_url), f"burst-{uuid.uuid4()}"
    answers: list[httpx.Response] = []
    with ServerThread(create_app(settings)) as server:  # publishes through Celery to the test vhost

        def post() -> None:
            with httpx.Client(base_url=server.url, timeout=httpx.Timeout(20.0, connect=5.0)) as http:
                answers.append(http.post("/v1/tasks", json=a_task(), headers={**bearer(key), "Idempotency-Key": idem}))

        threads = [threading.Thread(target=post) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [answer.status_code for answer in answers] == [202] * 8
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert sorted(answer.headers.get("Idempotent-Replayed", "") for answer in answers) == [""] + ["true"] * 7
    assert stored_tasks(postgres_url, idem) == 1
    with Session(get_engine(postgres_url)) as session:
        task = session.exec(select(Task).where(Task.idempotency_key == idem)).one()
    assert task.status == "queued"  # published once, accepted by the broker, not failed


@pytest.mark.parametrize(
    "bad", ["", "has space", "x" * 256, "tab\there", "é".encode()], ids=["empty", "space", "256", "tab", "non-ascii"]
)
def test_an_invalid_idempotency_key_is_a_422_naming_the_header(client: TestClient, postgres_url: str, bad: str | bytes) -> None:
    response = client.post("/v1/tasks", json=a_task(), headers={**bearer(issue_key(postgres_url)), "Idempotency-Key": bad})
    assert response.status_code == 422
    assert "Idempotency-Key" in response.text


# --- tenants and keys ----------------------------------------------------------------------------------


def test_a_tenant_sees_only_its_own_tasks(client: TestClient, postgres_url: str) -> None:
    alice, bob = issue_key(postgres_url), issue_key(postgres_url)
    task_id = client.post("/v1/tasks", json=a_task(), headers=bearer(alice)).json()["id"]
    assert client.get(f"/v1/tasks/{task_id}", headers=bearer(alice)).status_code == 200
    assert client.get(f"/v1/tasks/{task_id}", headers=bearer(bob)).status_code == 404
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(bob)).status_code == 404
    assert client.get("/v1/tasks", headers=bearer(bob)).json()["items"] == []
    assert [item["id"] for item in client.get("/v1/tasks", headers=bearer(alice)).json()["items"]] == [task_id]
    # Bob's cancel changed nothing; Alice's own cancel works.
    assert client.get(f"/v1/tasks/{task_id}", headers=bearer(alice)).json()["status"] == "queued"
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(alice)).json()["status"] == "cancelled"


def test_missing_unknown_and_revoked_keys_are_401_with_www_authenticate(
    client: TestClient, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = issue_key(postgres_url)
    with caplog.at_level(logging.DEBUG):
        assert client.get("/v1/tasks", headers=bearer(key)).status_code == 200
        with session_scope(get_engine(postgres_url)) as session:
            assert tenants.revoke_api_key(session=session, key_or_id=key) is not None
        for headers in ({}, bearer("umi_not-a-key"), {"Authorization": "Basic Zm9vOmJhcg=="}, bearer(key)):
            for response in (client.get("/v1/tasks", headers=headers), client.post("/v1/tasks", json=a_task(), headers=headers)):
                assert response.status_code == 401, headers
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert key not in response.text
    assert caplog.records and key not in caplog.text  # refused from the next request on, and never logged


def test_umi_up_runs_without_keys_and_says_so_while_the_default_requires_them(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    embedded, _ = embedded_settings(environ={}, database_url=postgres_url)
    assert embedded.auth is False
    with caplog.at_level(logging.WARNING, logger="services.gateway.app"):
        with TestClient(create_app(embedded, dispatcher=CollectingDispatcher())) as open_client:
            assert open_client.post("/v1/tasks", json=a_task()).status_code == 202
    assert any("UMI_AUTH=off" in record.getMessage() for record in caplog.records)

    monkeypatch.delenv("UMI_AUTH")  # what `umi gateway` gets without UMI_AUTH
    caplog.clear()
    default = load_settings(database_url=postgres_url)
    assert default.auth is True
    with TestClient(create_app(default, dispatcher=CollectingDispatcher())) as closed_client:
        assert closed_client.post("/v1/tasks", json=a_task()).status_code == 401
    assert not any("UMI_AUTH=off" in record.getMessage() for record in caplog.records)


# --- limits ----------------------------------------------------------------------------------------------


def test_the_request_rate_is_one_bucket_shared_by_two_gateways(postgres_url: str, rabbitmq_url: str) -> None:
    settings = auth_settings(postgres_url, rabbitmq_url)
    key = issue_key(postgres_url, rate_per_s=0.2, burst=3)  # 3 at once, then one every 5 s
    with (
        TestClient(create_app(settings, dispatcher=CollectingDispatcher())) as first,
        TestClient(create_app(settings, dispatcher=CollectingDispatcher())) as second,
    ):
        answers = [gateway.get("/v1/tasks", headers=bearer(key)) for gateway in (first, second, first, second, first)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429]
    for refused in answers[3:]:
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        assert "rate" in refused.json()["detail"]


def test_tasks_in_flight_over_the_limit_are_429_but_a_replay_is_not(client: TestClient, postgres_url: str) -> None:
    key = issue_key(postgres_url, max_in_flight=2)
    accepted = [
        client.post("/v1/tasks", json=a_task(), headers={**bearer(key), "Idempotency-Key": f"k{n}"}) for n in range(2)
    ]
    assert [answer.status_code for answer in accepted] == [202, 202]
    refused = client.post("/v1/tasks", json=a_task(), headers=bearer(key))
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "in flight" in refused.json()["detail"]
    replay = client.post("/v1/tasks", json=a_task(), headers={**bearer(key), "Idempotency-Key": "k0"})
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    # A task that ends frees its place.
    assert client.post(f"/v1/tasks/{accepted[0].json()['id']}/cancel", headers=bearer(key)).status_code == 200
    assert client.post("/v1/tasks", json=a_task(), headers=bearer(key)).status_code == 202


def test_submissions_racing_at_the_in_flight_limit_cannot_pass_it_together(postgres_url: str, rabbitmq_url: str) -> None:
    """Twelve concurrent POSTs over two gateway replicas against a limit of three: exactly three tasks."""
    settings = auth_settings(postgres_url, rabbitmq_url)
    key = issue_key(postgres_url, max_in_flight=3)
    answers: list[httpx.Response] = []
    with ServerThread(create_app(settings)) as one, ServerThread(create_app(settings)) as two:

        def post(url: str) -> None:
            with httpx.Client(base_url=url, timeout=httpx.Timeout(20.0, connect=5.0)) as http:
                answers.append(http.post("/v1/tasks", json=a_task(), headers=bearer(key)))

        threads = [threading.Thread(target=post, args=(server.url,)) for server in [one, two] * 6]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(answer.status_code for answer in answers) == [202] * 3 + [429] * 9
    with Session(get_engine(postgres_url)) as session:
        tenant_id = session.exec(select(Task.tenant_id).where(Task.id == uuid.UUID(next(a for a in answers if a.status_code == 202).json()["id"]))).one()
        assert len(session.exec(select(Task).where(Task.tenant_id == tenant_id)).all()) == 3


# --- listing ---------------------------------------------------------------------------------------------


def test_paging_lists_each_task_once_newest_first_even_with_inserts_between_pages(client: TestClient, postgres_url: str) -> None:
    key = issue_key(postgres_url)
    created = [client.post("/v1/tasks", json=a_task(f"q{n}"), headers=bearer(key)).json()["id"] for n in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/tasks", params=params, headers=bearer(key))
        assert page.status_code == 200
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
        client.post("/v1/tasks", json=a_task("arrives between pages"), headers=bearer(key))  # sorts before the cursor
    assert seen == created[::-1]


def test_listing_filters_by_status(client: TestClient, postgres_url: str) -> None:
    key = issue_key(postgres_url)
    ids = [client.post("/v1/tasks", json=a_task(), headers=bearer(key)).json()["id"] for _ in range(4)]
    for task_id in ids[1:3]:
        client.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(key))
    cancelled = client.get("/v1/tasks", params={"status": "cancelled"}, headers=bearer(key)).json()
    queued = client.get("/v1/tasks", params={"status": "queued"}, headers=bearer(key)).json()
    assert {item["id"] for item in cancelled["items"]} == set(ids[1:3])
    assert {item["id"] for item in queued["items"]} == {ids[0], ids[3]}
    assert all(item["status"] == "cancelled" for item in cancelled["items"])
    assert cancelled["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
        ({"cursor": "%%%"}, "cursor"),
        ({"status": "sleeping"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
    ],
)
def test_a_bad_listing_query_is_a_422_naming_the_parameter(
    client: TestClient, postgres_url: str, params: dict[str, Any], named: str
) -> None:
    response = client.get("/v1/tasks", params=params, headers=bearer(issue_key(postgres_url)))
    assert response.status_code == 422
    assert ["query", named] in [error["loc"] for error in response.json()["detail"]]


# --- readiness -------------------------------------------------------------------------------------------


def test_readyz_is_ready_when_database_and_broker_answer(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_503_naming_an_unreachable_broker(postgres_url: str) -> None:
    closed = free_port("127.0.0.1")  # nothing listens there
    settings = load_settings(database_url=postgres_url, broker_url=f"amqp://guest:guest@127.0.0.1:{closed}//", auth=True)
    with TestClient(create_app(settings, dispatcher=CollectingDispatcher())) as gateway:
        started = time.monotonic()
        response = gateway.get("/readyz")
        assert time.monotonic() - started < 5
        assert gateway.get("/healthz").status_code == 200  # the process is alive
    assert response.status_code == 503
    assert "broker" in response.json()["detail"] and "database" not in response.json()["detail"]
    assert "guest:guest" not in response.text


@contextmanager
def database_through(proxy: TcpProxy, postgres_url: str) -> Iterator[str]:
    """``postgres_url`` rerouted through ``proxy``."""
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    url = postgres_url.replace(host_port, f"127.0.0.1:{proxy.port}")
    yield url
    get_engine(url).dispose()


def test_readyz_is_503_naming_an_unreachable_database(postgres_url: str, rabbitmq_url: str) -> None:
    with TcpProxy("127.0.0.1", 5432) as proxy, database_through(proxy, postgres_url) as proxied_url:
        settings = auth_settings(proxied_url, rabbitmq_url)
        with TestClient(create_app(settings, dispatcher=CollectingDispatcher())) as gateway:
            assert gateway.get("/readyz").status_code == 200
            proxy.cut()
            started = time.monotonic()
            response = gateway.get("/readyz")
            assert time.monotonic() - started < 5
            proxy.restore()
            assert gateway.get("/readyz").status_code == 200  # back once the database is
    assert response.status_code == 503
    assert "database" in response.json()["detail"] and "broker" not in response.json()["detail"]


# --- a real run's step timings ---------------------------------------------------------------------------


def test_a_finished_task_shows_each_step_s_start_latency_and_token_usage(
    client: TestClient, postgres_url: str, simulator_url: str
) -> None:
    """The task goes in over HTTP; its jobs run through the real handlers (PostgreSQL, the simulator)."""
    record = load_trajectories()[2]
    key = issue_key(postgres_url)
    body = {"query": record["conversations"][0]["value"], "tools": record["tools"], "max_steps": 12}
    task_id = client.post("/v1/tasks", json=body, headers=bearer(key)).json()["id"]
    run_settings = load_settings(
        database_url=postgres_url,
        planner_llm_url=simulator_url,
        caller_llm_url=simulator_url,
        summarizer_llm_url=simulator_url,
        tools_mirror=TRAJECTORIES,
    )
    jobs = CollectingDispatcher()
    run_to_end(Runtime(settings=run_settings, dispatcher=jobs), jobs, uuid.UUID(task_id))

    task = client.get(f"/v1/tasks/{task_id}", headers=bearer(key)).json()
    assert task["status"] == "succeeded"
    produced = task["steps"][1:]
    assert {step["role"] for step in produced} == {"planner", "caller", "tools", "summarizer"}
    for step in produced:
        assert step["started_at"] is not None and step["started_at"] <= step["created_at"], step
        assert step["latency_ms"] is not None and step["latency_ms"] >= 0, step
        if step["role"] != StepRole.TOOLS:
            assert step["prompt_tokens"] > 0 and step["completion_tokens"] > 0, step
    assert task["steps"][0]["role"] == "user"

