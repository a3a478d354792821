"""Celery glue shared by the four role workers: the step task, its runtime, and how to run it.

Each ``services/<role>/worker.py`` calls :func:`create_worker_app` with its
handler; the app consumes only that role's queue. The task body validates the
message, runs the handler and turns failures into broker actions:

* a malformed job or an impossible step → dead-letter queue, with the reason;
* a passing infrastructure failure (database or broker unreachable) →
  ``Reject(requeue=True)`` after a short pause; the quorum queue's delivery
  limit dead-letters a message that never gets through.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from shared.celery_app import create_celery_app, worker_node_name
from shared.dead_letters import publish_dead_letter
from shared.dispatch import CeleryDispatcher
from shared.pipeline import JobOutcome, PoisonJob, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob
from shared.settings import Settings
from shared.topology import Topology, task_name

__all__ = ["StepHandler", "create_worker_app", "run_worker", "start_worker_thread"]

logger = logging.getLogger(__name__)

StepHandler = Callable[..., JobOutcome]
#: Pause before requeueing after an infrastructure failure (the broker redelivers at once).
INFRA_RETRY_PAUSE_S = 1.0


class _RuntimeHolder:
    """One runtime per worker process, built on first use (threads share it)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()

    def get(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                self._runtime = Runtime(settings=self._settings, dispatcher=CeleryDispatcher(self._app))
            return self._runtime


def create_worker_app(role: StepRole, handler: StepHandler, settings: Settings) -> Celery:
    """The Celery app of one role's worker, with its step task registered."""
    app = create_celery_app(settings, name=f"umi.{role.value}")
    runtime = _RuntimeHolder(app, settings)
    topology = Topology(settings)
    source_queue = topology.queue_name(role)

    def dead_letter(payload: Any, reason: str) -> None:
        with app.connection_for_write() as connection:
            publish_dead_letter(
                connection,
                topology,
                body=json.dumps(payload, default=str),
                reason=reason,
                source_queue=source_queue,
                content_type="application/json",
            )
        logger.error("dead-lettered a %s message: %s", role.value, reason)

    @app.task(name=task_name(role), bind=True, acks_late=True, reject_on_worker_lost=True)
    def step(self: Any, payload: Any = None, *args: Any, **kwargs: Any) -> str:
        try:
            job = StepJob.model_validate(payload)
        except ValidationError as exc:
            dead_letter(payload, f"invalid {role.value} job: {_first_errors(exc)}")
            return "dead_lettered"
        if args or kwargs or job.role is not role:
            dead_letter(payload, f"a {role.value} worker cannot run a {job.role.value} job with extra arguments")
            return "dead_lettered"
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        try:
            outcome = handler(job, runtime.get(), redelivered=redelivered)
        except PoisonJob as exc:
            dead_letter(payload, str(exc))
            return "dead_lettered"
        except (DBAPIError, KombuOperationalError, ConnectionError) as exc:
            logger.warning("task %s step %d: infrastructure failure, requeueing: %s", job.task_id, job.step_index, exc)
            time.sleep(INFRA_RETRY_PAUSE_S)
            raise Reject(str(exc), requeue=True) from exc
        logger.info("task %s step %d (%s): %s", job.task_id, job.step_index, role.value, outcome)
        return outcome.value

    return app


def _first_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def run_worker(app: Celery, role: StepRole, settings: Settings, *, concurrency: int, loglevel: str = "INFO") -> None:
    """Run the worker in the foreground (``umi worker <role>``) until SIGTERM/SIGINT."""
    queue = Topology(settings).queue_name(role)
    app.worker_main(
        [
            "worker",
            "--queues", queue,
            "--hostname", worker_node_name(role),
            "--pool", "threads",
            "--concurrency", str(concurrency),
            "--loglevel", loglevel,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def start_worker_thread(app: Celery, role: StepRole, settings: Settings, *, concurrency: int) -> Callable[[], None]:
    """Run the worker inside this process (embedded mode); returns a function that stops it."""
    queue = Topology(settings).queue_name(role)
    controller = app.WorkController(
        hostname=worker_node_name(role),
        queues=[queue],
        pool_cls="threads",
        concurrency=concurrency,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel=logging.WARNING,
    )
    thread = threading.Thread(target=controller.start, name=f"worker:{role.value}", daemon=True)
    thread.start()

    def stop() -> None:
        controller.stop(in_sighandler=False)
        thread.join(10)

    return stop
