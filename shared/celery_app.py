"""Celery apps: one shared configuration, one app per worker role (the Onyx layout).

Reliability settings live here next to the topology they apply to
(``docs/architecture.md``, "At-least-once delivery"):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acked only
  after its step is stored; a worker killed mid-step leaves it to be redelivered.
  The quorum queue's ``x-delivery-limit`` bounds redelivery loops.
* ``worker_prefetch_multiplier = 1``: each worker thread reserves one message.
* ``confirm_publish``: a publish returns only once the broker has the message.
* ``task_create_missing_queues = False``: only the topology in
  :mod:`shared.topology` exists.
* Malformed messages (any shape :mod:`shared.envelope` refuses, undecodable,
  unknown task, bad job) go to the dead-letter queue whole, with a reason, instead
  of being acked away or crashing the worker (:class:`DeadLetteringConsumer`).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu.message import Message

from shared.dead_letters import publish_dead_letter
from shared.envelope import refusal_reason
from shared.metrics import DeadLetterKind, observe_dead_letter
from shared.roles import StepRole
from shared.settings import Settings
from shared.topology import QUEUE_ROLES, Topology, task_name

__all__ = ["DeadLetteringConsumer", "create_celery_app", "dead_letter_message", "worker_node_name"]

logger = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration every producer and worker uses."""
    topology = Topology(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {"confirm_publish": True, "polling_interval": 0.01},
        "broker_connection_retry_on_startup": True,
        "task_queues": topology.all_queues(),
        "task_create_missing_queues": False,
        "task_default_queue": topology.queue_name(StepRole.PLANNER),
        "task_default_exchange": topology.exchange.name,
        "task_default_exchange_type": "topic",
        "task_routes": {
            task_name(role): {
                "queue": topology.queue_name(role),
                "exchange": topology.exchange.name,
                "routing_key": topology.queue_name(role),
            }
            for role in QUEUE_ROLES
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A lost broker connection means the broker will redeliver. Under the threads
        # pool this cannot stop the in-flight copy (no terminate_job: Celery logs
        # "Failed to cancel active request"); it finishes and stores its step, and the
        # redelivered copy meets that step or the tool call's live lease
        # (docs/architecture.md, "Connection loss under the threads pool").
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_consumer": "shared.celery_app:DeadLetteringConsumer",
        "worker_hijack_root_logger": False,
        # UMI_TASK_EVENTS switches on what Flower and `celery events` read.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3},
    }


def create_celery_app(settings: Settings, *, name: str = "umi") -> Celery:
    """A Celery app bound to the deployment's broker and topology (producers use it as is)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.umi_settings = settings
    return app


def worker_node_name(role: StepRole) -> str:
    """A unique node name per worker process (a restarted worker never collides with its dead self)."""
    return f"{role.value}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}.{os.getpid()}"


def dead_letter_message(app: Celery, message: Message, reason: str, *, kind: DeadLetterKind = DeadLetterKind.MALFORMED) -> None:
    """Republish ``message`` whole (body, content type and encoding, headers) to the dead-letter queue.

    Counted in ``umi_dead_letters_total`` under ``kind`` (the reason text is too varied for a label).
    Does not ack it: the caller does (the consumer at once, the step task through Celery's late ack).
    """
    settings: Settings = app.conf.umi_settings
    source = (message.delivery_info or {}).get("routing_key") or "unknown"
    # A pooled connection: a flood of malformed messages costs no handshake each.
    with app.pool.acquire(block=True) as connection:
        publish_dead_letter(
            connection,
            Topology(settings),
            body=message.body,
            reason=reason,
            source_queue=source,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=dict(message.headers or {}),
        )
    observe_dead_letter(str(app.conf.get("umi_role", "unknown")), kind)
    logger.error("dead-lettered a message from %s: %s", source, reason)


class DeadLetteringConsumer(Consumer):
    """Celery's consumer, except that messages it cannot run are dead-lettered with a reason.

    Stock Celery acks undecodable messages (they vanish), rejects unknown ones (the
    broker's DLX then records only "rejected"), and stops the worker on a message
    whose body or headers have an unexpected shape. Here every message first passes
    :func:`~shared.envelope.refusal_reason`, and anything Celery still cannot turn
    into a request is dead-lettered rather than allowed to stop the consumer.
    """

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], None]:
        celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Message) -> None:
            reason = refusal_reason(message)
            if reason is not None:
                self._dead_letter(message, reason)
                return
            try:
                celery_handler(message)
            except self.connection_errors:
                raise  # the consumer reconnects; the broker redelivers
            except Exception as exc:
                logger.exception("Celery could not take a message")
                self._dead_letter(message, f"Celery cannot run this message: {exc!r}")

        return on_task_received

    def _dead_letter(self, message: Message, reason: str) -> None:
        try:
            dead_letter_message(self.app, message, reason)
        except Exception:
            # Could not park it: leave it to the broker (reject → x-death).
            logger.exception("could not dead-letter a message; rejecting it")
            if not message.acknowledged:
                message.reject_log_error(logger, self.connection_errors)
            return
        if not message.acknowledged:
            message.ack()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"undecodable message ({message.content_type}): {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a Celery task message (no task header)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        self._dead_letter(message, f"unknown task {name!r}: no worker here runs it")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message: {exc}")
