"""The queue topology, declared in one place: exchanges, role queues, dead letters, task names.

::

    exchange  umi      (topic)  ──umi.planner──▶    queue umi.planner     ◀─ planner workers
                                ──umi.caller──▶     queue umi.caller      ◀─ caller workers
                                ──umi.tools──▶      queue umi.tools       ◀─ tool executors
                                ──umi.summarizer──▶ queue umi.summarizer  ◀─ summarizer workers
    exchange  umi.dlx  (topic)  ──#──▶              queue umi.dead_letter

    default exchange ──umi.ingress──▶ queue umi.ingress ◀─ ingress workers (JSON tasks from any AMQP client)
    exchange  umi.events (topic)  task.<id>.step, task.<id>.end  ──▶ whoever binds (the relay publishes)

Role queues are durable quorum queues (classic durable ones when
``UMI_QUORUM_QUEUES=false``). Each dead-letters into ``umi.dead_letter``, both
when the broker gives up on a message (``x-delivery-limit``: a message that
keeps killing its worker) and when a worker refuses a malformed message (it
republishes it there with the reason in the ``x-umi-dead-letter-reason`` header).
The broker dead-letters at least once (``x-dead-letter-strategy``, which needs
``x-overflow: reject-publish``): a letter leaves a role queue only once the
dead-letter queue has confirmed it.

The dead-letter queue is a durable *classic* queue: a quorum queue always has a
delivery limit on RabbitMQ 4 (20 by default), and ``x-delivery-limit: -1`` means
"unlimited" only from 4.0 on (3.x drops every letter returned once), so a classic
queue is the one that never drops a letter someone read and put back, on every version.
The prefix ``umi`` is ``UMI_QUEUE_PREFIX``.

``umi.ingress`` is where non-Python backends publish tasks as plain JSON (the envelope:
``docs/ingress-envelope.schema.json``); producers publish to it through the default
exchange, so they need no exchange name. It dead-letters like a role queue. ``umi.events``
carries every stored step and every task end; consumers bind their own queues to it
(``task.<id>.*`` for one task, ``task.#`` for all).

Queue arguments cannot change on an existing queue: RabbitMQ refuses a declaration
whose arguments differ (``PRECONDITION_FAILED``), so a change here reaches only
fresh virtual hosts (docs/operations.md, "Upgrading the topology").
"""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

from shared.roles import StepRole
from shared.settings import Settings

__all__ = [
    "QUEUE_ROLES",
    "Topology",
    "task_name",
]

#: The roles that have a queue (the user step is written by the gateway).
QUEUE_ROLES: tuple[StepRole, ...] = (StepRole.PLANNER, StepRole.CALLER, StepRole.TOOLS, StepRole.SUMMARIZER)


def task_name(role: StepRole) -> str:
    """The Celery task name that produces a step of ``role`` (``umi.planner.step``, …)."""
    return f"umi.{role.value}.step"


class Topology:
    """Exchanges and queues for one deployment (one queue prefix)."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.queue_prefix
        self.quorum = settings.quorum_queues
        self.delivery_limit = settings.delivery_limit
        self.exchange = Exchange(self.prefix, type="topic", durable=True)
        self.dead_letter_exchange = Exchange(f"{self.prefix}.dlx", type="topic", durable=True)
        self.events_exchange = Exchange(f"{self.prefix}.events", type="topic", durable=True)

    def queue_name(self, role: StepRole) -> str:
        """``umi.<role>``: the queue that ``role``'s workers consume."""
        if role not in QUEUE_ROLES:
            raise ValueError(f"role {role!r} has no queue")
        return f"{self.prefix}.{role.value}"

    @property
    def dead_letter_queue_name(self) -> str:
        return f"{self.prefix}.dead_letter"

    @property
    def ingress_queue_name(self) -> str:
        """``umi.ingress``: JSON task envelopes from any AMQP client."""
        return f"{self.prefix}.ingress"

    def _queue_type(self) -> dict[str, object]:
        return {"x-queue-type": "quorum"} if self.quorum else {}

    def role_queue(self, role: StepRole) -> Queue:
        """The durable queue of ``role``, dead-lettering into :meth:`dead_letter_queue`."""
        name = self.queue_name(role)
        return Queue(name, self.exchange, routing_key=name, durable=True, queue_arguments=self._dead_lettering(name))

    def ingress_queue(self) -> Queue:
        """``umi.ingress`` (bound to the default exchange only), dead-lettering as a role queue does."""
        name = self.ingress_queue_name
        return Queue(name, routing_key=name, durable=True, queue_arguments=self._dead_lettering(name))

    def _dead_lettering(self, name: str) -> dict[str, object]:
        arguments: dict[str, object] = {
            **self._queue_type(),
            "x-dead-letter-exchange": self.dead_letter_exchange.name,
            "x-dead-letter-routing-key": name,
        }
        if self.quorum:
            arguments["x-delivery-limit"] = self.delivery_limit
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"  # at-least-once needs it (drop-head would drop)
        return arguments

    def dead_letter_queue(self) -> Queue:
        """Where refused and poison messages end up, with their reason: durable, classic, no delivery limit."""
        return Queue(self.dead_letter_queue_name, self.dead_letter_exchange, routing_key="#", durable=True)

    def all_queues(self) -> list[Queue]:
        """The queues Celery knows (role queues, then the dead-letter queue); see :meth:`declare` for all."""
        return [self.role_queue(role) for role in QUEUE_ROLES] + [self.dead_letter_queue()]

    def declare(self, connection: Connection) -> None:
        """Declare all exchanges, queues and bindings (idempotent); producers and workers call it at start."""
        channel = connection.default_channel
        for queue in [*self.all_queues(), self.ingress_queue()]:
            queue(channel).declare()
        self.events_exchange(channel).declare()
