"""A tool call runs once while its worker lives: claims have an owner and a renewed lease.

The claim functions run on PostgreSQL and SQLite; the end-to-end tests run real
``umi worker`` processes on the local RabbitMQ and PostgreSQL, with the SGLang
simulator and a local HTTP tool API (127.0.0.1) reached through the HTTP backend.
The API counts calls per ``Idempotency-Key`` and answers slowly, so calls are in
flight when the test closes a worker's broker connections, kills it, or cancels.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from kombu import Connection, Exchange, Queue
from pydantic import BaseModel
from sqlmodel import Session, select

from services.tools import HttpBackend, NetworkGuard, ToolCatalog, ToolExecutor, VirtualBackend
from services.tools.lease import LeaseKeeper, owner_pid
from services.tools.models import idempotency_key
from shared import crud
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope, upgrade_schema
from shared.models import ToolCall, ToolCallStatus
from shared.prompts import ToolDoc
from shared.roles import StepRole
from shared.schemas import TaskCreate
from umi.deployment import Deployment

LEASE_S = 3.0
LLM_ROLES = (StepRole.PLANNER, StepRole.CALLER, StepRole.SUMMARIZER)
TOOL = ToolDoc(Name="slow_call_for_lease_probe", function="A slow API that counts its calls per Idempotency-Key.", input={})


# --------------------------------------------------------------------------- the tool API


class ApiCall(BaseModel):
    key: str | None
    started: float
    finished: float | None = None


class ToolApi:
    """A slow HTTP API that records every call with its ``Idempotency-Key``."""

    def __init__(self) -> None:
        self.calls: list[ApiCall] = []
        self.delay_s = 0.1
        #: Delay of a key's first call, when it should differ (a call that will be cut short).
        self.first_delay_s: float | None = None
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/slow")
        async def slow(request: Request) -> dict[str, Any]:
            key = request.headers.get("idempotency-key")
            with self.lock:
                first = all(call.key != key for call in self.calls)
                call = ApiCall(key=key, started=time.time())
                self.calls.append(call)
            await asyncio.sleep(self.first_delay_s if first and self.first_delay_s is not None else self.delay_s)
            call.finished = time.time()
            return {"done": key}

        @app.post("/virtual")
        async def virtual(request: Request) -> dict[str, Any]:
            with self.lock:
                self.calls.append(ApiCall(key=request.headers.get("idempotency-key"), started=time.time(), finished=time.time()))
            return {"error": "", "response": "virtual ok"}

        return app

    def keys(self) -> list[str | None]:
        with self.lock:
            return [call.key for call in self.calls]

    def calls_for(self, key: str) -> list[ApiCall]:
        with self.lock:
            return [call for call in self.calls if call.key == key]


@pytest.fixture(scope="module")
def tool_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ToolApi, Path]]:
    api = ToolApi()
    with ServerThread(api.app()) as server:
        catalog = tmp_path_factory.mktemp("lease-catalog")
        (catalog / "Testing").mkdir()
        spec = {"tool_name": "Lease Probe", "api_list": [{"name": "Slow call", "url": server.url + "/slow", "method": "GET"}]}
        (catalog / "Testing" / "lease_probe.json").write_text(json.dumps(spec))
        assert ToolCatalog.load(catalog).get(TOOL.Name) is not None
        yield api, catalog


# --------------------------------------------------------------------------- claims and leases


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return postgres_url
    url = f"sqlite:///{tmp_path}/lease.db"
    upgrade_schema(url)
    return url


def _new_task(database_url: str) -> uuid.UUID:
    with session_scope(get_engine(database_url)) as session:
        task = crud.create_task(session=session, task_in=TaskCreate(query="q", tools=[TOOL]), max_steps=12, timeout_s=60, constrained=True)
        return task.id


def test_a_claim_is_taken_over_only_when_its_lease_lapsed(database_url: str) -> None:
    engine = get_engine(database_url)
    task_id = _new_task(database_url)

    def claim(owner: str, lease_s: float = 0.5) -> crud.ToolCallClaim:
        with session_scope(engine) as session:
            return crud.claim_tool_call(
                session=session, task_id=task_id, step_index=3, tool_name=TOOL.Name, arguments="{}", owner=owner, lease_s=lease_s
            )

    first = claim("a")
    assert first.state is crud.ClaimState.ACQUIRED and first.runs_here and first.call.owner == "a"
    held = claim("b")
    assert held.state is crud.ClaimState.HELD and not held.runs_here and 0 < held.lease_left_s <= 0.5
    time.sleep(held.lease_left_s + 0.05)
    taken = claim("b")
    assert taken.state is crud.ClaimState.TAKEN_OVER and (taken.call.owner, taken.call.attempts) == ("b", 2)
    assert claim("c").state is crud.ClaimState.HELD

    # Renewal extends only the leases their owners still hold.
    assert first.call.id is not None
    with session_scope(engine) as session:
        renewed = crud.renew_tool_call_leases(session=session, held={first.call.id: "a"}, lease_s=60)
    assert renewed == set()
    with session_scope(engine) as session:
        renewed = crud.renew_tool_call_leases(session=session, held={first.call.id: "b"}, lease_s=60)
    assert renewed == {first.call.id}
    assert 59 < claim("c").lease_left_s <= 60

    with session_scope(engine) as session:
        row = session.exec(select(ToolCall).where(ToolCall.task_id == task_id)).one()
        row.status = ToolCallStatus.COMPLETED
    assert claim("d").state is crud.ClaimState.COMPLETED


def test_the_lease_keeper_renews_held_claims_until_released(postgres_url: str) -> None:
    engine = get_engine(postgres_url)
    task_id = _new_task(postgres_url)
    with session_scope(engine) as session:
        call = crud.claim_tool_call(
            session=session, task_id=task_id, step_index=3, tool_name=TOOL.Name, arguments="{}", owner="keeper", lease_s=1.5
        ).call

    def lease_left() -> float:
        with Session(engine) as session:
            row = session.exec(select(ToolCall).where(ToolCall.id == call.id)).one()
            assert row.lease_expires_at is not None
            return (row.lease_expires_at - crud.database_now(session)).total_seconds()

    keeper = LeaseKeeper(engine, lease_s=1.5)
    try:
        with keeper.hold(call):
            deadline = time.monotonic() + 3.5  # over two leases: unrenewed, it would have lapsed
            while time.monotonic() < deadline:
                assert lease_left() > 0
                time.sleep(0.05)
        _wait_for(lambda: lease_left() <= 0, 5, "the released lease to lapse")
    finally:
        keeper.close()


# --------------------------------------------------------------------------- Idempotency-Key


def test_http_and_virtual_backends_send_the_idempotency_key(tool_api: tuple[ToolApi, Path]) -> None:
    api, catalog_dir = tool_api
    api.delay_s = 0.0
    catalog = ToolCatalog.load(catalog_dir)
    guard = NetworkGuard(["127.0.0.1"])
    virtual_url = catalog.get(TOOL.Name).spec.url.replace("/slow", "/virtual")  # type: ignore[union-attr]
    other = ToolDoc(Name="anything_for_elsewhere", function="", input={})
    key = idempotency_key(uuid.uuid4(), 3)
    with ToolExecutor([HttpBackend(catalog, guard=guard), VirtualBackend(virtual_url, guard=guard)]) as executor:
        assert executor.execute(TOOL.Name, "{}", [TOOL], idempotency_key=key).ok
        assert executor.execute(other.Name, "{}", [other], idempotency_key=key).ok
        assert executor.execute(TOOL.Name, "{}", [TOOL]).ok
    assert api.keys()[-3:] == [key, key, None]


def test_the_idempotency_key_is_stable_per_task_and_step_and_opaque() -> None:
    task = uuid.uuid4()
    key = idempotency_key(task, 3)
    assert key == idempotency_key(uuid.UUID(str(task)), 3)
    assert len({key, idempotency_key(task, 7), idempotency_key(uuid.uuid4(), 3)}) == 3
    assert uuid.UUID(key).version == 5 and str(task) not in key


# --------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def system(rabbitmq_url: str, postgres_url: str, tool_api: tuple[ToolApi, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _, catalog = tool_api
    deployment = Deployment(
        rabbitmq_url=rabbitmq_url,
        postgres_url=postgres_url,
        log_dir=tmp_path_factory.mktemp("lease-logs"),
        settings={
            "tools_http_catalog": catalog,
            "tools_allow_hosts": "127.0.0.1",
            "tools_lease_s": LEASE_S,
            "tools_timeout_s": 30,
            "tools_max_retries": 0,
        },
    )
    try:
        for role in LLM_ROLES:  # all at once, then wait for each
            deployment.start_worker(role, wait=False)
        for role in LLM_ROLES:
            deployment.wait_for_consumers(role, at_least=1, process=deployment.workers[role])
        yield deployment
    finally:
        deployment.close()


class ToolsWorkers:
    """The module's ``umi worker tools`` processes; a test asks for as many as it needs alive."""

    def __init__(self, system: Deployment) -> None:
        self.system = system
        self.processes: list[subprocess.Popen[bytes]] = []

    def alive(self, n: int) -> list[subprocess.Popen[bytes]]:
        """``n`` live, consuming tools workers (restarting what an earlier test killed)."""
        self.processes = [process for process in self.processes if process.poll() is None]
        while len(self.processes) < n:  # the deployment stops them all at its close
            self.processes.append(self.system.start_worker(StepRole.TOOLS, concurrency=8, wait=False))
        self.system.wait_for_consumers(StepRole.TOOLS, at_least=n)
        return self.processes[:n]


