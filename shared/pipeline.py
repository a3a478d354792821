"""How a role message becomes a stored step, idempotently (the at-least-once contract).

Every handler follows the same three moves:

1. :func:`open_step` reads the task in a short transaction. A step that is
   already stored means this message is a duplicate: its follow-up message is
   re-sent if the next step is missing (the previous worker may have died between
   commit and publish) and nothing else happens. Terminal tasks, deadlines and
   step limits end here too.
2. The role does its work outside any transaction (an LLM call, a tool call).
3. :func:`store_step` inserts the step under ``UNIQUE (task_id, index)`` together
   with any task transition, then publishes the follow-up job. Losing the insert
   race means another copy stored it first: this copy publishes nothing.

The role-specific parts live in ``services/<role>/handler.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from shared import crud, lifecycle
from shared.db import autocommit_scope, get_engine, session_scope
from shared.dispatch import Dispatcher
from shared.lifecycle import Actor, EndReason, TaskStatus
from shared.metrics import StepPhase, observe_stored_step, step_phase
from shared.models import Step, StepContent, Task, utcnow
from shared.prompts import NextRole, ToolDoc
from shared.redaction import bound_text, secrets_redactor
from shared.roles import StepRole
from shared.schemas import StepJob
from shared.settings import Settings

__all__ = [
    "JobOutcome",
    "PoisonJob",
    "Runtime",
    "StepContext",
    "StepDraft",
    "follow_up_job",
    "open_step",
    "end_task",
    "store_step",
]

logger = logging.getLogger(__name__)


class JobOutcome(StrEnum):
    """What handling one message did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPUBLISHED = "republished"
    TASK_ENDED = "task_ended"


class PoisonJob(Exception):
    """A message that can never succeed (unknown task, impossible step): dead-letter it."""


T = TypeVar("T")


@dataclass
class Runtime:
    """What handlers need: settings, the database, a dispatcher, and the role's own resources.

    A role keeps its clients (an SGLang client, the tool executor) in :attr:`resources`
    under a name it owns, built once per process by :meth:`resource`; this module knows
    nothing of them, so the common library stays free of role code.
    """

    settings: Settings
    dispatcher: Dispatcher
    #: Role resources by name; tests pass ready ones in.
    resources: dict[str, Any] = field(default_factory=dict)
    #: Ping pooled connections before use (``shared/db.py``); role workers, which retry in place, do not.
    pre_ping: bool = True
    engine: Engine = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.engine = get_engine(self.settings.database_url, pre_ping=self.pre_ping)

    def resource(self, name: str, build: Callable[[], T]) -> T:
        """The resource called ``name``, built by ``build()`` on first use (thread-safe)."""
        with self._lock:
            if name not in self.resources:
                self.resources[name] = build()
            return cast(T, self.resources[name])

    def close(self) -> None:
        """Close every resource that can be closed (connection pools)."""
        for resource in self.resources.values():
            close = getattr(resource, "close", None)
            if callable(close):
                close()


@dataclass
class StepContext:
    """The task as a handler sees it: its tools, the steps before this one, and its deadline."""

    task: Task
    tools: list[ToolDoc]
    steps: list[Step]
    deadline: float  # time.monotonic() value

    @property
    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


class StepDraft(StepContent):
    """A step about to be stored, and why the task ends with it (if it does)."""

    end_reason: EndReason | None = None
    answer: str | None = None

    @property
    def end_status(self) -> TaskStatus | None:
        """The status the task ends in with this step (decided by the reason)."""
        return None if self.end_reason is None else lifecycle.ENDINGS[self.end_reason].status


def follow_up_job(step: Step) -> StepJob | None:
    """The job that produces the step after ``step`` (None when the trajectory ends there)."""
    role = _next_role_after(step)
    if role is None:
        return None
    return StepJob(task_id=step.task_id, step_index=step.index + 1, role=role)


