"""The HTTP front door (FastAPI): accept tasks, show their trajectories, cancel them.

The task row (and its step 0, the query) is committed before the ``202`` is
sent; then the first planner job is published with a broker confirm, one attempt
bounded by ``UMI_PUBLISH_TIMEOUT_S``. If the broker is away the client still gets
its ``202``: the relay running in this process (``shared/relay.py``) publishes the
job when the broker is back, and publishes every step and task end on ``umi.events``
(docs/architecture.md, "Outbox and events"). A background
sweep ends tasks that are past their deadline and whose next job will never
come (e.g. a message the broker dead-lettered after repeated worker crashes);
one replica per deployment runs it (``services/gateway/sweep.py``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response, status

from services.gateway.auth import CurrentTenant
from services.gateway.sweep import DeadlineSweeper
from shared import crud
from shared.context_window import PromptDoesNotFit
from shared.db import ensure_schema_current, get_engine, session_scope
from shared.dispatch import Dispatcher, request_path_dispatcher
from shared.metrics import CONTENT_TYPE, exposition
from shared.relay import Relay
from shared.schemas import TaskAccepted, TaskCreate, TaskOrigin, TaskPublic
from shared.settings import Settings, get_settings
from shared.tasks import submit_task
from shared.topology import Topology

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The gateway app. Without ``dispatcher`` it publishes through Celery to the configured broker."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_schema_current(settings.database_url)
        if not settings.auth:
            logger.warning("UMI_AUTH=off: no API keys are checked; every task belongs to the default tenant")
        app.state.engine = get_engine(settings.database_url)
        app.state.sweeper = DeadlineSweeper(app.state.engine, interval_s=settings.sweep_interval_s)
        background = [asyncio.create_task(app.state.sweeper.run())]
        if dispatcher is None:
            own = request_path_dispatcher(settings, name="umi.gateway")
            with own.app.connection_for_write() as connection:
                Topology(settings).declare(connection)
            app.state.dispatcher = own
            # The relay publishes on the same pooled connections. A test that injects a dispatcher
            # runs no relay: it drives shared.relay itself (it owns where jobs go).
            app.state.relay = Relay(app.state.engine, settings, dispatcher=own, connections=own.app.pool)
            background.append(asyncio.create_task(app.state.relay.run()))
        else:
            app.state.dispatcher = dispatcher
        yield
        for running in background:
            running.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.to_thread(app.state.sweeper.close)

    app = FastAPI(title="α-UMi on queues", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings

    @app.post("/v1/tasks", status_code=status.HTTP_202_ACCEPTED, response_model=TaskAccepted)
    def create_task(task_in: TaskCreate, request: Request, tenant: CurrentTenant) -> TaskAccepted:
        """Accept a task; the planner takes its first step asynchronously."""
        try:
            task = submit_task(
                engine=request.app.state.engine,
                dispatcher=request.app.state.dispatcher,
                settings=settings,
                task_in=task_in,
                origin=TaskOrigin(tenant_id=tenant.id),
            )
        except PromptDoesNotFit as exc:
            # The same shape as FastAPI's own 422s, naming the field.
            detail = [{"type": "value_error", "loc": ["body", "max_new_tokens"], "msg": str(exc)}]
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from exc
        return TaskAccepted(id=task.id, status=task.status)

    @app.get("/v1/tasks/{task_id}", response_model=TaskPublic)
    def read_task(task_id: uuid.UUID, request: Request, tenant: CurrentTenant) -> TaskPublic:
        """A task's status, answer and steps so far."""
        with session_scope(request.app.state.engine) as session:
            task = crud.get_task(session=session, task_id=task_id, tenant_id=tenant.id)
            if task is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")
            return crud.task_public(task=task, steps=crud.list_steps(session=session, task_id=task_id))

    @app.post("/v1/tasks/{task_id}/cancel", response_model=TaskPublic)
    def cancel_task(task_id: uuid.UUID, request: Request, tenant: CurrentTenant) -> TaskPublic:
        """Cancel a task; a task that already ended is returned unchanged."""
        with session_scope(request.app.state.engine) as session:
            task = crud.cancel_task(session=session, task_id=task_id, tenant_id=tenant.id)
            if task is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")
            return crud.task_public(task=task, steps=crud.list_steps(session=session, task_id=task_id))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics of this process: the tasks it ended (cancels, sweep), its relay's publishes, and under
        ``umi up`` the embedded workers' too."""
        return Response(exposition(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    return app
