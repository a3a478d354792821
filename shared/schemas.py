"""Message and API schemas: the typed boundaries between services.

* :class:`StepJob` is the body of every message on a role queue.
* :class:`TaskCreate` / :class:`TaskAccepted` / :class:`TaskPublic` are the
  gateway's request and response bodies. Their fields are declared once, in the
  bases they share with the tables (:mod:`shared.models`).

The task's statuses and end reasons belong to :mod:`shared.lifecycle`; they are
re-exported here because the API shows them.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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
    "SubmittedToolDoc",
    "SubmittedTurn",
    "RecordedTaskCreate",
    "TaskAccepted",
    "TaskCreate",
    "TaskPublic",
    "TaskMode",
    "TaskOrigin",
    "TaskStatus",
    "TERMINAL_STATUSES",
    "bounded_text",
    "safe_validation_errors",
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


#: Limits on what a client may send (``docs/api.md`` "Limits and errors"). The body as a whole is
#: bounded by ``UMI_MAX_BODY_BYTES`` before it is read; these name the field that is too big.
MAX_TOOLS = 64
MAX_TOOL_FUNCTION_CHARS = 8_192
#: Characters of the tool's ``input`` as the models see it (``json.dumps``, as :meth:`ToolDoc.rendered`).
MAX_TOOL_INPUT_CHARS = 16_384
#: Levels of objects/arrays inside a tool's ``input`` (``{"a": {"b": 1}}`` is 2).
MAX_TOOL_INPUT_DEPTH = 8
MAX_HISTORY_TURNS = 200
MAX_TURN_CHARS = 32_000
#: Nesting anywhere in a request; deeper is refused before anything else is looked at.
MAX_BODY_DEPTH = 32
#: Longest piece of client input echoed back in an error (the rest is cut, marked with "…").
MAX_ECHO_CHARS = 200
#: Most error items in one answer; a body with thousands of bad values gets the first ones.
MAX_ERRORS = 50


class SubmittedToolDoc(ToolDoc):
    """A tool doc as a client sends it: a :class:`ToolDoc` with bounded text and ``input``.

    The bounds belong to the request, not to :class:`ToolDoc`: stored tasks and recorded
    ToolBench data are read back as plain tool docs whatever their size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, from_attributes=True)

    function: str = Field(max_length=MAX_TOOL_FUNCTION_CHARS, description="What the tool does.")
    input: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Its parameters; at most {MAX_TOOL_INPUT_CHARS} characters as JSON, {MAX_TOOL_INPUT_DEPTH} levels deep.",
    )

    @field_validator("input")
    @classmethod
    def _input_is_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value) > MAX_TOOL_INPUT_DEPTH:
            raise ValueError(f"input is nested deeper than {MAX_TOOL_INPUT_DEPTH} levels")
        if (size := len(json.dumps(value))) > MAX_TOOL_INPUT_CHARS:
            raise ValueError(f"input is {size} characters as JSON; at most {MAX_TOOL_INPUT_CHARS}")
        return value


class SubmittedTurn(Turn):
    """A history turn as a client sends it: a :class:`Turn` with a bounded ``value`` and no other keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, from_attributes=True)

    value: str = Field(max_length=MAX_TURN_CHARS)


def _depth(value: object) -> int:
    """Levels of dicts/lists in ``value`` (0 for a scalar); callers bound the input's depth first."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _unsafe_text(text: str) -> str | None:
    """Why ``text`` cannot be stored or rendered as given (NUL, lone surrogate), or None."""
    if "\x00" in text:
        return "must not contain NUL characters (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain lone surrogates (\\ud800-\\udfff without a pair)"
    return None


