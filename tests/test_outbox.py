"""The outbox: a task accepted with 202 is never lost, even while the broker is away.

* the request path publishes the first job once, bounded by ``UMI_PUBLISH_TIMEOUT_S``,
  and marks it enqueued; when the broker refuses or does not answer, the client still
  gets its 202, the task stays ``queued`` with ``enqueued_at`` NULL, and the relay
  publishes its job later — once;
* the relay's outbox pass leaves young tasks to their request path, skips rows another
  relay holds, tasks past their deadline, and marks without publishing a task a worker took;
* end to end: the gateway reaches RabbitMQ through a TCP proxy the test cuts; tasks posted
  meanwhile are accepted, and complete once the proxy is restored; a pika consumer of
  ``umi.events`` then has each task's steps and end, equal to what ``GET`` shows.

Each module gets its own PostgreSQL database, so no other test's tasks meet these relays.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlmodel import Session, col, select

from services.gateway.app import create_app
from shared import crud
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.dispatch import request_path_dispatcher
from shared.lifecycle import TaskStatus
from shared.models import Step, Task, utcnow
from shared.relay import relay_outbox
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.settings import Settings, load_settings
from shared.tasks import publish_first_job
from tests.conftest import TRAIN_FILES, fresh_postgres_database, load_trajectories, single_chain_indices
from tests.pipeline_helpers import CollectingDispatcher
from tests.tcp_proxy import TcpProxy
from tests.test_relay import EventConsumer, until
from umi.deployment import Deployment

TOOL = {"Name": "get_weather_for_weather", "function": "Weather by city.", "input": {"city": "string, "}}
HISTORY = [
    {"from": "assistant", "value": "I should call the tool.\nNext: caller."},
    {"from": "caller", "value": 'Action: get_weather_for_weather\nAction Input: {"city": "Paris"}'},
    {"from": "observation", "value": '{"error": "", "response": "sunny"}'},
]


class RefusingDispatcher:
    """A broker that refuses every publish."""

    def __init__(self) -> None:
        self.attempts = 0

    def dispatch(self, job: StepJob) -> None:
        self.attempts += 1
        raise ConnectionError("broker unreachable")


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with fresh_postgres_database("umi_outbox") as url:
        yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return load_settings(database_url=database_url)


def enqueued_at(settings: Settings, task_id: str | uuid.UUID) -> object:
    with Session(get_engine(settings.database_url)) as session:
        task = crud.get_task(session=session, task_id=uuid.UUID(str(task_id)))
        assert task is not None
        return task.enqueued_at


def test_a_refused_publish_is_still_a_202_and_the_relay_publishes_the_job_once(settings: Settings) -> None:
    refusing = RefusingDispatcher()
    with TestClient(create_app(settings, dispatcher=refusing)) as client:
        response = client.post("/v1/tasks", json={"query": "Weather in Paris?", "tools": [TOOL], "history": HISTORY})
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        assert response.json()["status"] == "queued" and refusing.attempts == 1
        assert client.get(f"/v1/tasks/{task_id}").json()["status"] == "queued"
    assert enqueued_at(settings, task_id) is None

    engine = get_engine(settings.database_url)
    relay = CollectingDispatcher()
    assert relay_outbox(engine, relay, grace_s=0).outbox == 1
    # After the query and the three given turns, the planner speaks at step 4.
    assert relay.jobs == [StepJob(task_id=uuid.UUID(task_id), step_index=4, role=StepRole.PLANNER)]
    assert enqueued_at(settings, task_id) is not None
    assert relay_outbox(engine, relay, grace_s=0).outbox == 0 and len(relay.jobs) == 1


def test_the_request_path_publishes_once_and_marks_so_the_relay_does_not(settings: Settings) -> None:
    dispatcher = CollectingDispatcher()
    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        task_id = client.post("/v1/tasks", json={"query": "Weather in Paris?", "tools": [TOOL]}).json()["id"]
    assert dispatcher.jobs == [StepJob(task_id=uuid.UUID(task_id), step_index=1, role=StepRole.PLANNER)]
    assert enqueued_at(settings, task_id) is not None
    relay = CollectingDispatcher()
    relay_outbox(get_engine(settings.database_url), relay, grace_s=0)
    assert [job.task_id for job in relay.jobs if str(job.task_id) == task_id] == []


def _stored_task(settings: Settings, **changes: object) -> uuid.UUID:
    with session_scope(get_engine(settings.database_url)) as session:
        task = crud.create_task(
            session=session, task_in=TaskCreate.model_validate({"query": "q", "tools": [TOOL]}), max_steps=12, timeout_s=60, constrained=True
        )
        for name, value in changes.items():
            setattr(task, name, value)
        return task.id


def test_the_outbox_pass_leaves_young_locked_overdue_and_taken_tasks_alone(settings: Settings) -> None:
    engine = get_engine(settings.database_url)
    relay_outbox(engine, CollectingDispatcher(), grace_s=0)  # whatever earlier tests left
    young = _stored_task(settings)
    overdue = _stored_task(settings, deadline_at=utcnow() - timedelta(seconds=1))
    taken = _stored_task(settings, status=TaskStatus.RUNNING)
    locked = _stored_task(settings)

    relay = CollectingDispatcher()
    assert relay_outbox(engine, relay, grace_s=60).outbox == 0 and relay.jobs == [], "young tasks are their request path's"
    with Session(engine) as holder:  # another relay (or the request path) holds this row
        holder.exec(select(Task).where(Task.id == locked).with_for_update()).one()
        assert publish_first_job(engine, CollectingDispatcher(), locked) is False
        relay_outbox(engine, relay, grace_s=0)
        assert {job.task_id for job in relay.jobs} == {young}
        holder.rollback()
    relay_outbox(engine, relay, grace_s=0)
    assert [job.task_id for job in relay.jobs] == [young, locked]
    assert enqueued_at(settings, taken) is not None, "a task a worker took is marked, not published"
    assert enqueued_at(settings, overdue) is None, "the deadline sweep ends it; no job is published for it"


def test_a_broker_that_never_answers_holds_a_publish_only_for_the_publish_timeout(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks AMQP
    try:
        settings = load_settings(
            broker_url=f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}//", database_url=f"sqlite:///{tmp_path}/u.db", publish_timeout_s=0.5
        )
        dispatcher = request_path_dispatcher(settings, name="test.silent")
        started = time.monotonic()
        with pytest.raises(Exception):
            dispatcher.dispatch(StepJob(task_id=uuid.uuid4(), step_index=1, role=StepRole.PLANNER))
        assert time.monotonic() - started < 2.0
    finally:
        silent.close()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_tasks_posted_while_the_broker_is_cut_off_are_accepted_and_complete_when_it_returns(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    port = int(rabbitmq_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    records = load_trajectories()
    chosen = single_chain_indices()[:3]
    with fresh_postgres_database("umi_outage") as postgres_url, TcpProxy("127.0.0.1", port) as proxy:
        system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path, simulator={"data": TRAIN_FILES})
        # The gateway under test reaches RabbitMQ only through the proxy; the workers directly.
        system.gateway.stop()
        system.http.close()
        proxied = system.settings.model_copy(
            update={"broker_url": rabbitmq_url.replace(f":{port}/", f":{proxy.port}/"), "publish_timeout_s": 1.0}
        )
        system.gateway = ServerThread(create_app(proxied)).start()
        system.http = httpx.Client(base_url=system.gateway.url, timeout=30)
        events = EventConsumer(system.settings, "task.#")  # straight to RabbitMQ, as another backend
        try:
            system.start_all_workers()
            published = _sample("umi_relay_published_total", kind="outbox")
            proxy.cut()
            task_ids = []
            for index in chosen:
                started = time.monotonic()
                task_ids.append(system.submit(records[index]["conversations"][0]["value"], records[index]["tools"]))
                assert time.monotonic() - started < 5, "a 202 comes within the publish timeout, not after retries"
            time.sleep(3)  # past the relay's grace: it tries, and cannot, while the proxy is cut
            engine = get_engine(postgres_url)
            with Session(engine) as session:
                tasks = session.exec(select(Task).where(col(Task.id).in_([uuid.UUID(t) for t in task_ids]))).all()
            assert [(t.status, t.enqueued_at) for t in tasks] == [(TaskStatus.QUEUED, None)] * 3
            assert _sample("umi_relay_errors_total", kind="outbox") > 0

            proxy.restore()
            finished = [system.wait(task_id, timeout_s=60) for task_id in task_ids]
            assert [task["status"] for task in finished] == ["succeeded"] * 3, finished
            assert _sample("umi_relay_published_total", kind="outbox") - published == 3
            with Session(engine) as session:
                planner_firsts = session.exec(
                    select(Step).where(col(Step.task_id).in_([uuid.UUID(t) for t in task_ids]), Step.index == 1)
                ).all()
                assert sorted(str(step.task_id) for step in planner_firsts) == sorted(task_ids)
                assert all(step.role == StepRole.PLANNER for step in planner_firsts)
                assert all(t.enqueued_at is not None for t in session.exec(select(Task)).all())
            # The gateway's relay published each task's steps, then its end, as GET shows them.
            for task, task_id in zip(finished, task_ids, strict=True):
                until(lambda: any(p.message_id == f"{task_id}:end" for _, p, _ in events.drain()), "the end event arrived")
                mine = [(key, body) for key, _, body in events.messages if key.startswith(f"task.{task_id}.")]
                assert mine == [(f"task.{task_id}.step", {**step, "task_id": task_id}) for step in task["steps"]] + [
                    (f"task.{task_id}.end", task)
                ]
        finally:
            events.close()
            system.close()
