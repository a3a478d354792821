"""What a role message must look like before Celery is asked to run it.

Celery trusts its producers: a message whose body is ``5`` or whose ``task`` header
is a list crashes the worker's consumer (the worker exits), one with an ``eta`` is
held in memory until then, an expired one is dropped, and callbacks in a message
make the worker publish more tasks. umi's producers send one shape only, a Celery
protocol-2 JSON message::

    headers  {"task": "umi.<role>.step", "id": "<str>", ...}   (no eta, expires, callbacks)
    body     [[<job>], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]

so the worker's consumer checks that shape first (:func:`refusal_reason`) and
dead-letters anything else with the reason. The job itself (``<job>``, a
:class:`~shared.schemas.StepJob`) is validated by the step task.
"""

from __future__ import annotations

from typing import Annotated, Any

from kombu.message import Message
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

__all__ = ["MAX_MESSAGE_BYTES", "describe_validation_error", "refusal_reason"]

#: The largest body a role message may have; a step job is about 150 bytes.
MAX_MESSAGE_BYTES = 64 * 1024
ACCEPTED_CONTENT_TYPE = "application/json"

_Limit = StrictFloat | StrictInt | None


class TaskHeaders(BaseModel):
    """The Celery headers the worker reads, typed as Celery needs them (others are kept, unread)."""

    model_config = ConfigDict(extra="allow")

    task: StrictStr = Field(min_length=1)
    id: StrictStr = Field(min_length=1)
    shadow: StrictStr | None = None
    root_id: StrictStr | None = None
    parent_id: StrictStr | None = None
    group: StrictStr | None = None
    argsrepr: StrictStr | None = None
    kwargsrepr: StrictStr | None = None
    ignore_result: StrictBool | None = None
    retries: StrictInt | None = None
    timelimit: tuple[_Limit, _Limit] | None = None
    # Deferred or expiring jobs would be held or silently dropped by Celery; umi sends none.
    eta: None = None
    expires: None = None
    # Callbacks would make the worker publish further tasks; umi's jobs chain through the database.
    callbacks: None = None
    errbacks: None = None
    chain: None = None
    chord: None = None


class Embed(BaseModel):
    """The third element of the body: Celery's workflow options, all unused."""

    model_config = ConfigDict(extra="allow")

    callbacks: None = None
    errbacks: None = None
    chain: None = None
    chord: None = None


class TaskBody(BaseModel):
    """``[args, kwargs, embed]`` with exactly one argument (the job) and no keyword arguments."""

    args: Annotated[list[Any], Field(min_length=1, max_length=1)]
    kwargs: Annotated[dict[str, Any], Field(max_length=0)]
    embed: Embed


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """The first few problems of ``exc`` as ``where: what`` (``body`` when at the top)."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def refusal_reason(message: Message) -> str | None:
    """Why ``message`` cannot be a umi task message, or None when Celery may run it.

    Checks the size, content type, headers and body structure; never raises.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return "not a Celery task message (no task header)"
    if len(message.body or b"") > MAX_MESSAGE_BYTES:
        return f"message too large: {len(message.body)} bytes (a role message has at most {MAX_MESSAGE_BYTES})"
    if message.content_type != ACCEPTED_CONTENT_TYPE:
        return f"content type {message.content_type!r} refused: role messages are {ACCEPTED_CONTENT_TYPE}"
    try:
        TaskHeaders.model_validate(headers)
    except ValidationError as exc:
        return f"invalid Celery headers: {describe_validation_error(exc)}"
    try:
        decoded = message.decode()
    except Exception as exc:  # kombu raises DecodeError, ContentDisallowed, UnicodeDecodeError, …
        return f"undecodable message ({message.content_type}): {exc}"
    if not isinstance(decoded, list) or len(decoded) != 3:
        return f"invalid Celery body: expected [args, kwargs, embed], got {_shape(decoded)}"
    try:
        TaskBody.model_validate(dict(zip(("args", "kwargs", "embed"), decoded, strict=True)))
    except ValidationError as exc:
        return f"invalid Celery body: {describe_validation_error(exc)}"
    return None


def _shape(value: object) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "null" if value is None else type(value).__name__
