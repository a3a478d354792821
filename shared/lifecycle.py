"""The task lifecycle in one place: its statuses, which may follow which, and who may end a task why.

::

    queued ──start──▶ running ──finish──▶ succeeded | gave_up | failed | cancelled
       └────────────finish─────────────▶ failed | cancelled   (before any step ran)

Every change of a task's status goes through :func:`start` or :func:`finish`;
they refuse an illegal change with :class:`IllegalTransition`. The end reason
decides the terminal status (:data:`ENDINGS`), so a task can never be, say,
``succeeded`` because its deadline passed. The callers hold the task's row lock.
The table is drawn in ``docs/architecture.md`` ("Task lifecycle").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from shared.roles import StepRole

if TYPE_CHECKING:
    from shared.models import Task

__all__ = [
    "ACTIVE_STATUSES",
    "ENDINGS",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "Actor",
    "EndReason",
    "Ending",
    "IllegalTransition",
    "TaskStatus",
    "finish",
    "is_terminal",
    "start",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (every timestamp of a task's life)."""
    return datetime.now(UTC)


class TaskStatus(StrEnum):
    """Where a task stands; the last four are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave_up"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The statuses a task never leaves.
TERMINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.GAVE_UP, TaskStatus.FAILED, TaskStatus.CANCELLED})

#: The statuses of a task that may still change.
ACTIVE_STATUSES = frozenset(TaskStatus) - TERMINAL_STATUSES

#: Which status may follow which.
TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: TERMINAL_STATUSES,
    **{status: frozenset() for status in TERMINAL_STATUSES},
}


class EndReason(StrEnum):
    """Why a task ended, recorded next to its terminal status."""

    ANSWERED = "answered"
    STEP_EVALUATED = "step_evaluated"
    PLANNER_GAVE_UP = "planner_gave_up"
    STEP_LIMIT = "step_limit"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    LLM_ERROR = "llm_error"
    ENQUEUE_ERROR = "enqueue_error"
    #: A worker hit an error it does not know how to handle; the task's error says which.
    INTERNAL_ERROR = "internal_error"


class Actor(StrEnum):
    """Who changes a task's status."""

    #: A cancel request through the API.
    CLIENT = "client"
    #: Whoever enqueued the task (the gateway, the evaluation runner).
    SUBMITTER = "submitter"
    #: The sweep that ends tasks whose next job will never come.
    SWEEP = "sweep"
    PLANNER = "planner"
    CALLER = "caller"
    TOOLS = "tools"
    SUMMARIZER = "summarizer"

    @classmethod
    def worker(cls, role: StepRole) -> Actor:
        """The worker of a queued role."""
        if role is StepRole.USER:
            raise ValueError("the user step is written by the gateway, not by a worker")
        return cls(role.value)


class Ending(NamedTuple):
    """How a task ends for one reason: the status it gets and who may end it so."""

    status: TaskStatus
    by: frozenset[Actor]


_LLM_WORKERS = frozenset({Actor.PLANNER, Actor.CALLER, Actor.SUMMARIZER})
_WORKERS = _LLM_WORKERS | {Actor.TOOLS}

#: Every end reason with its terminal status and the actors that may record it.
ENDINGS: Mapping[EndReason, Ending] = {
    EndReason.ANSWERED: Ending(TaskStatus.SUCCEEDED, frozenset({Actor.SUMMARIZER})),
    # A static_step task (static evaluation) ends with the caller's step.
    EndReason.STEP_EVALUATED: Ending(TaskStatus.SUCCEEDED, frozenset({Actor.CALLER})),
    EndReason.PLANNER_GAVE_UP: Ending(TaskStatus.GAVE_UP, frozenset({Actor.PLANNER})),
    EndReason.STEP_LIMIT: Ending(TaskStatus.FAILED, frozenset({Actor.PLANNER})),
    EndReason.DEADLINE: Ending(TaskStatus.FAILED, _WORKERS | {Actor.SWEEP}),
    EndReason.CANCELLED: Ending(TaskStatus.CANCELLED, frozenset({Actor.CLIENT})),
    EndReason.LLM_ERROR: Ending(TaskStatus.FAILED, _LLM_WORKERS),
    EndReason.ENQUEUE_ERROR: Ending(TaskStatus.FAILED, frozenset({Actor.SUBMITTER})),
    EndReason.INTERNAL_ERROR: Ending(TaskStatus.FAILED, _WORKERS),
}


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow (a bug in the caller, never bad input)."""


def is_terminal(status: TaskStatus) -> bool:
    """Whether a task in ``status`` has ended for good."""
    return status in TERMINAL_STATUSES


def start(task: Task) -> None:
    """Mark a queued task running (a worker picked up its first job); a running task stays so."""
    if task.status == TaskStatus.RUNNING:
        return
    _check(task, TaskStatus.RUNNING)
    task.status = TaskStatus.RUNNING
    task.updated_at = utcnow()


def finish(task: Task, *, reason: EndReason, by: Actor, answer: str | None = None, error: str | None = None) -> None:
    """End ``task`` for ``reason``, recorded by ``by``; the reason decides the terminal status."""
    ending = ENDINGS[reason]
    if by not in ending.by:
        allowed = ", ".join(sorted(ending.by))
        raise IllegalTransition(f"task {task.id}: {by} may not end a task as {reason} (only {allowed} may)")
    _check(task, ending.status)
    now = utcnow()
    task.status = ending.status
    task.end_reason = reason
    task.answer = answer
    task.error = error
    task.updated_at = now
    task.finished_at = now


def _check(task: Task, to: TaskStatus) -> None:
    if to not in TRANSITIONS[task.status]:
        raise IllegalTransition(f"task {task.id}: a {task.status} task cannot become {to}")
