"""Message and API schemas: the typed boundaries between services.

* :class:`StepJob` is the body of every message on a role queue.
* :class:`TaskCreate` / :class:`TaskAccepted` / :class:`TaskPublic` are the
  gateway's request and response bodies. Their fields are declared once, in the
  bases they share with the tables (:mod:`shared.models`).

The task's statuses and end reasons belong to :mod:`shared.lifecycle`; they are
re-exported here because the API shows them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from shared.lifecycle import TERMINAL_STATUSES, EndReason, TaskStatus
from shared.models import DEFAULT_TENANT_ID, StepBase, TaskBase, TaskGeneration, TaskMode, TaskState
from shared.prompts import Speaker, ToolDoc, Turn
from shared.roles import StepRole

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "EndReason",
    "ErrorBody",
    "ErrorDetail",
    "IngressEnvelope",
    "StepEvent",
    "TaskPage",
    "TaskSummary",
    "StepJob",
    "StepPublic",
    "RecordedTaskCreate",
    "TaskAccepted",
    "TaskCreate",
    "TaskPublic",
    "TaskMode",
    "TaskOrigin",
    "TaskStatus",
    "TERMINAL_STATUSES",
]

JOB_SCHEMA_VERSION = 1


class StepJob(BaseModel):
    """One unit of work on a role queue: produce step ``step_index`` of task ``task_id``.

    The database holds the trajectory; the message only names the task and the
    step, so a redelivered message can always be recognised as a duplicate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = JOB_SCHEMA_VERSION
    task_id: uuid.UUID
    step_index: int = Field(ge=1)
    role: StepRole

    @field_validator("role")
    @classmethod
    def _not_user(cls, value: StepRole) -> StepRole:
        if value is StepRole.USER:
            raise ValueError("the user step is written by the gateway, never queued")
        return value


class TaskCreate(TaskBase, TaskGeneration):
    """``POST /v1/tasks`` body."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    tools: list[ToolDoc] = Field(min_length=1, max_length=64, description="Compact ToolBench docs.")
    max_steps: int | None = Field(default=None, ge=1, le=100, description="Planner steps before the task fails.")
    timeout_s: float | None = Field(default=None, gt=0, le=86_400, description="Deadline, seconds from now.")
    constrained: bool | None = Field(default=None, description="Constrained decoding; default from UMI_CONSTRAINED.")
    history: list[Turn] = Field(
        default_factory=list,
        max_length=200,
        description="Conversation after the query to continue from (α-UMi turns: {from, value}).",
    )

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be blank")
        return value

    @field_validator("history")
    @classmethod
    def _history_hands_over_to_the_planner(cls, history: list[Turn]) -> list[Turn]:
        for before, after in zip(history, history[1:], strict=False):
            if before.speaker is Speaker.CALLER and after.speaker is not Speaker.OBSERVATION:
                raise ValueError("a caller turn must be followed by its observation")
            if before.speaker is Speaker.CONCLUSION:
                raise ValueError("the history must not continue after a conclusion")
        if history and history[-1].speaker in (Speaker.CALLER, Speaker.CONCLUSION):
            raise ValueError("the history must end where the planner acts next (not with a caller or conclusion turn)")
        return history

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolDoc]) -> list[ToolDoc]:
        seen: set[str] = set()
        for tool in tools:
            if tool.Name in seen:
                raise ValueError(f"duplicate tool Name {tool.Name!r}")
            seen.add(tool.Name)
        return tools


class RecordedTaskCreate(TaskCreate):
    """A task rebuilt from a recorded test record (static evaluation), not a user's request.

    The α-UMi reference evaluates every decision point with its tool list and history as
    recorded, so two checks that protect API users do not apply here: public ToolBench
    test records list two tools of one ``Name`` now and then (rendered as given), and
    some histories go on after a ``conclusion`` turn. The history must still end where
    the planner acts next.
    """

    @field_validator("history")
    @classmethod
    def _history_hands_over_to_the_planner(cls, history: list[Turn]) -> list[Turn]:
        if history and history[-1].speaker is Speaker.CALLER:
            raise ValueError("the history must end where the planner acts next (not with a caller turn)")
        return history

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolDoc]) -> list[ToolDoc]:
        return tools


class TaskOrigin(BaseModel):
    """Whose a task is and how it came: stored with it, never part of a request body."""

    model_config = ConfigDict(frozen=True)

    tenant_id: uuid.UUID = DEFAULT_TENANT_ID
    #: ``Idempotency-Key`` header (HTTP) or ``message_id`` (AMQP): one task per key and tenant.
    idempotency_key: str | None = Field(default=None, max_length=255)
    #: SHA-256 of the request, so a key reused for another request is refused, not answered wrongly.
    request_fingerprint: str | None = None
    #: AMQP ingress: the queue the final state is published to, and the correlation id it carries.
    reply_to: str | None = Field(default=None, max_length=255)
    correlation_id: str | None = Field(default=None, max_length=255)


class TaskAccepted(BaseModel):
    """``202`` response to ``POST /v1/tasks``."""

    id: uuid.UUID
    status: TaskStatus


class StepPublic(StepBase):
    """One step of a task as the API shows it: its content, timing and token usage."""

    index: int
    created_at: datetime
    #: Shown as ``latency_ms``.
    latency_s: float | None = Field(default=None, exclude=True)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def latency_ms(self) -> float | None:
        """How long the role took to produce the step (LLM or tool call), in milliseconds."""
        return None if self.latency_s is None else round(self.latency_s * 1000, 3)


class TaskPublic(TaskState):
    """``GET /v1/tasks/{id}`` response, the ``end`` event's data and the AMQP reply: a task and its steps."""

    steps: list[StepPublic]


class TaskSummary(TaskState):
    """One task in ``GET /v1/tasks`` (without its steps)."""


class TaskPage(BaseModel):
    """A page of ``GET /v1/tasks``, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[TaskSummary]
    next_cursor: str | None = None


class StepEvent(StepPublic):
    """A stored step as an event (SSE ``step``; AMQP ``umi.events``, routing key ``task.<id>.step``)."""

    task_id: uuid.UUID


EVENT_SCHEMA_VERSION = 1


class IngressEnvelope(BaseModel):
    """The body of a message on ``umi.ingress``: a task as ``POST /v1/tasks`` takes it.

    The AMQP properties carry the rest: ``message_id`` (the idempotency key),
    ``correlation_id``, optional ``reply_to``, and the API key in the ``x-api-key`` header.
    """

    model_config = ConfigDict(extra="forbid", title="UmiIngressEnvelope")

    schema_version: Literal[1]
    task: TaskCreate


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``type``, a readable ``message``, and the offending fields if any."""

    type: str
    message: str
    detail: list[dict[str, object]] | None = None
    #: Over a tenant's limits (AMQP ingress): seconds to wait before publishing again.
    retry_after_s: float | None = None


class ErrorBody(BaseModel):
    """An error answered over AMQP (to ``reply_to``) and by the gateway's non-validation errors."""

    error: ErrorDetail
