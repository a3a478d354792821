"""Accepting a task: store it, then hand its first step to the planner queue.

The gateway and the evaluation runner both submit tasks through :func:`submit_task`.
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from shared import crud, lifecycle
from shared.context_window import prompt_budget
from shared.db import session_scope
from shared.dispatch import Dispatcher
from shared.lifecycle import Actor, EndReason
from shared.models import Task
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate, TaskOrigin
from shared.settings import Settings

__all__ = ["EnqueueError", "IdempotencyKeyReused", "request_fingerprint", "submit_task"]

logger = logging.getLogger(__name__)


class EnqueueError(RuntimeError):
    """The broker did not take the task's first job; the task is stored as failed."""


class IdempotencyKeyReused(ValueError):
    """The tenant used this idempotency key before, for a different request."""


def request_fingerprint(task_in: TaskCreate) -> str:
    """SHA-256 of the request as validated (field order and defaults do not change it)."""
    return hashlib.sha256(task_in.model_dump_json(by_alias=True).encode("utf-8", "surrogatepass")).hexdigest()


def _existing(engine: Engine, origin: TaskOrigin) -> Task | None:
    if origin.idempotency_key is None:
        return None
    with session_scope(engine) as session:
        task = crud.get_task_by_idempotency_key(session=session, tenant_id=origin.tenant_id, key=origin.idempotency_key)
    if task is not None and task.request_fingerprint != origin.request_fingerprint:
        raise IdempotencyKeyReused(f"idempotency key {origin.idempotency_key!r} was used for a different request")
    return task


def submit_task(
    *, engine: Engine, dispatcher: Dispatcher, settings: Settings, task_in: TaskCreate, origin: TaskOrigin | None = None
) -> Task:
    """Commit the task (and its given history), then publish its first planner job.

    With an idempotency key in ``origin``, a task the tenant already submitted under
    that key is returned as it is (nothing stored, nothing published again); the same
    key with a different request raises :class:`IdempotencyKeyReused`.

    Raises :class:`~shared.context_window.PromptDoesNotFit` (nothing stored) when the
    task's ``max_new_tokens`` leaves no room for a prompt in the context window, and
    :class:`EnqueueError` (after marking the task failed) when the publish fails, so no
    stored task waits for a message that was never sent.
    """
    prompt_budget(settings.context_length, task_in.max_new_tokens or settings.max_new_tokens)
    origin = origin or TaskOrigin()
    if origin.idempotency_key is not None and origin.request_fingerprint is None:
        origin = origin.model_copy(update={"request_fingerprint": request_fingerprint(task_in)})
    existing = _existing(engine, origin)
    if existing is not None:
        return existing
    try:
        with session_scope(engine) as session:
            task = crud.create_task(
                session=session,
                task_in=task_in,
                max_steps=task_in.max_steps or settings.max_steps,
                timeout_s=task_in.timeout_s or settings.task_timeout_s,
                constrained=settings.constrained if task_in.constrained is None else task_in.constrained,
                origin=origin,
            )
    except IntegrityError:
        # Two copies of one request raced; the other stored it.
        existing = _existing(engine, origin)
        if existing is None:
            raise
        return existing
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
