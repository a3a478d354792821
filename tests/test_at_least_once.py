"""The at-least-once branches of the step protocol, on the real PostgreSQL.

* Two copies of one job racing: both reach the LLM, one step is stored, one follow-up published.
* Every job is published only after what causes it is committed: the task row for the
  gateway's first job, the step before it for a worker's follow-up (checked from a
  separate database connection at the moment of publishing).
* A task's own ``temperature``, ``max_new_tokens`` and ``constrained`` reach the body
  the SGLang server receives, and that body keeps SGLang's request contract.

Handlers are called directly (as in ``tests/test_pipeline.py``); the SGLang simulator
serves over real HTTP behind a capturing layer that records each ``/generate`` body.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from services.gateway.app import create_app as create_gateway
from services.simulator import SimulatorConfig
from services.simulator import create_app as create_simulator
from shared import crud
from shared.asgi import ServerThread
from shared.db import session_scope
from shared.lifecycle import EndReason, TaskStatus
from shared.pipeline import JobOutcome, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.settings import Settings, load_settings
from shared.sglang_contract import generate_contract_error
from tests.conftest import TRAJECTORIES, load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, run_job, stored_steps

#: A recorded trajectory with planner, caller, tools and summarizer steps (tool calls replayed by the mirror).
RECORD = 2
WAIT_S = 60.0


class CapturingSGLang:
    """ASGI layer in front of the simulator: records every ``/generate`` body, optionally holding
    each request until ``hold`` requests are inside, so copies of one job meet in the LLM call."""

    def __init__(self, app: Any, *, hold: int = 0) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []
        self.barrier = threading.Barrier(hold) if hold else None
        self.url = ""  # set once it serves

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/generate":
            await self.app(scope, receive, send)
            return
        messages = [await receive()]
        while messages[-1].get("more_body"):
            messages.append(await receive())
        self.bodies.append(json.loads(b"".join(m.get("body", b"") for m in messages)))
        if self.barrier is not None:
            try:
                await asyncio.to_thread(self.barrier.wait, WAIT_S)
            except threading.BrokenBarrierError:
                pass  # the test sees the broken barrier; let the request through rather than hang

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class NotCommitted(AssertionError):
    """A job was published before what causes it was committed."""


class CommitCheckingDispatcher(CollectingDispatcher):
    """Collects jobs, first checking from its own connection that the task row and the step
    before the job's (the user's query for a first job, else the step that caused it) are committed."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        # Its own engine, no pool: every check is a fresh connection that sees only committed rows.
        self.engine = create_engine(database_url, poolclass=NullPool)

    def dispatch(self, job: StepJob) -> None:
        with self.engine.connect() as connection:
            task = connection.execute(text("SELECT status FROM umi_task WHERE id = :id"), {"id": job.task_id}).first()
            cause = connection.execute(
                text('SELECT role FROM umi_step WHERE task_id = :id AND "index" = :index'),
                {"id": job.task_id, "index": job.step_index - 1},
            ).first()
        if task is None:
            raise NotCommitted(f"{job} published before its task row was committed")
        if cause is None:
            raise NotCommitted(f"{job} published before step {job.step_index - 1}, which causes it, was committed")
        super().dispatch(job)


def pg_settings(postgres_url: str, llm_url: str, **overrides: object) -> Settings:
    """The session's PostgreSQL, every LLM role on ``llm_url``, the bundled mirror."""
    return load_settings(
        database_url=postgres_url,
        planner_llm_url=llm_url,
        caller_llm_url=llm_url,
        summarizer_llm_url=llm_url,
        tools_mirror=TRAJECTORIES,
        **overrides,
    )


@pytest.fixture
def capturing_sglang() -> Iterator[CapturingSGLang]:
    capture = CapturingSGLang(create_simulator(SimulatorConfig(data=[TRAJECTORIES])))
    with ServerThread(capture) as server:
        capture.url = server.url
        yield capture


def _task_in(**fields: Any) -> TaskCreate:
    record = load_trajectories()[RECORD]
    return TaskCreate(query=record["conversations"][0]["value"], tools=record["tools"], **fields)


def _run_jobs(rt: Runtime, dispatcher: CollectingDispatcher) -> None:
    """Run published jobs in order, as the queues would, until none follows."""
    done = 0
    while done < len(dispatcher.jobs):
        assert run_job(rt, dispatcher.jobs[done]) is JobOutcome.STORED
        done += 1


