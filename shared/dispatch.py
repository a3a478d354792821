"""Publishing step jobs: the :class:`Dispatcher` contract and its Celery implementation.

The gateway, the workers, the relay and the evaluation runner hand jobs to the broker
only through a dispatcher, so tests can collect jobs instead of publishing them.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from celery import Celery

from shared.celery_app import create_celery_app
from shared.metrics import PUBLISHED_AT_HEADER
from shared.schemas import StepJob
from shared.settings import Settings
from shared.topology import task_name

__all__ = ["CeleryDispatcher", "Dispatcher", "request_path_dispatcher"]


class Dispatcher(Protocol):
    """Publishes a job to its role's queue (confirmed by the broker before returning)."""

    def dispatch(self, job: StepJob) -> None: ...


class CeleryDispatcher:
    """Publishes step jobs through a Celery app (publisher confirms, routes from the topology).

    Without ``timeout_s`` a publish follows the app's retry policy (workers: a follow-up
    job is worth waiting for). With it, a publish is one bounded attempt — connect,
    publish, confirm, each within ``timeout_s`` — and raises on failure: the request
    path answers at once and leaves the job to the outbox (``shared/relay.py``).
    """

    def __init__(self, app: Celery, *, timeout_s: float | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s

    def dispatch(self, job: StepJob) -> None:
        """Send ``job`` to its role's queue; returns once the broker confirmed it."""
        if self.timeout_s is None:
            self._send(job, producer=None)
            return
        with self.app.producer_pool.acquire(block=True, timeout=self.timeout_s) as producer:
            # One connection attempt, not kombu's retry loop (it would hold the request for seconds).
            producer.connection.ensure_connection(max_retries=0, timeout=self.timeout_s)
            self._send(job, producer=producer, retry=False, timeout=self.timeout_s, confirm_timeout=self.timeout_s)

    def _send(self, job: StepJob, *, producer: Any, **publish: Any) -> None:
        self.app.send_task(
            task_name(job.role),
            args=[job.model_dump(mode="json")],
            task_id=f"{job.task_id}:{job.step_index}:{job.role.value}",
            # The worker's umi_queue_wait_seconds starts here; a header keeps the job itself unchanged.
            headers={PUBLISHED_AT_HEADER: time.time()},
            producer=producer,
            **publish,
        )


def request_path_dispatcher(settings: Settings, *, name: str) -> CeleryDispatcher:
    """A dispatcher for a request path (the gateway, the ingress worker): every publish is one
    attempt bounded by ``UMI_PUBLISH_TIMEOUT_S``, connecting included, on its own Celery app."""
    app = create_celery_app(settings, name=name)
    # A broker that accepts TCP but never answers would otherwise hold each attempt for Celery's 4 s.
    app.conf.broker_connection_timeout = settings.publish_timeout_s
    return CeleryDispatcher(app, timeout_s=settings.publish_timeout_s)
