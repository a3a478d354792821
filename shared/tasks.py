"""Accepting a task: store it, then hand its first step to the planner queue (an outbox).

The gateway, the ingress worker and the evaluation runner submit tasks through
:func:`submit_task`. The task row is committed first with ``enqueued_at`` NULL; the
first planner job is then published with one bounded attempt under the task's row
lock, and ``enqueued_at`` set. When the broker is away the task stays accepted and
``queued``: the relay (``shared/relay.py``) publishes its job once the broker is back
(docs/architecture.md, "Outbox and events").
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shared import crud
from shared.admission import OverLimit, check_in_flight
from shared.context_window import prompt_budget
from shared.db import session_scope
from shared.dispatch import Dispatcher
from shared.lifecycle import TaskStatus
from shared.metrics import observe_outbox_deferred
from shared.models import Step, Task, Tenant, utcnow
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate, TaskOrigin
from shared.settings import Settings

__all__ = [
    "IdempotencyKeyReused",
    "OverLimit",
    "Submission",
    "accept_task",
    "first_jobs",
    "publish_first_job",
    "request_fingerprint",
    "submit_task",
]

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Submission:
    """A submitted task, and whether this request stored it (``False``: an earlier one with its idempotency key did)."""

    task: Task
    created: bool


def accept_task(
    *,
    engine: Engine,
    dispatcher: Dispatcher,
    settings: Settings,
    task_in: TaskCreate,
    origin: TaskOrigin | None = None,
    limit_in_flight: Tenant | None = None,
) -> Submission:
    """Commit the task (and its given history), then publish its first planner job.

    With an idempotency key in ``origin``, a task the tenant already submitted under
    that key is returned as it is (``created=False``; nothing stored, nothing published
    again, no limit applied); the same key with a different request raises
    :class:`IdempotencyKeyReused`.

    With ``limit_in_flight`` (the submitting tenant), the tenant's tasks-in-flight limit is
    checked in the transaction that stores the task, under the tenant's row lock, so
    submissions racing at the limit cannot pass it together: :class:`~shared.admission.OverLimit`.

    Raises :class:`~shared.context_window.PromptDoesNotFit` (nothing stored) when the
    task's ``max_new_tokens`` leaves no room for a prompt in the context window. A
    broker that refuses or does not answer in time raises nothing: the task is
    returned accepted (``queued``) and the relay publishes its first job later.
    """
    prompt_budget(settings.context_length, task_in.max_new_tokens or settings.max_new_tokens)
    origin = origin or TaskOrigin()
    if origin.idempotency_key is not None and origin.request_fingerprint is None:
        origin = origin.model_copy(update={"request_fingerprint": request_fingerprint(task_in)})
    existing = _existing(engine, origin)
    if existing is not None:
        return Submission(task=existing, created=False)
    try:
        with session_scope(engine) as session:
            if limit_in_flight is not None:
                _check_in_flight_locked(session, limit_in_flight, settings)
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
        return Submission(task=existing, created=False)
    publish_first_job(engine, dispatcher, task.id)
    return Submission(task=task, created=True)


def _check_in_flight_locked(session: Session, tenant: Tenant, settings: Settings) -> None:
    # FOR NO KEY UPDATE: serialises this tenant's admissions without blocking the foreign-key
    # checks (KEY SHARE) of task inserts elsewhere. SQLite has one writer at a time anyway.
    session.exec(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update(key_share=True)).one()
    refusal = check_in_flight(session=session, tenant=tenant, settings=settings)
    if refusal is not None:
        raise OverLimit(refusal)


def submit_task(
    *, engine: Engine, dispatcher: Dispatcher, settings: Settings, task_in: TaskCreate, origin: TaskOrigin | None = None
) -> Task:
    """:func:`accept_task` without limits, for callers that only need the task (the evaluation runner)."""
    return accept_task(engine=engine, dispatcher=dispatcher, settings=settings, task_in=task_in, origin=origin).task


def first_jobs(session: Session, tasks: list[Task]) -> dict[uuid.UUID, StepJob]:
    """The first planner job of each task: the step after its stored query and given history."""
    if not tasks:
        return {}
    last = session.exec(
        select(Step.task_id, func.max(Step.index)).where(col(Step.task_id).in_([task.id for task in tasks])).group_by(col(Step.task_id))
    ).all()
    return {task_id: StepJob(task_id=task_id, step_index=index + 1, role=StepRole.PLANNER) for task_id, index in last}


def publish_first_job(engine: Engine, dispatcher: Dispatcher, task_id: uuid.UUID) -> bool:
    """Publish a stored task's first planner job now and mark it enqueued; whether it was.

    Holds the task's row lock while publishing (``SKIP LOCKED``: a relay holding it is
    publishing it, so this returns at once). A failed or slow publish is logged and left to
    the relay; a task already enqueued, or no longer queued, is not published again.
    """
    try:
        with session_scope(engine) as session:
            task = session.exec(
                select(Task).where(Task.id == task_id, col(Task.enqueued_at).is_(None)).with_for_update(skip_locked=True)
            ).first()
            if task is None or task.status != TaskStatus.QUEUED:
                return False
            dispatcher.dispatch(first_jobs(session, [task])[task.id])
            task.enqueued_at = utcnow()
    except Exception as exc:
        observe_outbox_deferred()
        logger.warning("task %s: the broker did not take its first job now (%r); the relay will publish it", task_id, exc)
        return False
    return True
