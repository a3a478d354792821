"""SQLModel tables: tasks, their steps, and tool calls. The database is the source of truth.

Each concept's fields are declared once, in a base the table, the draft and the
API schema share (the FastAPI full-stack template's ``XBase`` / ``X(table=True)`` /
``XPublic``): :class:`StepBase`, :class:`TaskBase`, :class:`TaskGeneration`,
:class:`TaskState`. Status-like columns are enums stored as their values in
plain ``VARCHAR`` columns, so rows written before they were enum-typed read the same.

Uniqueness constraints carry the idempotency of the queue handlers: a step is
``UNIQUE (task_id, index)`` and a tool call ``UNIQUE (task_id, step_index)``,
so a redelivered message can never add a second step, tool call or answer.
Timestamps are timezone-aware UTC (SQLModel's ``UTCDateTime`` column type).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Enum, ForeignKey, Index, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from shared.lifecycle import EndReason, TaskStatus, utcnow
from shared.prompts import NextRole
from shared.roles import StepRole
from shared.sqltypes import SafeString, SafeText

__all__ = [
    "ApiKey",
    "DEFAULT_TENANT_ID",
    "DEFAULT_TENANT_NAME",
    "Step",
    "StepBase",
    "StepContent",
    "Task",
    "TaskBase",
    "TaskGeneration",
    "TaskMode",
    "TaskState",
    "Tenant",
    "TenantRate",
    "ToolCall",
    "ToolCallStatus",
    "enum_column",
    "utcnow",
]


def enum_column(enum: type[StrEnum], length: int = 16) -> Enum:
    """A column type for ``enum`` that stores its *values* in a ``VARCHAR(length)``.

    Writing a string that is not one of the values fails before it reaches the
    database, with the allowed values in the error.
    """
    return Enum(
        enum, native_enum=False, length=length, validate_strings=True, values_callable=lambda members: [m.value for m in members]
    )


class TaskMode(StrEnum):
    """How far a task runs."""

    #: The α-UMi agent loop until an answer, a give-up or a limit.
    AGENT = "agent"
    #: One planner decision and the caller or summarizer step it calls for (static evaluation).
    STATIC_STEP = "static_step"


class TaskBase(SQLModel):
    """The task's query: asked for, stored and shown."""

    query: str = Field(min_length=1, max_length=32_000, sa_type=SafeText, description="The user's request.")


class TaskGeneration(SQLModel):
    """How a task runs, as the client asks for it and the task stores it (defaults from ``UMI_*``)."""

    mode: TaskMode = Field(
        default=TaskMode.AGENT,
        sa_type=enum_column(TaskMode),
        sa_column_kwargs={"server_default": TaskMode.AGENT.value},
        description="agent, or static_step for one evaluated decision.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature; default UMI_TEMPERATURE.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096, description="Per step; default UMI_MAX_NEW_TOKENS.")


class TaskState(TaskBase):
    """A stored task as the API shows it: where it stands and how it ended."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: TaskStatus = Field(default=TaskStatus.QUEUED, sa_type=enum_column(TaskStatus), index=True)
    answer: str | None = Field(default=None, sa_type=SafeText)
    error: str | None = Field(default=None, sa_type=SafeText)
    end_reason: EndReason | None = Field(default=None, sa_type=enum_column(EndReason, 32))
    max_steps: int
    deadline_at: datetime
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


#: The tenant every task belongs to when ``UMI_AUTH=off`` (and tasks stored before tenants existed).
DEFAULT_TENANT_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
DEFAULT_TENANT_NAME = "default"


class Tenant(SQLModel, table=True):
    """A client of the product (another backend): its tasks are invisible to every other tenant.

    The limits are this tenant's own; ``None`` takes the ``UMI_TENANT_*`` default.
    """

    __tablename__ = "umi_tenant"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    rate_per_s: float | None = None
    burst: int | None = None
    max_in_flight: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    """An API key of a tenant, stored as its SHA-256 (the key itself is shown once, at creation)."""

    __tablename__ = "umi_api_key"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_tenant.id", ondelete="CASCADE"), index=True, nullable=False))
    #: The key's first characters, shown by ``umi keys list`` so an operator can tell keys apart.
    prefix: str = Field(max_length=16)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class TenantRate(SQLModel, table=True):
    """A tenant's request-rate state (GCRA's theoretical arrival time), shared by every gateway replica."""

    __tablename__ = "umi_tenant_rate"

    tenant_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_tenant.id", ondelete="CASCADE"), primary_key=True))
    #: Seconds since the epoch at which the tenant's bucket is empty again.
    tat: float = 0.0


class Task(TaskState, TaskGeneration, table=True):
    """One agent task: a query, its tools, and how it ended (status changes: :mod:`shared.lifecycle`)."""

    __tablename__ = "umi_task"
    __table_args__ = (
        # One task per idempotency key and tenant (NULL keys never collide).
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_umi_task_tenant_idempotency_key"),
        # Keyset pagination of a tenant's tasks, newest first.
        Index("ix_umi_task_tenant_created", "tenant_id", "created_at", "id"),
        # The relay's work lists (outbox, task ends) stay small however many tasks are stored.
        Index(
            "ix_umi_task_unenqueued",
            "created_at",
            postgresql_where=text("enqueued_at IS NULL"),
            sqlite_where=text("enqueued_at IS NULL"),
        ),
        Index(
            "ix_umi_task_end_unpublished",
            "id",
            postgresql_where=text("end_published_at IS NULL"),
            sqlite_where=text("end_published_at IS NULL"),
        ),
    )

    tenant_id: uuid.UUID = Field(
        default=DEFAULT_TENANT_ID, sa_column=Column(ForeignKey("umi_tenant.id"), nullable=False, index=True)
    )
    idempotency_key: str | None = Field(default=None, max_length=255, sa_type=SafeString(255))
    #: SHA-256 of the request the key was first used with: the same key with another request is refused.
    request_fingerprint: str | None = Field(default=None, max_length=64)
    #: AMQP ingress: where the final state is published, and the correlation id it carries.
    reply_to: str | None = Field(default=None, max_length=255, sa_type=SafeString(255))
    correlation_id: str | None = Field(default=None, max_length=255, sa_type=SafeString(255))
    tools: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    constrained: bool
    finished_at: datetime | None = None
    #: Outbox: when the first planner job was confirmed by the broker (NULL: still to publish).
    enqueued_at: datetime | None = None
    #: When the end event (and the reply, if any) was confirmed by the broker (NULL: still to publish).
    end_published_at: datetime | None = None


class StepBase(SQLModel):
    """A step's fields as the API shows them; the table and the draft add what only they hold."""

    role: StepRole = Field(sa_type=enum_column(StepRole))
    output: str = Field(sa_type=SafeText)
    #: Planner steps: who acts next (``caller``, ``conclusion``, ``give up``); the API calls it ``next``.
    next_role: NextRole | None = Field(default=None, sa_type=enum_column(NextRole), schema_extra={"serialization_alias": "next"})
    tool_name: str | None = Field(default=None, max_length=256, sa_type=SafeString(256))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    latency_s: float | None = None
    #: When the role began producing the step (NULL for the user's query and given history).
    started_at: datetime | None = None


