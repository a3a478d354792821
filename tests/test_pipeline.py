"""The step protocol, handler by handler: idempotency, tool calls that run once, LLM failures.

Handlers are plain functions, called here directly against SQLite and the SGLang
simulator over real HTTP; jobs they publish are collected instead of sent.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from services.tools import ToolRegistry, build_executor
from services.tools.handler import TOOL_EXECUTOR
from shared import crud
from shared.asgi import free_port
from shared.db import session_scope
from shared.models import ToolCall, ToolCallStatus, utcnow
from shared.pipeline import JobOutcome, PoisonJob, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob
from tests.conftest import load_trajectories
from tests.pipeline_helpers import (
    CollectingDispatcher,
    create_task,
    run_job,
    run_to_end,
    sqlite_settings,
    stored_steps,
)


def test_handlers_chained_by_their_published_jobs_reproduce_a_trajectory(tmp_path: Path, simulator_url: str) -> None:
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=sqlite_settings(tmp_path, simulator_url), dispatcher=dispatcher)
    record = load_trajectories()[2]
    task_id = create_task(rt, record)
    run_to_end(rt, dispatcher, task_id)
    assert [s.output for s in stored_steps(rt, task_id)] == [t["value"] for t in record["conversations"]]
    assert [j.role.value for j in dispatcher.jobs] == ["caller", "tools", "planner", "caller", "tools", "planner", "summarizer"]


def test_a_duplicate_job_stores_nothing_and_resends_only_a_missing_follow_up(tmp_path: Path, simulator_url: str) -> None:
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=sqlite_settings(tmp_path, simulator_url), dispatcher=dispatcher)
    task_id = create_task(rt, load_trajectories()[14])
    planner_job = StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)
    assert run_job(rt, planner_job) is JobOutcome.STORED
    # The worker "died" before acking: the redelivery finds the step and re-sends the caller job.
    assert run_job(rt, planner_job, redelivered=True) is JobOutcome.REPUBLISHED
    assert [(j.step_index, j.role) for j in dispatcher.jobs] == [(2, StepRole.CALLER), (2, StepRole.CALLER)]
    assert run_job(rt, dispatcher.jobs[0]) is JobOutcome.STORED
    assert run_job(rt, dispatcher.jobs[1]) is JobOutcome.REPUBLISHED  # tools job still missing
    assert run_job(rt, planner_job) is JobOutcome.DUPLICATE  # its follow-up (step 2) is stored
    assert len(stored_steps(rt, task_id)) == 3


def test_a_tool_call_runs_once_and_a_copy_takes_over_only_a_lapsed_lease(tmp_path: Path, simulator_url: str) -> None:
    calls: list[dict] = []
    registry = ToolRegistry()

    @registry.register("validate_email_address_for_email_address_validator")
    def validate(email: str) -> str:
        calls.append({"email": email})
        return f"checked {email}"

    settings = sqlite_settings(tmp_path, simulator_url, tools_lease_s=0.6)
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=settings, dispatcher=dispatcher, resources={TOOL_EXECUTOR: build_executor(settings, registry=registry)})
    task_id = create_task(rt, load_trajectories()[14])
    for job in (StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER), StepJob(task_id=task_id, step_index=2, role=StepRole.CALLER)):
        run_job(rt, job)
    tools_job = StepJob(task_id=task_id, step_index=3, role=StepRole.TOOLS)

    # A worker claimed the call and died before finishing it: nobody renews its 1 s lease.
    with session_scope(rt.engine) as session:
        dead = crud.claim_tool_call(session=session, task_id=task_id, step_index=3, tool_name="x", arguments="{}", owner="dead", lease_s=1.0)
        expires = dead.call.lease_expires_at
    # The redelivered copy waits in place for the lease to lapse, then takes the call over.
    assert run_job(rt, tools_job, redelivered=True) is JobOutcome.STORED
    assert expires is not None and utcnow() >= expires
    assert run_job(rt, tools_job, redelivered=True) is JobOutcome.REPUBLISHED
    assert calls == [{"email": "john.doe@example.com"}]
    with Session(rt.engine) as session:
        (call,) = session.exec(select(ToolCall).where(ToolCall.task_id == task_id)).all()
    assert (call.status, call.attempts, call.ok, call.backend) == (ToolCallStatus.COMPLETED, 2, True, "python")
    assert call.owner not in (None, "dead")
    assert stored_steps(rt, task_id)[-1].output == "checked john.doe@example.com"
    rt.close()


def test_an_unreachable_llm_fails_the_task_with_the_error_recorded(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    rt = Runtime(settings=sqlite_settings(tmp_path, dead, llm_max_retries=2, llm_backoff_s=0.01), dispatcher=CollectingDispatcher())
    task_id = create_task(rt, load_trajectories()[14])
    assert run_job(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)) is JobOutcome.TASK_ENDED
    with Session(rt.engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
    assert task is not None and (task.status, task.end_reason) == ("failed", "llm_error")
    assert task.error is not None and task.error.startswith("planner LLM failed") and dead in task.error
    assert "Connection refused" in task.error


def test_a_job_that_contradicts_the_trajectory_is_poison(tmp_path: Path, simulator_url: str) -> None:
    rt = Runtime(settings=sqlite_settings(tmp_path, simulator_url), dispatcher=CollectingDispatcher())
    task_id = create_task(rt, load_trajectories()[14])
    with pytest.raises(PoisonJob, match="must be planner, the message asks for caller"):
        run_job(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.CALLER))
    with pytest.raises(PoisonJob, match="cannot run"):
        run_job(rt, StepJob(task_id=task_id, step_index=5, role=StepRole.PLANNER))


def test_a_planner_give_up_ends_the_task_as_gave_up() -> None:
    from services.planner.handler import interpret_planner_output

    give_ups = [r["conversations"][-1]["value"] for r in load_trajectories() if r["conversations"][-1]["value"].endswith("Next: give up.")]
    assert give_ups
    for text in give_ups:
        draft = interpret_planner_output(text)
        assert (draft.end_status, draft.end_reason, draft.next_role, draft.output) == ("gave_up", "planner_gave_up", "give up", text)


def test_the_replay_oracle_is_independent_of_the_prompt_code(tmp_path: Path, simulator_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator replays α-UMi's own training pairs: one changed byte in a template breaks the replay."""
    from shared import prompts

    monkeypatch.setattr(prompts, "PLANNER_TEMPLATE", prompts.PLANNER_TEMPLATE.replace("assess", "access", 1))
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=sqlite_settings(tmp_path, simulator_url), dispatcher=dispatcher)
    record = load_trajectories()[2]
    task_id = create_task(rt, record)
    assert run_job(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)) is JobOutcome.STORED
    planner = stored_steps(rt, task_id)[1]
    assert planner.output != record["conversations"][1]["value"]


