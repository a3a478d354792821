"""Publishing step jobs: the :class:`Dispatcher` contract and its Celery implementation.

The gateway, the workers and the evaluation runner hand jobs to the broker only
through a dispatcher, so tests can collect jobs instead of publishing them.
"""

from __future__ import annotations

import time
from typing import Protocol

from celery import Celery

from shared.metrics import PUBLISHED_AT_HEADER
from shared.schemas import StepJob
from shared.topology import task_name

__all__ = ["CeleryDispatcher", "Dispatcher"]


class Dispatcher(Protocol):
    """Publishes a job to its role's queue (confirmed by the broker before returning)."""

    def dispatch(self, job: StepJob) -> None: ...


class CeleryDispatcher:
    """Publishes step jobs through a Celery app (publisher confirms, routes from the topology)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def dispatch(self, job: StepJob) -> None:
        """Send ``job`` to its role's queue; returns once the broker confirmed it."""
        self.app.send_task(
            task_name(job.role),
            args=[job.model_dump(mode="json")],
            task_id=f"{job.task_id}:{job.step_index}:{job.role.value}",
            # The worker's umi_queue_wait_seconds starts here; a header keeps the job itself unchanged.
            headers={PUBLISHED_AT_HEADER: time.time()},
        )
