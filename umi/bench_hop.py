"""The bare Celery hop that ``umi bench`` compares the product against.

A minimal Celery app with the product's delivery settings (late acks, publisher
confirms, prefetch 1, a durable quorum queue, the threads pool, JSON) and one task
that does nothing but publish its successor: ``hop`` stamps the time it starts and
publishes the next ``hop`` of its chain, so the gap between two stamps is one
publish-with-confirm → broker → worker pick-up round trip, the floor under every
product step. The last hop of a chain sends its stamps to a plain reply queue.

The worker runs as its own process (``python -m celery -A umi.bench_hop worker``),
like the product's role workers; its broker comes from ``UMI_BENCH_HOP_BROKER_URL``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

__all__ = ["HOP_QUEUE", "DONE_QUEUE", "create_hop_app", "hop_queue", "done_queue"]

HOP_QUEUE = "umi-bench-hop"
#: Where the last hop of each chain reports its stamps (a classic, non-durable queue: results only).
DONE_QUEUE = "umi-bench-hop-done"
BROKER_URL_VARIABLE = "UMI_BENCH_HOP_BROKER_URL"


def hop_queue() -> Queue:
    return Queue(HOP_QUEUE, Exchange(HOP_QUEUE, type="direct"), routing_key=HOP_QUEUE, queue_arguments={"x-queue-type": "quorum"})


def done_queue() -> Queue:
    return Queue(DONE_QUEUE, Exchange("", type="direct"), routing_key=DONE_QUEUE, durable=False)


@functools.cache
def create_hop_app(broker_url: str) -> Celery:
    """The bare app (one per broker URL and process: Celery warns when a task name is registered twice): the product's delivery settings (``shared/celery_app.py``), nothing else."""
    app = Celery("umi-bench-hop", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"confirm_publish": True, "polling_interval": 0.01},
        broker_connection_retry_on_startup=True,
        task_queues=[hop_queue()],
        task_default_queue=HOP_QUEUE,
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.hop", bind=True)
    def hop(self: Any, chain: int, remaining: int, stamps: list[float]) -> None:
        stamps.append(time.time())
        if remaining > 0:
            self.apply_async((chain, remaining - 1, stamps))
            return
        with self.app.producer_or_acquire() as producer:
            producer.publish({"chain": chain, "stamps": stamps}, exchange="", routing_key=DONE_QUEUE, declare=[done_queue()], serializer="json")

    return app


def __getattr__(name: str) -> Celery:
    """``app``, the worker process's app (``-A umi.bench_hop``), built on first use from
    ``UMI_BENCH_HOP_BROKER_URL`` so that importing this module in the benchmark builds nothing."""
    if name == "app":
        return create_hop_app(os.environ[BROKER_URL_VARIABLE])
    raise AttributeError(name)