def _untrusted_json_errors(value: object, loc: tuple[str | int, ...] = ()) -> Iterator[InitErrorDetails]:
    """Each NUL, lone surrogate or non-finite number in decoded JSON ``value``, at its location.

    PostgreSQL refuses NUL in text, UTF-8 has no lone surrogates and JSON has no NaN or
    Infinity, yet Python's ``json`` accepts all three; so every request is checked once, here,
    whether it came over HTTP or AMQP. Model instances (built in Python) are trusted.
    """
    if len(loc) > MAX_BODY_DEPTH:
        yield _error("too_deep", f"nested deeper than {MAX_BODY_DEPTH} levels", loc, "…")
    elif isinstance(value, str):
        if reason := _unsafe_text(value):
            yield _error("unsafe_text", f"String {reason}", loc, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield _error("finite_number", "Input should be a finite number (not NaN or Infinity)", loc, str(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (reason := _unsafe_text(key)):
                yield _error("unsafe_text", f"Key {reason}", (*loc, key), key)
            else:
                yield from _untrusted_json_errors(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _untrusted_json_errors(item, (*loc, index))


def _error(kind: str, message: str, loc: tuple[str | int, ...], value: str) -> InitErrorDetails:
    # The location of a key that is itself unsafe is reported safely: the handler masks it.
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


class TaskCreate(TaskBase, TaskGeneration):
    """``POST /v1/tasks`` body."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    tools: list[SubmittedToolDoc] = Field(min_length=1, max_length=MAX_TOOLS, description="Compact ToolBench docs.")
    max_steps: int | None = Field(default=None, ge=1, le=100, description="Planner steps before the task fails.")
    timeout_s: float | None = Field(default=None, gt=0, le=86_400, description="Deadline, seconds from now.")
    constrained: bool | None = Field(default=None, description="Constrained decoding; default from UMI_CONSTRAINED.")
    history: list[SubmittedTurn] = Field(
        default_factory=list,
        max_length=MAX_HISTORY_TURNS,
        description="Conversation after the query to continue from (α-UMi turns: {from, value}).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unsafe_json(cls, data: Any) -> Any:
        # The first few say what is wrong; thousands would only amplify a hostile body.
        if errors := list(itertools.islice(_untrusted_json_errors(data), MAX_ERRORS)):
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

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

    @model_validator(mode="before")
    @classmethod
    def _read_api_names(cls, data: Any) -> Any:
        """Read back what the API shows (``next``, ``latency_ms``), so a client's parsed step loses nothing."""
        if not isinstance(data, dict):
            return data
        if "next" in data and "next_role" not in data:
            data = {**data, "next_role": data["next"]}
        if data.get("latency_s") is None and data.get("latency_ms") is not None:
            data = {**data, "latency_s": data["latency_ms"] / 1000}
        return data

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
    """An error answered over AMQP (to ``reply_to``); the HTTP API answers ``{"detail": ...}`` as FastAPI does."""

    error: ErrorDetail


def safe_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """``errors`` (pydantic/FastAPI error dicts) as JSON-safe, bounded items: ``type``, ``loc``, ``msg``, and
    ``input``/``ctx`` when they are short scalars.

    What a client sent can be anything (NaN, lone surrogates, megabytes): echoed as is, it made
    FastAPI's own 422 fail to encode. The gateway's 422s and the AMQP ingress's error replies
    (``ErrorDetail.detail``) both go through here.
    """
    items: list[dict[str, Any]] = []
    for error in list(errors)[:MAX_ERRORS]:
        error = error if isinstance(error, Mapping) else {"msg": str(error)}
        item: dict[str, Any] = {
            "type": bounded_text(error.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else bounded_text(part) for part in error.get("loc", ())],
            "msg": bounded_text(error.get("msg", "")),
        }
        if (echo := _echoable(error.get("input"))) is not None:
            item["input"] = echo
        if isinstance(context := error.get("ctx"), Mapping):
            item["ctx"] = {bounded_text(key): _echoable(value, default=bounded_text(value)) for key, value in context.items()}
            if item["type"] == "json_invalid" and "error" in item["ctx"]:
                item["msg"] = f"{item['msg']}: {item['ctx']['error']}"
        items.append(item)
    return items


def bounded_text(value: object) -> str:
    """``value`` as a valid UTF-8 string of at most :data:`MAX_ECHO_CHARS` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + "…"
    # Lone surrogates cannot be encoded; NUL is valid JSON (\u0000) and stays visible as such.
    return text.encode("utf-8", "replace").decode("utf-8")


def _echoable(value: object, default: str | None = None) -> str | int | float | bool | None:
    """A scalar as it can be echoed in JSON (short, non-finite floats spelled out); ``default`` for anything else."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return bounded_text(value)
    return default
