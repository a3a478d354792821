"""The HTTP front door (FastAPI): accept tasks, list them, show their trajectories, cancel them.

Every ``/v1/`` route is a tenant's (``services/gateway/auth.py``): another tenant's task is a
``404``. Routes, limits, idempotency and errors are described in ``docs/api.md``.

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
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from services.gateway.auth import CurrentTenant, too_many_requests
from services.gateway.errors import install_error_handling
from services.gateway.events import router as events_router
from services.gateway.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_cursor, encode_cursor
from services.gateway.readiness import unready_dependencies
from services.gateway.responses import AUTHENTICATED, BODY, CONFLICT, NOT_FOUND, UNAVAILABLE
from services.gateway.sweep import DeadlineSweeper
from shared import admission, crud
from shared.context_window import PromptDoesNotFit
from shared.db import ensure_schema_current, get_engine, session_scope
from shared.dispatch import Dispatcher, request_path_dispatcher
from shared.lifecycle import TaskStatus
from shared.metrics import CONTENT_TYPE, exposition
from shared.relay import Relay
from shared.schemas import TaskAccepted, TaskCreate, TaskOrigin, TaskPage, TaskPublic, TaskSummary
from shared.settings import Settings, get_settings
from shared.tasks import IdempotencyKeyReused, accept_task
from shared.topology import Topology

__all__ = ["IDEMPOTENCY_KEY_PATTERN", "create_app"]

#: ``Idempotency-Key``: 1-255 visible ASCII characters (no spaces or control characters).
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"

logger = logging.getLogger(__name__)


#: The ``202`` of ``POST /v1/tasks`` says when it answers with a task stored by an earlier request.
REPLAYED: dict[int | str, dict[str, Any]] = {
    202: {
        "headers": {
            "Idempotent-Replayed": {
                "description": "`true` when the task was stored by an earlier request with the same `Idempotency-Key`.",
                "schema": {"type": "string", "enum": ["true"]},
            }
        }
    }
}


def invalid(loc: tuple[str, ...], message: str, value: object) -> RequestValidationError:
    """A ``422`` naming ``loc`` for a check FastAPI cannot make itself, answered like (and by) its own 422s."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])


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

    # FastAPI's limiter counts the body as it streams in (Content-Length or chunked) and stops at the limit.
    app = FastAPI(title="α-UMi on queues", version="0.1.0", lifespan=lifespan, max_body_size=settings.max_body_bytes)
    app.state.settings = settings
    install_error_handling(app)
    app.include_router(events_router)

    @app.post(
        "/v1/tasks",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=TaskAccepted,
        responses={**REPLAYED, **AUTHENTICATED, **BODY, **CONFLICT},
    )
    def create_task(
        task_in: TaskCreate,
        request: Request,
        response: Response,
        tenant: CurrentTenant,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description="1-255 visible ASCII characters; the same key (and body) from the same tenant "
                "returns the same task, never a second one.",
            ),
        ] = None,
    ) -> TaskAccepted:
        """Accept a task; the planner takes its first step asynchronously."""
        origin = TaskOrigin(tenant_id=tenant.id, idempotency_key=idempotency_key)
        try:
            submission = accept_task(
                engine=request.app.state.engine,
                dispatcher=request.app.state.dispatcher,
                settings=settings,
                task_in=task_in,
                origin=origin,
                limit_in_flight=tenant,
            )
        except PromptDoesNotFit as exc:
            raise invalid(("body", "max_new_tokens"), str(exc), task_in.max_new_tokens) from exc
        except IdempotencyKeyReused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        except admission.OverLimit as exc:
            raise too_many_requests(exc.refusal) from exc
        if not submission.created:
            response.headers["Idempotent-Replayed"] = "true"
        return TaskAccepted(id=submission.task.id, status=submission.task.status)

    @app.get("/v1/tasks", response_model=TaskPage, responses={**AUTHENTICATED})
    def list_tasks(
        request: Request,
        tenant: CurrentTenant,
        task_status: Annotated[TaskStatus | None, Query(alias="status", description="Only tasks in this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Tasks per page.")] = DEFAULT_PAGE_SIZE,
        cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    ) -> TaskPage:
        """The tenant's tasks, newest first, a page at a time (keyset pagination: no task twice, none skipped)."""
        try:
            before = None if cursor is None else decode_cursor(cursor)
        except ValueError as exc:
            raise invalid(("query", "cursor"), str(exc), cursor) from exc
        with session_scope(request.app.state.engine) as session:
            tasks = crud.list_tasks(session=session, tenant_id=tenant.id, status=task_status, limit=limit, before=before)
        next_cursor = encode_cursor(tasks[-1].created_at, tasks[-1].id) if len(tasks) == limit else None
        return TaskPage(items=[TaskSummary.model_validate(task) for task in tasks], next_cursor=next_cursor)

    @app.get("/v1/tasks/{task_id}", response_model=TaskPublic, responses={**AUTHENTICATED, **NOT_FOUND})
    def read_task(task_id: uuid.UUID, request: Request, tenant: CurrentTenant) -> TaskPublic:
        """A task's status, answer and steps so far."""
        with session_scope(request.app.state.engine) as session:
            task = crud.get_task(session=session, task_id=task_id, tenant_id=tenant.id)
            if task is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")
            return crud.task_public(task=task, steps=crud.list_steps(session=session, task_id=task_id))

    @app.post("/v1/tasks/{task_id}/cancel", response_model=TaskPublic, responses={**AUTHENTICATED, **NOT_FOUND})
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

    @app.get("/readyz", responses={**UNAVAILABLE})
    async def readyz(request: Request) -> dict[str, str]:
        """Readiness: PostgreSQL and the broker answer (``503`` naming what does not, within a few seconds)."""
        unready = await unready_dependencies(engine=request.app.state.engine, broker_url=settings.broker_url)
        if unready:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not ready: " + "; ".join(unready))
        return {"status": "ready"}

    return app
