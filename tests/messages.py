"""Publishing raw messages to role queues the way a non-Python producer would (plain AMQP, pika)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pika
from pika.adapters.blocking_connection import BlockingChannel

from shared.dead_letters import pika_parameters
from shared.roles import StepRole
from shared.topology import Topology

__all__ = ["celery_body", "celery_headers", "confirmed_channel", "publish"]


def celery_headers(task: str, /, **changes: object) -> dict[str, object]:
    """Celery protocol-2 headers as Celery writes them; ``changes`` replace or add headers."""
    task_id = str(uuid.uuid4())
    headers: dict[str, object] = {
        "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
        "retries": 0, "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", "origin": "test",
    }
    headers.update(changes)
    return headers


def celery_body(*args: object) -> bytes:
    """A Celery protocol-2 JSON body: ``[args, {}, embed]``."""
    return json.dumps([list(args), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


@contextmanager
def confirmed_channel(broker_url: str) -> Iterator[BlockingChannel]:
    """A pika channel with publisher confirms, closed afterwards."""
    connection = pika.BlockingConnection(pika_parameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


def publish(
    channel: BlockingChannel,
    topology: Topology,
    role: StepRole,
    body: bytes,
    headers: dict[str, object] | None,
    *,
    content_type: str | None = "application/json",
) -> None:
    """Publish ``body`` to ``role``'s queue, persistent and confirmed."""
    channel.basic_publish(
        exchange=topology.exchange.name,
        routing_key=topology.queue_name(role),
        body=body,
        properties=pika.BasicProperties(
            content_type=content_type, content_encoding="utf-8", headers=headers, delivery_mode=2
        ),
        mandatory=True,
    )
