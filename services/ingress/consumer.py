"""The consumer of ``umi.ingress``: plain JSON task envelopes from any AMQP client.

It is a kombu :class:`~kombu.mixins.ConsumerProducerMixin` process, not a Celery
worker: the messages are plain JSON published by non-Python backends, not Celery task
messages, so Celery's consumer would dead-letter every one of them as malformed
(``shared/envelope.py``), and a ``bootsteps.ConsumerStep`` would add Celery's whole
worker (pool, task registry, node name) around one consumer that runs no task. The
mixin gives what this needs: it reconnects after a broker restart
(``ensure_connection`` and its ``run`` loop), and publishes dead letters and replies on a
connection of its own.

Each message is decided by :func:`~services.ingress.handler.handle_ingress_message`; then

* accepted → acked (only now: the task is committed; at least once);
* refused → republished whole to ``umi.dead_letter`` (body, properties, headers, the
  ``x-api-key`` header masked) with the reason in ``x-umi-dead-letter-reason``, answered
  on ``reply_to`` (if given, and not one of umi's own queues) with the :class:`~shared.schemas.ErrorBody` and the message's
  ``correlation_id``, counted in ``umi_dead_letters_total{role="ingress"}``, then acked;
* the database or broker unreachable → retried in place for ``UMI_INFRA_RETRY_S``, then
  given back to the queue (its delivery limit bounds the loop);
* anything else → logged and given back: no message stops the consumer.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import stamina
from kombu import Connection, Consumer, Producer
from kombu.message import Message
from kombu.mixins import ConsumerProducerMixin

from services.ingress.handler import (
    API_KEY_HEADER,
    IngressOutcome,
    Refused,
    handle_ingress_message,
    ingress_properties,
)
from shared.db import ensure_schema_current
from shared.dead_letters import publish_dead_letter
from shared.dispatch import request_path_dispatcher
from shared.metrics import initialize_ingress_metrics, initialize_relay_metrics, observe_dead_letter, serve_metrics
from shared.pipeline import Runtime
from shared.relay import relay_thread
from shared.settings import Settings
from shared.topology import Topology
from shared.worker import INFRA_WAIT_INITIAL_S, INFRA_WAIT_JITTER_S, INFRA_WAIT_MAX_S, is_transient

__all__ = ["INGRESS_PREFETCH", "IngressConsumer", "MASKED", "run_ingress", "start_ingress_thread"]

logger = logging.getLogger(__name__)

#: Messages the broker hands the consumer ahead of its acks. It decides one at a time; a few
#: in hand hide the round trip to the broker, and the rest stay for other ingress replicas.
INGRESS_PREFETCH = 4
#: AMQP heartbeat (seconds), so a silently dropped connection is noticed. The broker closes a
#: connection silent for two of them (120 s): longer than the default in-place retry budget
#: (``UMI_INFRA_RETRY_S``, 60 s), during which the consumer sends nothing.
HEARTBEAT_S = 60
#: Reconnecting after a broker outage: attempts at most this far apart.
RECONNECT_MAX_INTERVAL_S = 5.0
#: What the dead-lettered copy carries instead of the API key.
MASKED = "[masked]"
#: The AMQP properties a dead letter keeps from the refused message. Not ``user_id`` (RabbitMQ refuses a
#: publish whose user_id is not the publishing connection's user) nor ``expiration`` (the letter would expire).
KEPT_PROPERTIES = ("message_id", "correlation_id", "reply_to", "timestamp", "type", "app_id", "priority")


def broker_connection(settings: Settings) -> Connection:
    """A connection to the deployment's broker whose publishes wait for the broker's confirm."""
    return Connection(settings.broker_url, heartbeat=HEARTBEAT_S, transport_options={"confirm_publish": True})


class ConsumerStopped(Exception):
    """Raised out of a reconnect loop once the consumer was asked to stop."""


class IngressConsumer(ConsumerProducerMixin):
    """Consumes ``umi.ingress`` until :attr:`should_stop` is set; see the module docstring."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.topology = Topology(settings)
        self.connection = broker_connection(settings)
        #: Set once the consumer is subscribed (tests and the embedded system wait on it).
        self.ready = threading.Event()

    def get_consumers(self, consumer_class: type[Consumer], channel: Any) -> list[Consumer]:
        # on_message: the raw message, undecoded (kombu would otherwise decode by content type).
        return [
            consumer_class(queues=[self.topology.ingress_queue()], on_message=self.on_message, prefetch_count=INGRESS_PREFETCH)
        ]

    @contextlib.contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        """The mixin's, with a stop request honoured while the broker is away (it checks each second)."""
        with self.create_connection() as connection:
            connection.ensure_connection(
                self.on_connection_error, self.connect_max_retries,
                interval_max=RECONNECT_MAX_INTERVAL_S, callback=self._raise_if_stopping,
            )
            yield connection

    def _raise_if_stopping(self) -> None:
        if self.should_stop:
            raise ConsumerStopped()

    def consume_until_stopped(self) -> None:
        """Consume (reconnecting as needed) until :attr:`should_stop` is set."""
        try:
            self.run()
        except ConsumerStopped:
            pass

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: list[Consumer], **kwargs: Any) -> None:
        self.topology.declare(connection)  # after a broker restart, too
        self.ready.set()

    def on_message(self, message: Message) -> None:
        """Decide ``message`` and ack, dead-letter or give it back; raises only on a lost broker connection."""
        try:
            outcome = self._decide(message)
            if isinstance(outcome, Refused):
                self._refuse(message, outcome)
            else:
                again = f"accepted again (duplicate message_id {message.properties.get('message_id')!r})"
                logger.info("ingress: task %s %s", outcome.task_id, again if outcome.duplicate else "accepted")
            message.ack()
        except self.connection.connection_errors:
            raise  # the mixin reconnects; the broker redelivers what was not acked
        except Exception:
            logger.exception("ingress: could not handle a message; giving it back to the queue")
            if not message.acknowledged:
                message.requeue()

    def _decide(self, message: Message) -> IngressOutcome:
        properties = ingress_properties(message.properties, message.headers)
        budget = self.settings.infra_retry_s
        for attempt in stamina.retry_context(
            on=is_transient, attempts=None, timeout=budget,
            wait_initial=INFRA_WAIT_INITIAL_S, wait_max=INFRA_WAIT_MAX_S, wait_jitter=INFRA_WAIT_JITTER_S,
        ):
            with attempt:
                if attempt.num > 1:
                    logger.warning("ingress: database or broker unreachable; attempt %d (retrying for %.0fs)", attempt.num, budget)
                return handle_ingress_message(_body(message), properties, self.runtime)
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    def _refuse(self, message: Message, outcome: Refused) -> None:
        """Dead-letter ``message`` whole (the API key masked), then answer the error on ``reply_to``."""
        headers = dict(message.headers or {})
        if API_KEY_HEADER in headers:
            headers[API_KEY_HEADER] = MASKED  # never stored, not even in the dead-letter queue
        kept = {name: message.properties[name] for name in KEPT_PROPERTIES if message.properties.get(name) is not None}
        connection = self.producer_connection
        publish_dead_letter(
            connection,
            self.topology,
            body=_body(message),
            reason=outcome.reason,
            source_queue=self.topology.ingress_queue_name,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=headers,
            properties=kept,
        )
        observe_dead_letter("ingress", outcome.kind)
        logger.warning("ingress: dead-lettered a message: %s", outcome.reason)
        if outcome.reply_to is not None:
            Producer(connection).publish(
                outcome.error.model_dump_json(exclude_none=True).encode(),
                exchange="",
                routing_key=outcome.reply_to,
                content_type="application/json",
                content_encoding="utf-8",
                correlation_id=outcome.correlation_id,
                headers={"x-umi-outcome": "refused"},
                delivery_mode=2,
                retry=True,
            )