def test_an_in_place_retry_after_a_failed_store_keeps_the_call_it_made(
    tmp_path: Path, simulator_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails as the observation is stored: the worker's in-place retry stores the outcome it has.

    The API is not called a second time and the worker does not wait for its own lease.
    """
    from sqlalchemy.exc import OperationalError

    import services.tools.handler as tools_handler
    from shared import worker as worker_glue

    calls: list[str] = []
    registry = ToolRegistry()

    @registry.register("validate_email_address_for_email_address_validator")
    def validate(email: str) -> str:
        calls.append(email)
        return f"checked {email}"

    settings = sqlite_settings(tmp_path, simulator_url, tools_lease_s=30, infra_retry_s=10)
    rt = Runtime(settings=settings, dispatcher=CollectingDispatcher(), resources={TOOL_EXECUTOR: build_executor(settings, registry=registry)})
    task_id = create_task(rt, load_trajectories()[14])
    for job in (StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER), StepJob(task_id=task_id, step_index=2, role=StepRole.CALLER)):
        run_job(rt, job)
    real_store = tools_handler.store_step
    failures = iter([OperationalError("UPDATE umi_step", {}, ConnectionError("server closed the connection"))])

    def flaky_store(*args: object, **kwargs: object) -> JobOutcome:
        for exc in failures:
            raise exc
        return real_store(*args, **kwargs)

    monkeypatch.setattr(tools_handler, "store_step", flaky_store)
    started = time.monotonic()
    outcome = worker_glue.run_job(tools_handler.handle_tools_job, StepJob(task_id=task_id, step_index=3, role=StepRole.TOOLS), rt, redelivered=False)
    assert outcome is JobOutcome.STORED
    assert time.monotonic() - started < 10  # no wait for its own 30 s lease
    assert calls == ["john.doe@example.com"]
    with Session(rt.engine) as session:
        (call,) = session.exec(select(ToolCall).where(ToolCall.task_id == task_id)).all()
    assert (call.status, call.attempts) == (ToolCallStatus.COMPLETED, 1)
    assert stored_steps(rt, task_id)[-1].output == "checked john.doe@example.com"
    rt.close()