@pytest.fixture(scope="module")
def tools_workers(system: Deployment) -> ToolsWorkers:
    return ToolsWorkers(system)


def _wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def _claims(system: Deployment, task_ids: list[str]) -> dict[str, ToolCall]:
    with Session(get_engine(system.settings.database_url)) as session:
        rows = session.exec(select(ToolCall).where(ToolCall.task_id.in_([uuid.UUID(t) for t in task_ids]))).all()  # type: ignore[attr-defined]
        return {str(row.task_id): row for row in rows}


def _submit(system: Deployment, n: int) -> list[str]:
    return [system.submit(f"Please run the lease probe ({uuid.uuid4().hex[:8]}).", [TOOL.model_dump()]) for _ in range(n)]


def _broker_connections_of(pid: int) -> list[str]:
    """RabbitMQ's ids of the connections process ``pid`` holds (matched by its sockets' local ports)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "peer_port"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    connections = []
    for line in listing.stdout.splitlines():
        connection, _, port = line.rpartition("\t")
        if port.strip().isdigit() and int(port) in ports:
            connections.append(connection)
    return connections


def test_a_live_worker_that_loses_its_broker_connection_still_runs_each_call_once(
    system: Deployment, tools_workers: ToolsWorkers, tool_api: tuple[ToolApi, Path]
) -> None:
    api, _ = tool_api
    api.delay_s, api.first_delay_s = 6.0, None
    workers = tools_workers.alive(2)
    task_ids = _submit(system, 6)
    keys = {task_id: idempotency_key(uuid.UUID(task_id), 3) for task_id in task_ids}
    _wait_for(lambda: len(_claims(system, task_ids)) == 6 and all(api.calls_for(k) for k in keys.values()), 30, "six calls in flight")
    in_flight = _claims(system, task_ids)
    victim = owner_pid(next(iter(in_flight.values())).owner or "")
    victims_calls = {task for task, claim in in_flight.items() if owner_pid(claim.owner or "") == victim}
    assert victim in {w.pid for w in workers} and victims_calls

    connections = _broker_connections_of(victim)
    assert connections, "the worker holds broker connections"
    closers = [subprocess.Popen(["rabbitmqctl", "close_connection", c, "test: connection lost"]) for c in connections]
    assert all(closer.wait(60) == 0 for closer in closers)

    tasks = {task_id: system.wait(task_id, timeout_s=60) for task_id in task_ids}
    assert {task["status"] for task in tasks.values()} == {"succeeded"}
    for task_id, task in tasks.items():
        assert [step["role"] for step in task["steps"]].count("tools") == 1
        assert len(api.calls_for(keys[task_id])) == 1, f"task {task_id}: the API was called more than once"
    claims = _claims(system, task_ids)
    for task_id in victims_calls:  # the cut-off worker finished its own calls; nobody took them over
        assert (owner_pid(claims[task_id].owner or ""), claims[task_id].attempts) == (victim, 1)
        assert claims[task_id].status == ToolCallStatus.COMPLETED
    assert all(w.poll() is None for w in workers)
    # The broker did hand the cut-off worker's messages out again, and those copies waited.
    logs = "".join(path.read_text() for path in system.log_dir.glob("worker-tools-*.log"))
    assert all(f"task {task_id} step 3: tool call held by a live worker" in logs for task_id in victims_calls)


def test_a_killed_owner_s_call_is_taken_over_after_its_lease_with_the_same_idempotency_key(
    system: Deployment, tools_workers: ToolsWorkers, tool_api: tuple[ToolApi, Path]
) -> None:
    api, _ = tool_api
    api.delay_s, api.first_delay_s = 0.1, 5.0
    workers = tools_workers.alive(2)
    (task_id,) = _submit(system, 1)
    key = idempotency_key(uuid.UUID(task_id), 3)
    _wait_for(lambda: task_id in _claims(system, [task_id]) and api.calls_for(key), 30, "the tool call in flight")
    owner = _claims(system, [task_id])[task_id].owner or ""
    (victim,) = [w for w in workers if w.pid == owner_pid(owner)]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    lease_expires_at = _claims(system, [task_id])[task_id].lease_expires_at  # nobody renews it now
    assert lease_expires_at is not None

    task = system.wait(task_id, timeout_s=60)
    assert task["status"] == "succeeded"
    assert [step["role"] for step in task["steps"]] == ["user", "planner", "caller", "tools", "planner", "summarizer"]
    assert task["steps"][3]["output"] == json.dumps({"done": key}, separators=(",", ":"))
    _, second = api.calls_for(key)  # the same Idempotency-Key, twice: the dead owner's and the takeover
    assert second.started >= (lease_expires_at - timedelta(seconds=0.05)).timestamp(), "taken over before the lease lapsed"
    claim = _claims(system, [task_id])[task_id]
    (survivor,) = [w for w in workers if w is not victim]
    assert (claim.status, claim.attempts, owner_pid(claim.owner or "")) == (ToolCallStatus.COMPLETED, 2, survivor.pid)


def test_a_task_cancelled_during_its_tool_call_stores_no_observation_and_sends_nothing(
    system: Deployment, tools_workers: ToolsWorkers, tool_api: tuple[ToolApi, Path]
) -> None:
    api, _ = tool_api
    api.delay_s, api.first_delay_s = 4.0, None
    tools_workers.alive(2)
    with _planner_jobs_spy(system) as planner_jobs:
        (task_id,) = _submit(system, 1)
        key = idempotency_key(uuid.UUID(task_id), 3)
        _wait_for(lambda: api.calls_for(key), 30, "the tool call in flight")
        response = system.http.post(f"/v1/tasks/{task_id}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert api.calls_for(key)[0].finished is None, "the call was still running at the cancel"

        done = f"task {task_id} step 3 (tools): task_ended"
        _wait_for(lambda: any(done in p.read_text() for p in system.log_dir.glob("worker-tools-*.log")), 30, "the tools job to end")
        claim = _claims(system, [task_id])[task_id]
        assert (claim.status, claim.ok) == (ToolCallStatus.COMPLETED, True)
        assert len(api.calls_for(key)) == 1 and api.calls_for(key)[0].finished is not None
        task = system.get(task_id)
        assert (task["status"], task["end_reason"]) == ("cancelled", "cancelled")
        assert [step["role"] for step in task["steps"]] == ["user", "planner", "caller"]
        assert [job["step_index"] for job in planner_jobs() if job["task_id"] == task_id] == [1], "a follow-up job was sent"


@contextmanager
def _planner_jobs_spy(system: Deployment) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """A queue bound like the planner queue: every planner job published meanwhile also lands here."""
    exchange = Exchange(system.topology.exchange.name, type="topic", passive=True)
    spy = Queue(f"spy-{uuid.uuid4().hex[:8]}", exchange, routing_key=system.topology.queue_name(StepRole.PLANNER), durable=False)
    with Connection(system.settings.broker_url) as connection:
        bound = spy(connection.default_channel)
        bound.declare()

        def jobs() -> list[dict[str, Any]]:
            received = []
            while (message := bound.get(no_ack=True)) is not None:
                args, _kwargs, _embed = json.loads(message.body)
                received.append(args[0])
            return received

        try:
            yield jobs
        finally:
            bound.delete()