def _body(message: Message) -> bytes:
    """The body as sent (kombu's in-process transport may hand it over as text)."""
    body = message.body or b""
    return body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)


def build_runtime(settings: Settings) -> Runtime:
    """The ingress's runtime: the database, and a dispatcher publishing first jobs with confirms,
    each attempt bounded by ``UMI_PUBLISH_TIMEOUT_S`` (a job it cannot publish is left to the relay)."""
    return Runtime(settings=settings, dispatcher=request_path_dispatcher(settings, name="umi.ingress"))


def prepare_ingress(settings: Settings) -> IngressConsumer:
    """Check the schema (``SchemaOutOfDate``), declare the topology, serve metrics: a consumer ready to run."""
    ensure_schema_current(settings.database_url)
    with broker_connection(settings) as connection:
        Topology(settings).declare(connection)
    initialize_ingress_metrics()
    serve_metrics(settings.metrics_port)
    return IngressConsumer(settings, build_runtime(settings))


def run_ingress(settings: Settings) -> int:
    """``umi worker ingress``: consume in the foreground until SIGTERM or SIGINT; exit code 0.

    The signal handlers need the main thread. The message in hand is finished first
    (the consumer looks at :attr:`~IngressConsumer.should_stop` between messages).
    """
    consumer = prepare_ingress(settings)

    def stop(signum: int, _frame: Any) -> None:
        logger.info("ingress: %s received, stopping after the message in hand", signal.Signals(signum).name)
        consumer.should_stop = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    logger.info("ingress: consuming %s", consumer.topology.ingress_queue_name)
    try:
        # The relay publishes what this process's tasks need later: first jobs the broker did not
        # take (the outbox), step and end events, and the final state to reply_to. Every gateway
        # replica runs one too; they share the work (shared/relay.py).
        initialize_relay_metrics()
        with relay_thread(consumer.runtime.engine, settings, name="umi.ingress.relay"):
            consumer.consume_until_stopped()
    finally:
        consumer.runtime.close()
    return 0


def start_ingress_thread(settings: Settings) -> Callable[[], None]:
    """Run the ingress inside this process (``umi up``); returns a function that stops it."""
    consumer = prepare_ingress(settings)
    thread = threading.Thread(target=consumer.consume_until_stopped, name="ingress", daemon=True)
    thread.start()
    consumer.ready.wait(30)

    def stop() -> None:
        consumer.should_stop = True
        thread.join(10)
        consumer.runtime.close()

    return stop