def _next_role_after(step: Step) -> StepRole | None:
    match StepRole(step.role):
        case StepRole.USER | StepRole.TOOLS:
            return StepRole.PLANNER
        case StepRole.SUMMARIZER:
            # A stored answer ends its task, so this only matters for a given history that goes
            # on after a conclusion (recorded test data): the planner speaks again.
            return StepRole.PLANNER
        case StepRole.CALLER:
            return StepRole.TOOLS
        case StepRole.PLANNER if step.next_role == NextRole.CALLER:
            return StepRole.CALLER
        case StepRole.PLANNER if step.next_role == NextRole.CONCLUSION:
            return StepRole.SUMMARIZER
        case StepRole.PLANNER if step.next_role is None:
            return StepRole.PLANNER  # a given plain-content thought: the planner speaks again
        case _:
            return None


def open_step(job: StepJob, rt: Runtime) -> StepContext | JobOutcome:
    """Check the job against the stored trajectory; a context to work in, or why not to.

    Two reads without a transaction (no lock is needed: :func:`store_step` checks the
    task again under its row lock); the task's first job also marks it running.
    """
    with step_phase(job.role.value, StepPhase.READ):
        return _open_step(job, rt)


def _open_step(job: StepJob, rt: Runtime) -> StepContext | JobOutcome:
    with autocommit_scope(rt.engine) as session:
        task = crud.get_task(session=session, task_id=job.task_id)
        if task is None:
            raise PoisonJob(f"task {job.task_id} does not exist")
        if lifecycle.is_terminal(task.status):
            return JobOutcome.TASK_ENDED
        steps = crud.list_steps(session=session, task_id=job.task_id)  # one read: also tells a duplicate
    stored = {step.index for step in steps}
    if job.step_index in stored:
        return _resend_follow_up(job, next(step for step in steps if step.index == job.step_index), stored, rt)
    _check_job_fits(job, steps)
    if task.status != TaskStatus.RUNNING or _over_budget(job, task, steps) is not None:
        with session_scope(rt.engine) as session:
            locked = crud.get_task(session=session, task_id=job.task_id, for_update=True)
            if locked is None or lifecycle.is_terminal(locked.status):
                return JobOutcome.TASK_ENDED  # cancelled since the read
            ended = _end_if_over_budget(job, locked, steps)
            if ended is not None:
                return ended
            lifecycle.start(locked)
            task = locked
    remaining = (task.deadline_at - utcnow()).total_seconds()
    return StepContext(task=task, tools=crud.task_tools(task), steps=steps, deadline=time.monotonic() + remaining)


def _resend_follow_up(job: StepJob, existing: Step, stored: set[int], rt: Runtime) -> JobOutcome:
    if existing.role != job.role:
        raise PoisonJob(f"step {job.step_index} of task {job.task_id} is a {existing.role} step, not {job.role}")
    follow_up = follow_up_job(existing)
    if follow_up is None or follow_up.step_index in stored:
        return JobOutcome.DUPLICATE
    rt.dispatcher.dispatch(follow_up)
    logger.info("task %s step %d: already stored, re-sent %s job", job.task_id, job.step_index, follow_up.role)
    return JobOutcome.REPUBLISHED


def _check_job_fits(job: StepJob, steps: list[Step]) -> None:
    if len(steps) != job.step_index:
        raise PoisonJob(f"task {job.task_id} has {len(steps)} steps; a job for step {job.step_index} cannot run")
    expected = _next_role_after(steps[-1])
    if expected != job.role:
        raise PoisonJob(f"step {job.step_index} of task {job.task_id} must be {expected}, the message asks for {job.role}")


def _over_budget(job: StepJob, task: Task, steps: list[Step]) -> EndReason | None:
    """Why the task must end before this job: its deadline passed, or this planner job is past the step limit."""
    if utcnow() >= task.deadline_at:
        return EndReason.DEADLINE
    planner_steps = sum(1 for step in steps if step.role == StepRole.PLANNER)
    if job.role is StepRole.PLANNER and planner_steps >= task.max_steps:
        return EndReason.STEP_LIMIT
    return None


