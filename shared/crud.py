"""Small data-access functions over the tables in :mod:`shared.models`.

Keyword-only, each takes a session, none commits: the caller owns the transaction.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Insert, Interval, bindparam, cast, func, insert, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from shared import lifecycle
from shared.lifecycle import ACTIVE_STATUSES, Actor, EndReason, TaskStatus
from shared.models import Step, Task, ToolCall, ToolCallStatus, utcnow
from shared.prompts import Speaker, ToolDoc, Turn, parse_caller_output, parse_planner_output
from shared.roles import StepRole
from shared.schemas import StepPublic, TaskCreate, TaskOrigin, TaskPublic

__all__ = [
    "ClaimState",
    "ToolCallClaim",
    "cancel_task",
    "claim_tool_call",
    "create_task",
    "database_now",
    "fail_overdue_tasks",
    "get_task",
    "get_task_by_idempotency_key",
    "insert_step",
    "list_steps",
    "list_tasks",
    "append_step_to_active_task",
    "renew_tool_call_leases",
    "steps_to_turns",
    "task_public",
    "task_tools",
    "touch_active_task",
]


def create_task(
    *,
    session: Session,
    task_in: TaskCreate,
    max_steps: int,
    timeout_s: float,
    constrained: bool,
    origin: TaskOrigin | None = None,
) -> Task:
    """Insert a queued task, its step 0 (the user's query) and any history it continues from.

    ``origin`` says whose task it is and how it came (tenant, idempotency key, AMQP reply
    address); without it the task belongs to the default tenant.
    """
    now = utcnow()
    origin = origin or TaskOrigin()
    task = Task.model_validate(
        task_in,
        update={
            "tools": [tool.model_dump() for tool in task_in.tools],
            "max_steps": max_steps,
            "constrained": constrained,
            "deadline_at": now + timedelta(seconds=timeout_s),
            "created_at": now,
            "updated_at": now,
            **origin.model_dump(),
        },
    )
    session.add(task)
    session.flush()
    session.add(Step(task_id=task.id, index=0, role=StepRole.USER, output=task_in.query, created_at=now))
    for index, turn in enumerate(task_in.history, start=1):
        session.add(_history_step(task.id, index, turn, now))
    return task


def _history_step(task_id: uuid.UUID, index: int, turn: Turn, now: datetime) -> Step:
    """A given history turn stored as a step, exactly as if the system had produced it."""
    role = turn.speaker.step_role
    step = Step(task_id=task_id, index=index, role=role, output=turn.value, created_at=now)
    if role is StepRole.PLANNER:
        decision = parse_planner_output(turn.value)
        # A recorded thought without a Next marker is plain content: the planner speaks again.
        step.next_role = decision.next if decision.marker_found else None
    elif role is StepRole.CALLER:
        step.tool_name = parse_caller_output(turn.value).action
    return step


# The per-step statements, built once with bind parameters: building a statement costs more CPU
# than running it (SQLAlchemy coerces every clause and value and derives a cache key each time).
_TASK_BY_ID = select(Task).where(col(Task.id) == bindparam("task_id"))
_TASK_BY_ID_FOR_UPDATE = _TASK_BY_ID.with_for_update()
_STEPS_OF_TASK = select(Step).where(col(Step.task_id) == bindparam("task_id")).order_by(col(Step.index))
_TASK_TABLE = Task.__table__  # type: ignore[attr-defined]
_STEP_TABLE = Step.__table__  # type: ignore[attr-defined]
_TOUCH_ACTIVE_TASK = (
    update(_TASK_TABLE)
    .where(_TASK_TABLE.c.id == bindparam("task_id"), _TASK_TABLE.c.status.in_(ACTIVE_STATUSES))
    .values(updated_at=bindparam("now"))
    .returning(_TASK_TABLE.c.id)
)
_STEP_COLUMNS = tuple(column.key for column in _STEP_TABLE.columns if column.key != "id")
_INSERT_STEP = insert(_STEP_TABLE)
# PostgreSQL: touch the task as above and insert the step, as one statement (the step's bind names
# apart from the column names, which SQLAlchemy reserves; each value cast so a NULL has its type).
_TOUCHED = _TOUCH_ACTIVE_TASK.cte("touched")
_APPEND_STEP = (
    insert(_STEP_TABLE)
    .from_select(
        _STEP_COLUMNS,
        select(
            *(cast(bindparam(f"p_{key}", type_=_STEP_TABLE.c[key].type), _STEP_TABLE.c[key].type) for key in _STEP_COLUMNS)
        ).select_from(_TOUCHED),
    )
    .add_cte(_TOUCHED)
    .returning(_STEP_TABLE.c.id)
)


def get_task(
    *, session: Session, task_id: uuid.UUID, for_update: bool = False, tenant_id: uuid.UUID | None = None
) -> Task | None:
    """The task, optionally row-locked (PostgreSQL) for a status transition.

    With ``tenant_id`` only that tenant's task: another tenant's is ``None``, as if it did not exist.
    """
    statement = _TASK_BY_ID_FOR_UPDATE if for_update else _TASK_BY_ID
    if tenant_id is not None:
        statement = statement.where(col(Task.tenant_id) == tenant_id)
    return session.exec(statement, params={"task_id": task_id}).first()


def list_steps(*, session: Session, task_id: uuid.UUID) -> list[Step]:
    """All steps of a task in order."""
    return list(session.exec(_STEPS_OF_TASK, params={"task_id": task_id}))


def touch_active_task(*, session: Session, task_id: uuid.UUID) -> bool:
    """Set the task's ``updated_at`` unless it has ended; whether it is still active.

    One ``UPDATE … RETURNING`` instead of a locking read and an update: it takes the same
    row lock, so a cancel or a deadline sweep cannot end the task until this transaction
    commits (the hot path of :func:`shared.pipeline.store_step`).
    """
    return session.execute(_TOUCH_ACTIVE_TASK, {"task_id": task_id, "now": utcnow()}).first() is not None


def append_step_to_active_task(*, session: Session, step: Step) -> bool:
    """PostgreSQL: store ``step`` and set its task's ``updated_at`` in one statement, if the task is active.

    ``WITH touched AS (UPDATE umi_task … RETURNING id) INSERT INTO umi_step … SELECT … FROM
    touched``: the update takes the task's row lock as :func:`touch_active_task` does, and
    in autocommit the statement is its own transaction — one round trip instead of four
    (``BEGIN``, update, insert, ``COMMIT``). False (nothing stored) if the task has ended;
    a step already stored raises ``IntegrityError``.
    """
    params = {f"p_{key}": getattr(step, key) for key in _STEP_COLUMNS}
    params.update(task_id=step.task_id, now=utcnow())  # the task update's parameters
    return session.execute(_APPEND_STEP, params).first() is not None


def insert_step(*, session: Session, step: Step) -> None:
    """INSERT ``step`` as one Core statement.

    Not ``session.add``: the ORM's unit of work costs more CPU than the rest of the
    transaction, and nothing reads the new row back. A duplicate ``(task_id, index)``
    raises ``IntegrityError`` as a flush would.
    """
    session.execute(_INSERT_STEP, {key: getattr(step, key) for key in _STEP_COLUMNS})


def task_tools(task: Task) -> list[ToolDoc]:
    """The task's tools as compact docs."""
    return [ToolDoc.model_validate(tool) for tool in task.tools]


def steps_to_turns(steps: list[Step]) -> list[Turn]:
    """The α-UMi conversation of a trajectory."""
    return [Turn(speaker=Speaker.for_step(step.role), value=step.output) for step in steps]


def get_task_by_idempotency_key(*, session: Session, tenant_id: uuid.UUID, key: str) -> Task | None:
    """The tenant's task submitted with idempotency key ``key``, if any."""
    return session.exec(select(Task).where(Task.tenant_id == tenant_id, Task.idempotency_key == key)).first()


def list_tasks(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    limit: int,
    status: TaskStatus | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Task]:
    """Up to ``limit`` of the tenant's tasks, newest first (``created_at``, then ``id``, descending).

    ``before`` is the ``(created_at, id)`` of the last task of the previous page: keyset
    pagination, so tasks created between pages never shift a page (they sort before it)
    and each task is listed once. Uses the index ``ix_umi_task_tenant_created``.
    """
    statement = select(Task).where(Task.tenant_id == tenant_id)
    if status is not None:
        statement = statement.where(Task.status == status)
    if before is not None:
        statement = statement.where(tuple_(col(Task.created_at), col(Task.id)) < tuple_(*before))
    statement = statement.order_by(col(Task.created_at).desc(), col(Task.id).desc()).limit(limit)
    return list(session.exec(statement))


def cancel_task(*, session: Session, task_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> Task | None:
    """Cancel a task unless it already ended; returns the task (None if unknown, or another tenant's)."""
    task = get_task(session=session, task_id=task_id, for_update=True, tenant_id=tenant_id)
    if task is not None and not lifecycle.is_terminal(task.status):
        lifecycle.finish(task, reason=EndReason.CANCELLED, by=Actor.CLIENT, error="cancelled by request")
    return task


def fail_overdue_tasks(*, session: Session, grace_s: float) -> list[uuid.UUID]:
    """End every unfinished task whose deadline passed more than ``grace_s`` ago.

    Handlers end overdue tasks themselves when they pick up their next job; this
    catches tasks whose job will never come (a message the broker dead-lettered,
    a role nobody consumes), so no task stays ``running`` forever.
    """
    cutoff = utcnow() - timedelta(seconds=grace_s)
    overdue = session.exec(
        select(Task)
        .where(col(Task.status).in_(ACTIVE_STATUSES), Task.deadline_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    for task in overdue:
        lifecycle.finish(task, reason=EndReason.DEADLINE, by=Actor.SWEEP, error="deadline exceeded: no step finished in time")
    return [task.id for task in overdue]


class ClaimState(StrEnum):
    """What :func:`claim_tool_call` found."""

    #: No claim existed: this owner now holds it and runs the call.
    ACQUIRED = "acquired"
    #: The previous owner's lease lapsed (it died): this owner now holds it and runs the call again.
    TAKEN_OVER = "taken_over"
    #: This owner held it already (an in-place retry after a database or broker outage): it goes on.
    RESUMED = "resumed"
    #: A live owner holds it; wait until its step is stored or its lease lapses.
    HELD = "held"
    #: The call already ran.
    COMPLETED = "completed"


@dataclass(frozen=True)
class ToolCallClaim:
    """The claim row and what claiming it found; ``lease_left_s`` is measured on the database's clock."""

    state: ClaimState
    call: ToolCall
    lease_left_s: float = 0.0

    @property
    def runs_here(self) -> bool:
        """Whether the claiming owner now holds the claim and must run the call."""
        return self.state in (ClaimState.ACQUIRED, ClaimState.TAKEN_OVER, ClaimState.RESUMED)


def database_now(session: Session) -> datetime:
    """The current time on PostgreSQL's clock (so worker clocks need not agree); this process's for SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        return session.exec(select(func.statement_timestamp())).one()
    return utcnow()


def claim_tool_call(
    *, session: Session, task_id: uuid.UUID, step_index: int, tool_name: str, arguments: str, owner: str, lease_s: float
) -> ToolCallClaim:
    """Claim the right to run the tool call of step ``step_index`` for ``owner``, under a lease of ``lease_s``.

    A fresh claim is inserted (``INSERT … ON CONFLICT DO NOTHING``: of two racing inserts the
    loser finds the winner's claim, once it is committed, and looks at it as below).
    An unfinished claim whose lease lapsed is taken over and counts an attempt; one
    whose lease is live belongs to a running owner and is left alone, whatever the
    broker says about redelivery: a live worker that lost its broker connection
    still finishes its call.
    """
    while True:
        fresh = _insert_fresh_claim(
            session=session, task_id=task_id, step_index=step_index, tool_name=tool_name, arguments=arguments, owner=owner,
            lease_s=lease_s,
        )  # fmt: skip
        if fresh is not None:
            return ToolCallClaim(state=ClaimState.ACQUIRED, call=fresh)
        now = database_now(session)
        existing = session.exec(
            select(ToolCall).where(ToolCall.task_id == task_id, ToolCall.step_index == step_index).with_for_update()
        ).first()
        if existing is not None:
            break
        # The claim the insert ran into is gone (its task was deleted meanwhile): claim again.
    lease = timedelta(seconds=lease_s)
    if existing.status != ToolCallStatus.RUNNING:
        return ToolCallClaim(state=ClaimState.COMPLETED, call=existing)
    if existing.owner == owner:
        existing.lease_expires_at = now + lease
        return ToolCallClaim(state=ClaimState.RESUMED, call=existing)
    if existing.lease_expires_at is not None and existing.lease_expires_at > now:
        return ToolCallClaim(state=ClaimState.HELD, call=existing, lease_left_s=(existing.lease_expires_at - now).total_seconds())
    existing.attempts += 1
    existing.owner = owner
    existing.lease_expires_at = now + lease
    existing.started_at = now
    return ToolCallClaim(state=ClaimState.TAKEN_OVER, call=existing)


@functools.cache
def _fresh_claim_insert(dialect: str) -> Insert:
    """The claim INSERT for ``dialect``, built once (see the per-step statements above)."""
    table = ToolCall.__table__  # type: ignore[attr-defined]
    if dialect == "postgresql":
        now: Any = func.statement_timestamp()
        expires: Any = now + bindparam("p_lease", type_=Interval())
        statement: Any = postgresql_insert(table)
    else:
        now, expires, statement = bindparam("p_now"), bindparam("p_lease_expires_at"), sqlite_insert(table)
    return (
        statement.values(
            # Bind names differ from the column names: SQLAlchemy reserves those for its own use.
            task_id=bindparam("p_task_id"),
            step_index=bindparam("p_step_index"),
            tool_name=bindparam("p_tool_name"),
            arguments=bindparam("p_arguments"),
            status=ToolCallStatus.RUNNING,
            attempts=1,
            owner=bindparam("p_owner"),
            lease_expires_at=expires,
            started_at=now,
        )
        .on_conflict_do_nothing(index_elements=["task_id", "step_index"])
        .returning(table.c.id, table.c.lease_expires_at, table.c.started_at)
    )


def _insert_fresh_claim(
    *, session: Session, task_id: uuid.UUID, step_index: int, tool_name: str, arguments: str, owner: str, lease_s: float
) -> ToolCall | None:
    """The usual case in one round trip: ``INSERT … ON CONFLICT DO NOTHING RETURNING``; None if a claim exists.

    The lease starts on the database's clock (PostgreSQL's ``statement_timestamp()``), as in
    :func:`database_now`.
    """
    dialect = session.get_bind().dialect.name
    lease = timedelta(seconds=lease_s)
    params: dict[str, Any] = {
        "p_task_id": task_id, "p_step_index": step_index, "p_tool_name": tool_name, "p_arguments": arguments, "p_owner": owner,
    }  # fmt: skip
    if dialect == "postgresql":
        params["p_lease"] = lease
    else:
        params["p_now"] = now = utcnow()
        params["p_lease_expires_at"] = now + lease
    row = session.execute(_fresh_claim_insert(dialect), params).first()
    if row is None:
        return None
    return ToolCall(
        id=row.id,
        task_id=task_id,
        step_index=step_index,
        tool_name=tool_name,
        arguments=arguments,
        status=ToolCallStatus.RUNNING,
        owner=owner,
        lease_expires_at=row.lease_expires_at,
        started_at=row.started_at,
    )


def renew_tool_call_leases(*, session: Session, held: Mapping[int, str], lease_s: float) -> set[int]:
    """Extend the lease of each claim in ``held`` (claim id → owner) that the owner still holds.

    Returns the ids renewed; a claim missing from it was taken over by another owner.
    A completed claim is renewed harmlessly (its lease no longer matters).
    """
    if not held:
        return set()
    expires = database_now(session) + timedelta(seconds=lease_s)
    statement = (
        update(ToolCall)
        .where(tuple_(col(ToolCall.id), col(ToolCall.owner)).in_(list(held.items())))
        .values(lease_expires_at=expires)
        .returning(col(ToolCall.id))
    )
    return set(session.execute(statement).scalars())


def task_public(*, task: Task, steps: list[Step]) -> TaskPublic:
    """The API view of a task and its trajectory."""
    return TaskPublic.model_validate(task, update={"steps": [StepPublic.model_validate(step) for step in steps]})
