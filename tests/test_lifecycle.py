"""The task lifecycle (shared/lifecycle.py): legal transitions, who may end a task why, enum columns."""

from __future__ import annotations

import ast
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import StatementError

from shared import lifecycle
from shared.db import get_engine, session_scope, upgrade_schema
from shared.lifecycle import TERMINAL_STATUSES, TRANSITIONS, Actor, EndReason, IllegalTransition, TaskStatus
from shared.models import DEFAULT_TENANT_ID, Step, Task, TaskMode, ToolCall, ToolCallStatus, utcnow
from shared.prompts import NextRole
from shared.roles import StepRole
from tests.conftest import REPO


def _task(status: TaskStatus = TaskStatus.QUEUED) -> Task:
    now = utcnow()
    return Task(status=status, query="q", tools=[], max_steps=3, constrained=True, deadline_at=now + timedelta(seconds=60))


def test_every_end_reason_leads_to_a_terminal_status_someone_may_record() -> None:
    assert set(lifecycle.ENDINGS) == set(EndReason)
    for reason, ending in lifecycle.ENDINGS.items():
        assert ending.status in TERMINAL_STATUSES and ending.by, reason
    assert set(TRANSITIONS) == set(TaskStatus)
    assert all(not TRANSITIONS[status] for status in TERMINAL_STATUSES)


def test_a_task_starts_once_and_ends_once_with_the_status_its_reason_decides() -> None:
    task = _task()
    lifecycle.start(task)
    lifecycle.start(task)  # a second job of a running task
    assert task.status is TaskStatus.RUNNING and task.finished_at is None
    lifecycle.finish(task, reason=EndReason.PLANNER_GAVE_UP, by=Actor.PLANNER)
    assert (task.status, task.end_reason) == (TaskStatus.GAVE_UP, EndReason.PLANNER_GAVE_UP)
    assert task.finished_at is not None
    with pytest.raises(IllegalTransition, match="a gave_up task cannot become cancelled"):
        lifecycle.finish(task, reason=EndReason.CANCELLED, by=Actor.CLIENT)
    with pytest.raises(IllegalTransition, match="a gave_up task cannot become running"):
        lifecycle.start(task)
    assert task.status is TaskStatus.GAVE_UP


def test_only_the_right_actor_may_end_a_task_for_a_reason() -> None:
    with pytest.raises(IllegalTransition, match="sweep may not end a task as answered"):
        lifecycle.finish(_task(TaskStatus.RUNNING), reason=EndReason.ANSWERED, by=Actor.SWEEP)
    with pytest.raises(IllegalTransition, match="tools may not end a task as llm_error"):
        lifecycle.finish(_task(TaskStatus.RUNNING), reason=EndReason.LLM_ERROR, by=Actor.TOOLS)
    with pytest.raises(ValueError, match="user step"):
        Actor.worker(StepRole.USER)
    assert Actor.worker(StepRole.SUMMARIZER) is Actor.SUMMARIZER


def test_a_queued_task_can_fail_or_be_cancelled_but_not_succeed() -> None:
    for reason, by in [(EndReason.CANCELLED, Actor.CLIENT), (EndReason.DEADLINE, Actor.SWEEP), (EndReason.ENQUEUE_ERROR, Actor.SUBMITTER)]:
        task = _task()
        lifecycle.finish(task, reason=reason, by=by, error="x")
        assert task.status in {TaskStatus.FAILED, TaskStatus.CANCELLED}
    with pytest.raises(IllegalTransition, match="a queued task cannot become succeeded"):
        lifecycle.finish(_task(), reason=EndReason.ANSWERED, by=Actor.SUMMARIZER, answer="a")


def test_status_columns_store_enum_values_so_rows_written_as_plain_strings_read_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/enum.db"
    upgrade_schema(url)
    engine = get_engine(url)
    task_id = uuid.uuid4()
    with engine.begin() as connection:  # rows as the code wrote them before the columns were enum-typed
        connection.execute(
            text(
                "INSERT INTO umi_task (id, tenant_id, status, query, tools, end_reason, max_steps, constrained, mode,"
                " deadline_at, created_at, updated_at) VALUES (:id, :tenant, 'gave_up', 'q', '[]', 'planner_gave_up', 3, 1,"
                " 'static_step', '2030-01-01', '2030-01-01', '2030-01-01')"
            ),
            {"id": task_id.hex, "tenant": DEFAULT_TENANT_ID.hex},
        )
        connection.execute(
            text("INSERT INTO umi_step (task_id, \"index\", role, output, next_role, created_at) VALUES (:id, 1, 'planner', 'x', 'give up', '2030-01-01')"),
            {"id": task_id.hex},
        )
    with session_scope(engine) as session:
        task = session.get(Task, task_id)
        step = session.query(Step).one()
        assert task is not None
        assert (task.status, task.end_reason, task.mode) == (TaskStatus.GAVE_UP, EndReason.PLANNER_GAVE_UP, TaskMode.STATIC_STEP)
        assert (step.role, step.next_role) == (StepRole.PLANNER, NextRole.GIVE_UP)
        session.add(ToolCall(task_id=task_id, step_index=3, tool_name="t", arguments="{}", status=ToolCallStatus.RUNNING))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM umi_tool_call")).scalar_one() == "running"
    with pytest.raises(StatementError, match="'finished' is not among the defined enum values.*queued, running, succeeded"):
        with session_scope(engine) as session:
            session.execute(update(Task).where(Task.id == task_id).values(status="finished"))


def _product_files() -> list[Path]:
    return [p for top in ("shared", "services", "evaluation", "umi", "scripts") for p in (REPO / top).rglob("*.py")]


def test_only_the_lifecycle_module_sets_a_task_status() -> None:
    offenders = []
    for path in _product_files():
        if path == REPO / "shared" / "lifecycle.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    # A tool call's status is its own (ToolCallStatus); any other status is a task's.
                    if isinstance(target, ast.Attribute) and target.attr in {"status", "end_reason"}:
                        if node.value is None or "ToolCallStatus" not in ast.unparse(node.value):
                            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_terminal_statuses_are_never_spelled_out_by_hand() -> None:
    spelled = [
        str(path.relative_to(REPO))
        for path in _product_files()
        if path != REPO / "shared" / "lifecycle.py" and '"gave_up"' in path.read_text()
    ]
    assert spelled == []
