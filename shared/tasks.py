"""Accepting a task: store it, then hand its first step to the planner queue.

The gateway and the evaluation runner both submit tasks through :func:`submit_task`.
"""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine

from shared import crud, lifecycle
from shared.context_window import prompt_budget
from shared.db import session_scope
from shared.dispatch import Dispatcher
from shared.lifecycle import Actor, EndReason
from shared.models import Task
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.settings import Settings

__all__ = ["EnqueueError", "submit_task"]

logger = logging.getLogger(__name__)


class EnqueueError(RuntimeError):
    """The broker did not take the task's first job; the task is stored as failed."""


def submit_task(*, engine: Engine, dispatcher: Dispatcher, settings: Settings, task_in: TaskCreate) -> Task:
    """Commit the task (and its given history), then publish its first planner job.

    Raises :class:`~shared.context_window.PromptDoesNotFit` (nothing stored) when the
    task's ``max_new_tokens`` leaves no room for a prompt in the context window, and
    :class:`EnqueueError` (after marking the task failed) when the publish fails, so no
    stored task waits for a message that was never sent.
    """
    prompt_budget(settings.context_length, task_in.max_new_tokens or settings.max_new_tokens)
    with session_scope(engine) as session:
        task = crud.create_task(
            session=session,
            task_in=task_in,
            max_steps=task_in.max_steps or settings.max_steps,
            timeout_s=task_in.timeout_s or settings.task_timeout_s,
            constrained=settings.constrained if task_in.constrained is None else task_in.constrained,
        )
    first = StepJob(task_id=task.id, step_index=len(task_in.history) + 1, role=StepRole.PLANNER)
    try:
        dispatcher.dispatch(first)
    except Exception as exc:
        logger.exception("task %s: could not enqueue", task.id)
        with session_scope(engine) as session:
            stored = crud.get_task(session=session, task_id=task.id, for_update=True)
            if stored is not None and not lifecycle.is_terminal(stored.status):
                lifecycle.finish(stored, reason=EndReason.ENQUEUE_ERROR, by=Actor.SUBMITTER, error=f"could not enqueue: {exc}")
        raise EnqueueError(f"the broker did not accept the task: {exc}") from exc
    return task
