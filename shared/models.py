"""SQLModel tables: tasks, their steps, and tool calls. The database is the source of truth.

Uniqueness constraints carry the idempotency of the queue handlers: a step is
``UNIQUE (task_id, index)`` and a tool call ``UNIQUE (task_id, step_index)``,
so a redelivered message can never add a second step, tool call or answer.
Timestamps are timezone-aware UTC (SQLModel's ``UTCDateTime`` column type).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, ForeignKey, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.sqltypes import SafeString, SafeText

__all__ = ["Step", "Task", "ToolCall", "ToolCallStatus", "utcnow"]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Task(SQLModel, table=True):
    """One agent task: a query, its tools, and how it ended."""

    __tablename__ = "umi_task"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: str = Field(max_length=16, index=True)
    query: str = Field(sa_column=Column(SafeText, nullable=False))
    tools: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    answer: str | None = Field(default=None, sa_column=Column(SafeText, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(SafeText, nullable=True))
    end_reason: str | None = Field(default=None, max_length=32)
    max_steps: int
    constrained: bool
    mode: str = Field(default="agent", max_length=16, sa_column_kwargs={"server_default": "agent"})
    temperature: float | None = None
    max_new_tokens: int | None = None
    deadline_at: datetime
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Step(SQLModel, table=True):
    """One turn of a task's trajectory (user query, planner, caller, observation, answer)."""

    __tablename__ = "umi_step"
    __table_args__ = (UniqueConstraint("task_id", "index", name="uq_umi_step_task_index"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_task.id", ondelete="CASCADE"), index=True, nullable=False))
    index: int
    role: str = Field(max_length=16)
    output: str = Field(sa_column=Column(SafeText, nullable=False))
    #: The LLM's text before parsing (planner outputs are cut after their Next marker).
    raw_output: str | None = Field(default=None, sa_column=Column(SafeText, nullable=True))
    #: Planner steps: who acts next (``caller``, ``conclusion``, ``give up``).
    next_role: str | None = Field(default=None, max_length=16)
    tool_name: str | None = Field(default=None, max_length=256, sa_type=SafeString(256))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    latency_s: float | None = None
    attempts: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ToolCallStatus:
    """Values of :attr:`ToolCall.status`."""

    RUNNING = "running"
    COMPLETED = "completed"


class ToolCall(SQLModel, table=True):
    """A claimed-then-completed tool execution; claimed before the call so it runs once."""

    __tablename__ = "umi_tool_call"
    __table_args__ = (UniqueConstraint("task_id", "step_index", name="uq_umi_tool_call_task_step"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: uuid.UUID = Field(sa_column=Column(ForeignKey("umi_task.id", ondelete="CASCADE"), index=True, nullable=False))
    step_index: int
    tool_name: str = Field(max_length=256, sa_type=SafeString(256))
    arguments: str = Field(sa_column=Column(SafeText, nullable=False))
    status: str = Field(max_length=16)
    attempts: int = 1
    ok: bool | None = None
    backend: str | None = Field(default=None, max_length=32)
    error: str | None = Field(default=None, sa_column=Column(SafeText, nullable=True))
    latency_s: float | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