def test_two_copies_of_one_job_racing_store_one_step_and_publish_one_follow_up(postgres_url: str) -> None:
    capture = CapturingSGLang(create_simulator(SimulatorConfig(data=[TRAJECTORIES])), hold=2)
    dispatcher = CollectingDispatcher()
    with ServerThread(capture) as server:
        rt = Runtime(settings=pg_settings(postgres_url, server.url), dispatcher=dispatcher)
        with session_scope(rt.engine) as session:
            task_id = crud.create_task(session=session, task_in=_task_in(), max_steps=12, timeout_s=120, constrained=True).id
        job = StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)
        # Two deliveries of one message, e.g. a redelivery while the first worker still runs.
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = list(pool.map(lambda _: run_job(rt, job), range(2)))

    assert capture.barrier is not None and not capture.barrier.broken, "both copies were inside the LLM call together"
    assert len(capture.bodies) == 2
    assert sorted(outcomes) == sorted([JobOutcome.STORED, JobOutcome.DUPLICATE])
    steps = stored_steps(rt, task_id)
    assert [(s.index, s.role) for s in steps] == [(0, StepRole.USER), (1, StepRole.PLANNER)]
    assert dispatcher.jobs == [StepJob(task_id=task_id, step_index=2, role=StepRole.CALLER)]


def test_the_gateway_and_the_workers_publish_only_what_is_committed(postgres_url: str, capturing_sglang: CapturingSGLang) -> None:
    settings = pg_settings(postgres_url, capturing_sglang.url)
    dispatcher = CommitCheckingDispatcher(postgres_url)
    with TestClient(create_gateway(settings, dispatcher=dispatcher)) as client:
        response = client.post("/v1/tasks", json=_task_in().model_dump(mode="json", by_alias=True))
        assert response.status_code == 202, response.text
        task_id = uuid.UUID(response.json()["id"])
        assert dispatcher.jobs == [StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)]

        _run_jobs(Runtime(settings=settings, dispatcher=dispatcher), dispatcher)
        task = client.get(f"/v1/tasks/{task_id}").json()

    assert (task["status"], task["end_reason"]) == (TaskStatus.SUCCEEDED, EndReason.ANSWERED)
    record = load_trajectories()[RECORD]
    assert [s["output"] for s in task["steps"]] == [turn["value"] for turn in record["conversations"]]
    # Every step but the query and the answer caused one job, each checked when it was published.
    assert [j.step_index for j in dispatcher.jobs] == list(range(1, len(task["steps"])))


def test_the_commit_check_catches_a_job_published_inside_its_transaction(postgres_url: str) -> None:
    dispatcher = CommitCheckingDispatcher(postgres_url)
    rt = Runtime(settings=pg_settings(postgres_url, "http://127.0.0.1:9"), dispatcher=dispatcher)
    with pytest.raises(NotCommitted, match="before its task row was committed"):
        with session_scope(rt.engine) as session:
            task = crud.create_task(session=session, task_in=_task_in(), max_steps=12, timeout_s=60, constrained=True)
            session.flush()
            dispatcher.dispatch(StepJob(task_id=task.id, step_index=1, role=StepRole.PLANNER))
    assert dispatcher.jobs == []


@pytest.mark.parametrize("constrained", [True, False])
def test_a_tasks_generation_settings_reach_the_sglang_request_body(
    postgres_url: str, capturing_sglang: CapturingSGLang, constrained: bool
) -> None:
    # Settings defaults differ from the task's values, so only the task can have put them there.
    settings = pg_settings(postgres_url, capturing_sglang.url, temperature=0.9, max_new_tokens=500, constrained=not constrained)
    dispatcher = CollectingDispatcher()
    with TestClient(create_gateway(settings, dispatcher=dispatcher)) as client:
        body = _task_in(temperature=0.25, max_new_tokens=700, constrained=constrained).model_dump(mode="json", by_alias=True)
        assert client.post("/v1/tasks", json=body).status_code == 202
        _run_jobs(Runtime(settings=settings, dispatcher=dispatcher), dispatcher)

    roles = [StepRole.PLANNER, *(job.role for job in dispatcher.jobs[1:] if job.role is not StepRole.TOOLS)]
    assert len(capture_bodies := capturing_sglang.bodies) == len(roles) and StepRole.SUMMARIZER in roles
    for role, sent in zip(roles, capture_bodies, strict=True):
        assert generate_contract_error(sent) is None, sent
        params = sent["sampling_params"]
        assert (params["temperature"], params["max_new_tokens"]) == (0.25, 700), role
        grammar = {key for key in ("regex", "ebnf", "json_schema") if params.get(key) is not None}
        expected = {StepRole.PLANNER: {"regex"}, StepRole.CALLER: {"ebnf"}}.get(role, set()) if constrained else set()
        assert grammar == expected, role