def _end_if_over_budget(job: StepJob, task: Task, steps: list[Step]) -> JobOutcome | None:
    reason = _over_budget(job, task, steps)
    if reason is None:
        return None
    if reason is EndReason.DEADLINE:
        error = "deadline exceeded"
        logger.info("task %s: deadline exceeded at step %d", task.id, job.step_index)
    else:
        error = f"step limit reached: {task.max_steps} planner steps without a conclusion"
        logger.info("task %s: step limit %d reached", task.id, task.max_steps)
    lifecycle.finish(task, reason=reason, by=Actor.worker(job.role), error=error)
    return JobOutcome.TASK_ENDED


def store_step(
    job: StepJob, draft: StepDraft, rt: Runtime, *, also: Callable[[Session], None] | None = None
) -> JobOutcome:
    """Insert the step (and the task's end, if any) in one transaction, then publish the follow-up.

    ``also`` runs in the same transaction (the tools step completes its claim there), also
    when the task has ended meanwhile.
    """
    step = Step.model_validate(draft, update={"task_id": job.task_id, "index": job.step_index})
    try:
        with step_phase(job.role.value, StepPhase.STORE):
            if draft.end_reason is None and also is None and rt.engine.dialect.name == "postgresql":
                with autocommit_scope(rt.engine) as session:  # the one statement is the transaction
                    stored = crud.append_step_to_active_task(session=session, step=step)
            else:
                stored = _store_in_transaction(job, draft, step, rt, also)
    except IntegrityError:
        logger.info("task %s step %d: another delivery stored it first", job.task_id, job.step_index)
        return JobOutcome.DUPLICATE
    if not stored:
        return JobOutcome.TASK_ENDED  # cancelled (or ended by a deadline) while this step was being produced
    observe_stored_step(job.role.value, draft.latency_s, draft.end_status)
    follow_up = follow_up_job(step)
    if follow_up is not None and draft.end_reason is None:
        with step_phase(job.role.value, StepPhase.PUBLISH):
            rt.dispatcher.dispatch(follow_up)
    return JobOutcome.STORED


def _store_in_transaction(
    job: StepJob, draft: StepDraft, step: Step, rt: Runtime, also: Callable[[Session], None] | None
) -> bool:
    """:func:`store_step` where one statement cannot do it (an ending step, ``also``, SQLite); whether it stored."""
    with session_scope(rt.engine) as session:
        if draft.end_reason is None:
            active = crud.touch_active_task(session=session, task_id=job.task_id)  # locks the row
            task = None
        else:
            task = crud.get_task(session=session, task_id=job.task_id, for_update=True)
            active = task is not None and not lifecycle.is_terminal(task.status)
        if active:
            crud.insert_step(session=session, step=step)
        if also is not None:
            also(session)
        if active and task is not None and draft.end_reason is not None:
            lifecycle.finish(task, reason=draft.end_reason, by=Actor.worker(job.role), answer=draft.answer)
        return active


def end_task(job: StepJob, rt: Runtime, *, reason: EndReason, error: str) -> JobOutcome:
    """End a non-terminal task without storing a step (LLM failure, deadline during a call).

    ``error`` is stored, returned by the API and logged only with every configured secret
    masked and cut to :data:`~shared.redaction.ERROR_TEXT_LIMIT` characters.
    """
    error = bound_text(secrets_redactor(rt.settings)(error))
    with session_scope(rt.engine) as session:
        task = crud.get_task(session=session, task_id=job.task_id, for_update=True)
        if task is not None and not lifecycle.is_terminal(task.status):
            lifecycle.finish(task, reason=reason, by=Actor.worker(job.role), error=error)
    logger.warning("task %s ended at step %d (%s): %s", job.task_id, job.step_index, reason, error)
    return JobOutcome.TASK_ENDED
