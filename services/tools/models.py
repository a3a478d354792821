"""The models at the library's boundary: a call's outcome, its context, and argument parsing.

Usage::

    arguments = parse_action_input('{"q": "cats"}')     # {'q': 'cats'}
    canonical_arguments(arguments)                      # '{"q":"cats"}'
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.tools.errors import ToolErrorKind, ToolInputError
from shared.prompts import Speaker, ToolDoc, Turn, parse_caller_output

__all__ = ["IDEMPOTENCY_KEY_HEADER", "CallContext", "ToolOutcome", "canonical_arguments", "idempotency_key", "parse_action_input"]

#: The HTTP header that carries :func:`idempotency_key` (IETF draft-ietf-httpapi-idempotency-key-header).
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


class ToolOutcome(BaseModel):
    """What one tool call produced: the observation the agent sees, and how it went.

    ``observation`` is already truncated (1024 characters + ``...``) and free of secrets;
    on failure it is a ToolBench error observation and ``error`` says what happened.
    """

    model_config = ConfigDict(frozen=True)

    observation: str
    ok: bool
    backend: str | None = None
    error: str | None = None
    error_kind: ToolErrorKind | None = None
    latency_s: float = Field(ge=0)
    #: Backend attempts made (0 when the call was rejected before reaching a backend).
    attempts: int = Field(default=0, ge=0)
    truncated: bool = False


class CallContext(BaseModel):
    """The task a call belongs to: its tools, the conversation so far, and the call's idempotency key.

    The mirror backend uses the history (to replay the n-th identical call of a trajectory
    with the n-th recorded observation); the HTTP and /virtual backends send the key as
    the ``Idempotency-Key`` header.
    """

    model_config = ConfigDict(frozen=True)

    tools: tuple[ToolDoc, ...] = ()
    history: tuple[Turn, ...] = ()
    idempotency_key: str | None = None

    @property
    def idempotency_headers(self) -> dict[str, str]:
        """``{"Idempotency-Key": key}``, or nothing when the call has no key."""
        return {IDEMPOTENCY_KEY_HEADER: self.idempotency_key} if self.idempotency_key else {}

    @property
    def instruction(self) -> str | None:
        """The task's query: the first user turn, if any."""
        for turn in self.history:
            if turn.speaker is Speaker.USER:
                return turn.value
        return None

    @property
    def tool_names(self) -> frozenset[str]:
        """The Names of the task's tools."""
        return frozenset(tool.Name for tool in self.tools)

    def completed_calls(self) -> Iterator[tuple[str, str]]:
        """``(tool Name, canonical arguments)`` of every caller turn that got an observation."""
        turns = self.history
        for turn, following in zip(turns, turns[1:], strict=False):
            if turn.speaker is Speaker.CALLER and following.speaker is Speaker.OBSERVATION:
                call = parse_caller_output(turn.value)
                try:
                    yield call.action, canonical_arguments(parse_action_input(call.action_input))
                except ToolInputError:
                    continue

    def prior_calls(self, name: str, arguments_key: str) -> int:
        """How many identical calls already got an observation in this history."""
        return sum(1 for call in self.completed_calls() if call == (name, arguments_key))


def idempotency_key(task_id: uuid.UUID, step_index: int) -> str:
    """The idempotency key of a task's tool call: the same for its every retry and takeover.

    A UUID derived from the task and the step, so an API that honours ``Idempotency-Key``
    runs the call once even when a dead worker's call is taken over, and the task id
    itself is not disclosed to the API.
    """
    return str(uuid.uuid5(task_id, f"tool-call/{step_index}"))


def parse_action_input(text: str) -> dict[str, Any]:
    """The caller's Action Input as a JSON object; an empty input means ``{}``.

    Raises :class:`ToolInputError` for text that is not JSON or JSON that is not an object.
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ToolInputError(f"Action Input is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ToolInputError(f"Action Input must be a JSON object, got a JSON {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {list: "array", str: "string"}.get(type(value), "null")


def canonical_arguments(arguments: dict[str, Any]) -> str:
    """One string per argument set regardless of key order and whitespace."""
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
