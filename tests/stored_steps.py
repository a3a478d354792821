"""A gateway whose tasks the test runs itself: their steps written straight to the database, as a worker's
transaction would, so the test controls when each appears."""

from __future__ import annotations

import uuid

from services.gateway.app import create_app
from shared import crud, lifecycle
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.lifecycle import Actor, EndReason
from shared.models import Step
from shared.roles import StepRole
from shared.settings import Settings, load_settings
from tests.pipeline_helpers import CollectingDispatcher

#: A task body the gateway accepts (nothing runs it unless the test does).
TASK = {"query": "Is test@example.com a valid address?", "tools": [{"Name": "validate_email", "function": "checks an address"}]}


def add_step(database_url: str, task_id: uuid.UUID, index: int) -> None:
    """Store step ``index`` (a planner thought ``thought <index>``) and mark the task running."""
    with session_scope(get_engine(database_url)) as session:
        task = crud.get_task(session=session, task_id=task_id, for_update=True)
        assert task is not None
        lifecycle.start(task)
        session.add(Step(task_id=task_id, index=index, role=StepRole.PLANNER, output=f"thought {index}", latency_s=0.25))


def finish_task(database_url: str, task_id: uuid.UUID, answer: str = "It is valid.") -> None:
    """Store the summarizer's answer and end the task in one transaction, as the pipeline does."""
    with session_scope(get_engine(database_url)) as session:
        task = crud.get_task(session=session, task_id=task_id, for_update=True)
        assert task is not None
        lifecycle.start(task)
        index = len(crud.list_steps(session=session, task_id=task_id))
        session.add(Step(task_id=task_id, index=index, role=StepRole.SUMMARIZER, output=answer))
        lifecycle.finish(task, reason=EndReason.ANSWERED, by=Actor.SUMMARIZER, answer=answer)


def gateway_settings(database_url: str, **overrides: object) -> Settings:
    """Settings of an in-process test gateway: auth off unless overridden, events polled every 50 ms."""
    return load_settings(**{"database_url": database_url, "auth": False, "events_poll_interval_s": 0.05, "events_keepalive_s": 0.3, **overrides})


def start_gateway(settings: Settings) -> ServerThread:
    """The gateway on real HTTP (``with start_gateway(...) as server``); jobs are collected, not published."""
    return ServerThread(create_app(settings, dispatcher=CollectingDispatcher()))
