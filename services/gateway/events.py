"""``GET /v1/tasks/{id}/events``: a task's progress as server-sent events, read from the database.

The stream sends one ``step`` event per stored step, in index order (``id`` = the step's
index, ``data`` = :class:`~shared.schemas.StepEvent`), then one ``end`` event when the task
has ended (``id`` = one past the last step's index, i.e. the number of steps; ``data`` =
:class:`~shared.schemas.TaskPublic`, the same JSON as ``GET /v1/tasks/{id}``) and closes.

Events are numbered by step index and read from the database, never from memory, so any
gateway replica can serve a reconnect: with ``Last-Event-ID: n`` the stream resumes with the
steps whose index is greater than ``n``; after the ``end`` event's id it sends nothing and
closes. The stream polls the database every ``UMI_EVENTS_POLL_INTERVAL_S`` (two indexed
queries, run off the event loop); PostgreSQL ``LISTEN``/``NOTIFY`` would need every writer to
notify, and a missed notification would still need this poll to catch up, so the poll is the
one mechanism. While nothing happens it sends a ``: keep-alive`` comment every
``UMI_EVENTS_KEEPALIVE_S``. A client that disconnects ends the stream at once: Starlette
cancels the response, which cancels this generator at its next ``await``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from services.gateway.auth import CurrentTenant
from services.gateway.responses import AUTHENTICATED, NOT_FOUND
from shared import crud, lifecycle
from shared.db import session_scope
from shared.metrics import EVENT_STREAMS_OPEN
from shared.models import Step
from shared.schemas import StepEvent, TaskPublic
from shared.settings import Settings

__all__ = ["RETRY_MS", "TaskEvents", "end_event_id", "read_new_events", "router"]

#: The reconnection delay (milliseconds) the stream asks ``EventSource`` clients to wait.
RETRY_MS = 1000

router = APIRouter()
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskEvents:
    """What one poll found: the steps after the last event sent, and the task's final state if it ended."""

    steps: list[StepEvent]
    ended: TaskPublic | None


def end_event_id(task: TaskPublic) -> int:
    """The ``end`` event's id: one past the last step's index (the number of steps, indices being 0, 1, …)."""
    return max((step.index for step in task.steps), default=-1) + 1


def read_new_events(engine: Engine, task_id: uuid.UUID, *, after: int) -> TaskEvents:
    """The task's steps with an index above ``after``, and, if the task has ended, its final state.

    The task's status is read before its steps: a task seen ended has all its steps committed
    (a step is stored before, or with, the transaction that ends the task), so the ``end``
    event never overtakes a step.
    """
    with session_scope(engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
        if task is None:  # deleted while streaming: nothing more will come
            raise LookupError(f"no task {task_id}")
        if lifecycle.is_terminal(task.status):
            steps = crud.list_steps(session=session, task_id=task_id)
            return TaskEvents(
                steps=[_step_event(step) for step in steps if step.index > after],
                ended=crud.task_public(task=task, steps=steps),
            )
        new = session.exec(
            select(Step).where(Step.task_id == task_id, col(Step.index) > after).order_by(col(Step.index))
        ).all()
        return TaskEvents(steps=[_step_event(step) for step in new], ended=None)


def _step_event(step: Step) -> StepEvent:
    return StepEvent.model_validate(step, update={"task_id": step.task_id})


def _json(model: StepEvent | TaskPublic) -> str:
    """The model's JSON as the gateway's responses show it (by alias: ``next``), on one line."""
    return model.model_dump_json(by_alias=True)


def _tenant_task(task_id: uuid.UUID, request: Request, tenant: CurrentTenant) -> uuid.UUID:
    """The task id if the tenant owns the task; ``404`` (before any stream starts) otherwise."""
    with session_scope(request.app.state.engine) as session:
        if crud.get_task(session=session, task_id=task_id, tenant_id=tenant.id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")
    return task_id


def _as_json(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Error responses as ``application/json``: given as a ``model``, FastAPI would file them under the
    route's own media type (``text/event-stream``), which they are not."""
    return {
        status_code: {
            "description": response["description"],
            "content": {"application/json": {"schema": response["model"].model_json_schema()}},
        }
        for status_code, response in responses.items()
    }


LastEventId = Annotated[
    int | None,
    Header(
        alias="Last-Event-ID",
        ge=-1,
        description="Resume after this event: only steps with a greater index follow (an integer, -1 = from the start).",
    ),
]


@router.get(
    "/v1/tasks/{task_id}/events",
    response_class=EventSourceResponse,
    responses={
        **_as_json(AUTHENTICATED | NOT_FOUND),
        200: {
            "description": "`step` events (id = step index, data = StepEvent), then one `end` event "
            "(id = number of steps, data = TaskPublic), then the stream closes.",
        },
    },
)
async def task_events(
    task_id: Annotated[uuid.UUID, Depends(_tenant_task)], request: Request, last_event_id: LastEventId = None
) -> AsyncIterator[ServerSentEvent]:
    """A task's steps as server-sent events as they are stored, then its end; resumable with ``Last-Event-ID``."""
    settings: Settings = request.app.state.settings
    engine: Engine = request.app.state.engine
    after = -1 if last_event_id is None else last_event_id
    EVENT_STREAMS_OPEN.inc()
    try:
        # The retry hint, alone: an EventSource client waits this long before it reconnects.
        yield ServerSentEvent(retry=RETRY_MS)
        last_sent = time.monotonic()
        while True:
            try:
                found = await asyncio.to_thread(read_new_events, engine, task_id, after=after)
            except LookupError:
                return
            except OperationalError as exc:
                # The database is unreachable for a moment: keep the stream (and its client) and look again.
                found = TaskEvents(steps=[], ended=None)
                logger.warning("task %s events: the database is unreachable, retrying: %s", task_id, type(exc).__name__)
            for step in found.steps:
                yield ServerSentEvent(event="step", id=str(step.index), raw_data=_json(step))
                after = step.index
                last_sent = time.monotonic()
            if found.ended is not None:
                end_id = end_event_id(found.ended)
                if after < end_id:
                    yield ServerSentEvent(event="end", id=str(end_id), raw_data=_json(found.ended))
                return
            if time.monotonic() - last_sent >= settings.events_keepalive_s:
                yield ServerSentEvent(comment="keep-alive")
                last_sent = time.monotonic()
            await asyncio.sleep(settings.events_poll_interval_s)
    finally:
        EVENT_STREAMS_OPEN.dec()