class StepContent(StepBase):
    """A step as a handler produces it and the table stores it (not shown by the API)."""

    #: The LLM's text before parsing (planner outputs are cut after their Next marker).
    raw_output: str | None = Field(default=None, sa_type=SafeText)
    attempts: int | None = None


class Step(StepContent, table=True):
    """One turn of a task's trajectory (user query, planner, caller, observation, answer)."""

    __tablename__ = "umi_step"
    __table_args__ = (
        UniqueConstraint("task_id", "index", name="uq_umi_step_task_index"),
        # The event relay's work list stays small however many steps are stored.
        Index(
            "ix_umi_step_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    task_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_task.id", ondelete="CASCADE"), index=True, nullable=False))
    index: int
    created_at: datetime = Field(default_factory=utcnow)
    #: When the step's event on ``umi.events`` was confirmed by the broker (NULL: still to publish).
    published_at: datetime | None = None


class ToolCallStatus(StrEnum):
    """Values of :attr:`ToolCall.status`."""

    RUNNING = "running"
    COMPLETED = "completed"


class ToolCall(SQLModel, table=True):
    """A claimed-then-completed tool execution; claimed before the call so it runs once.

    A claim is held by an ``owner`` under a lease (``lease_expires_at``) that the owner
    keeps renewing while the call runs; another copy of the job takes over only a
    lapsed lease, i.e. an owner that died.
    """

    __tablename__ = "umi_tool_call"
    __table_args__ = (UniqueConstraint("task_id", "step_index", name="uq_umi_tool_call_task_step"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_task.id", ondelete="CASCADE"), index=True, nullable=False))
    step_index: int
    tool_name: str = Field(max_length=256, sa_type=SafeString(256))
    arguments: str = Field(sa_column=Column(SafeText, nullable=False))
    status: ToolCallStatus = Field(sa_type=enum_column(ToolCallStatus))
    attempts: int = 1
    #: Who runs the call now: one id per claiming attempt (see ``services/tools/lease.py``).
    owner: str | None = Field(default=None, max_length=128)
    #: The owner renews this while the call runs; only a claim whose lease lapsed may be taken over.
    lease_expires_at: datetime | None = None
    ok: bool | None = None
    backend: str | None = Field(default=None, max_length=32)
    error: str | None = Field(default=None, sa_column=Column(SafeText, nullable=True))
    latency_s: float | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
