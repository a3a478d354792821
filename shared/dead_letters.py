"""Dead letters: refused messages are republished to ``umi.dead_letter`` with their reason.

The broker's own dead-lettering (delivery limit reached, ``basic.reject``) records
only ``x-death`` with reasons like ``delivery_limit``; a worker that refuses a
malformed message republishes it itself so the reason says what is wrong.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
from kombu import Connection
from pydantic import BaseModel

from shared.redaction import bound_text
from shared.topology import Topology

__all__ = ["DeadLetter", "REASON_HEADER", "drain_dead_letters", "pika_parameters", "publish_dead_letter"]

REASON_HEADER = "x-umi-dead-letter-reason"
SOURCE_QUEUE_HEADER = "x-umi-source-queue"


class DeadLetter(BaseModel):
    """A message found on the dead-letter queue."""

    reason: str
    source_queue: str | None
    #: The body as text (bytes that are not UTF-8 shown as U+FFFD).
    body: str
    content_type: str | None = None
    headers: dict[str, Any]


def publish_dead_letter(
    connection: Connection,
    topology: Topology,
    *,
    body: bytes | str,
    reason: str,
    source_queue: str,
    content_type: str | None = None,
    content_encoding: str | None = None,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
) -> None:
    """Publish ``body`` to the dead-letter queue with ``reason`` (persistent, confirmed).

    The body, content type and encoding, the ``headers`` and further AMQP ``properties``
    (``message_id``, ``correlation_id``, ``reply_to``, …) are kept as given, so the letter
    is the message that was refused, plus the reason headers.
    """
    merged = dict(headers or {})
    merged.update(
        {
            REASON_HEADER: bound_text(reason, 2000),
            SOURCE_QUEUE_HEADER: source_queue,
            "x-umi-dead-lettered-at": datetime.now(UTC).isoformat(),
        }
    )
    producer = connection.Producer()
    producer.publish(
        body,
        exchange=topology.dead_letter_exchange,
        routing_key=source_queue,
        declare=[topology.dead_letter_queue()],
        headers=merged,
        content_type=content_type or "application/octet-stream",
        content_encoding=content_encoding or ("binary" if isinstance(body, bytes) else "utf-8"),
        delivery_mode=2,
        retry=True,
        **(properties or {}),
    )


def _reason(headers: dict[str, Any]) -> str:
    if REASON_HEADER in headers:
        return str(headers[REASON_HEADER])
    deaths = headers.get("x-death") or []
    if deaths:
        return f"broker: {deaths[0].get('reason', 'unknown')}"
    return "unknown"


def pika_parameters(broker_url: str) -> pika.URLParameters:
    """pika's connection parameters for a kombu broker URL; ``amqps://`` keeps TLS.

    kombu's ``pyamqp://`` is plain AMQP to pika. kombu reads the whole path as the
    vhost (``…:5672//`` is ``/``) while pika reads one segment, so it is re-quoted.
    """
    parts = urlsplit(broker_url)
    scheme = "amqp" if parts.scheme == "pyamqp" else parts.scheme
    vhost = unquote(parts.path[1:]) or "/"
    return pika.URLParameters(urlunsplit((scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, "")))


def drain_dead_letters(broker_url: str, topology: Topology, *, limit: int = 100, requeue: bool = True) -> list[DeadLetter]:
    """Read up to ``limit`` dead letters; with ``requeue`` they stay on the queue.

    Uses pika because putting a message back must be a ``basic.nack``: RabbitMQ 4
    counts a ``basic.reject`` (all that py-amqp offers) against the quorum queue's
    delivery limit, so listing the queue twenty times would drop its letters.
    """
    connection = pika.BlockingConnection(pika_parameters(broker_url))
    try:
        channel = connection.channel()
        queue = topology.dead_letter_queue()
        channel.exchange_declare(topology.dead_letter_exchange.name, exchange_type="topic", durable=True)
        channel.queue_declare(queue.name, durable=True, arguments=queue.queue_arguments)
        channel.queue_bind(queue.name, topology.dead_letter_exchange.name, routing_key="#")
        letters: list[DeadLetter] = []
        tags: list[int] = []
        for _ in range(limit):
            method, properties, body = channel.basic_get(queue.name, auto_ack=False)
            if method is None:
                break
            tags.append(method.delivery_tag)
            headers = dict(properties.headers or {})
            source = headers.get(SOURCE_QUEUE_HEADER) or (headers.get("x-death") or [{}])[0].get("queue")
            text = body.decode("utf-8", "replace")
            letters.append(
                DeadLetter(
                    reason=_reason(headers),
                    source_queue=source,
                    body=text,
                    content_type=properties.content_type,
                    headers=_jsonable(headers),
                )
            )
        for tag in tags:
            if requeue:
                channel.basic_nack(tag, requeue=True)
            else:
                channel.basic_ack(tag)
        return letters
    finally:
        connection.close()


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))
