"""The relay: publishes what the database says is still to publish — first jobs, step events, task ends.

Every ``UMI_RELAY_INTERVAL_S`` one round runs three passes, each in its own short
transaction that locks its rows with ``FOR UPDATE SKIP LOCKED``, so any number of
relays (every gateway replica, every ingress worker) run side by side without doing
the same work:

1. **outbox** — active tasks whose first planner job the broker never confirmed
   (``enqueued_at`` NULL, created more than a grace period ago so the request path
   normally publishes it itself): the job is published through the
   :class:`~shared.dispatch.Dispatcher`, ``enqueued_at`` set;
2. **step** — stored steps with ``published_at`` NULL, in id order: a
   :class:`~shared.schemas.StepEvent` on ``umi.events``, routing key ``task.<id>.step``;
3. **end** — ended tasks with ``end_published_at`` NULL whose steps are all published:
   the final state (the ``GET /v1/tasks/{id}`` body) on ``umi.events`` as
   ``task.<id>.end`` and, for an AMQP task, to its ``reply_to`` with its ``correlation_id``.

Each publish is broker-confirmed before its row is marked; the marks of a pass are one
UPDATE. Delivery is **at least once**: a relay that dies between a confirm and its mark
leaves the row unmarked, and the next round publishes it again with the same
``message_id`` (``<task>:<index>``, ``<task>:end``), by which consumers deduplicate.
The workers' step path does nothing for the relay: it reads what they already store.

Usage::

    relay = Relay(engine, settings, dispatcher=dispatcher, connections=celery_app.pool)
    running = asyncio.create_task(relay.run())     # the gateway's lifespan
    with relay_thread(engine, settings): ...       # a process without an event loop (the ingress worker)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from kombu import Connection, Exchange, Producer
from pydantic import BaseModel
from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared import crud
from shared.db import session_scope
from shared.dispatch import Dispatcher, request_path_dispatcher
from shared.lifecycle import ACTIVE_STATUSES, TERMINAL_STATUSES, TaskStatus
from shared.metrics import RelayKind, initialize_relay_metrics, observe_relay_error, observe_relay_published, set_relay_backlog
from shared.models import Step, Task, utcnow
from shared.schemas import EVENT_SCHEMA_VERSION, StepEvent, TaskPublic
from shared.settings import Settings
from shared.tasks import first_jobs
from shared.topology import Topology

__all__ = [
    "EVENT_VERSION_HEADER",
    "TENANT_HEADER",
    "EventPublisher",
    "Relay",
    "RelayRound",
    "relay_once",
    "relay_outbox",
    "relay_step_events",
    "relay_task_ends",
    "relay_thread",
]

logger = logging.getLogger(__name__)

#: Headers of every event and reply: the event body's schema version, and whose task it is.
EVENT_VERSION_HEADER = "x-umi-event-version"
TENANT_HEADER = "x-umi-tenant-id"
#: Rows per pass: one confirm round trip each, so a pass stays well under a second.
BATCH_SIZE = 200
#: A failing relay logs its error at once, then at most this often until it recovers.
ERROR_LOG_INTERVAL_S = 30.0
#: The events on ``umi.events``: the routing key ``task.<id>.<kind>``, the message type ``umi.<kind>``.
EventKind = Literal["step", "end"]


def _end_message_id(task_id: uuid.UUID) -> str:
    """The ``message_id`` of a task's end event and of its reply (a step's is ``<task>:<index>``)."""
    return f"{task_id}:end"


class ConnectionPool(Protocol):
    """What the relay needs of a broker connection pool (kombu's, e.g. a Celery app's ``pool``)."""

    def acquire(self, block: bool = False, timeout: float | None = None) -> Connection: ...


class EventPublisher:
    """Publishes events and replies with kombu: a pooled connection, publisher confirms, bounded waits.

    Use :meth:`open` once per pass: it takes one connection and one channel for the pass.
    """

    def __init__(self, connections: ConnectionPool, topology: Topology, *, timeout_s: float) -> None:
        self.connections = connections
        self.exchange: Exchange = topology.events_exchange
        self.timeout_s = timeout_s

    @contextmanager
    def open(self) -> Iterator[EventPublisher.Channel]:
        """A channel for one pass (the events exchange declared on it)."""
        # One connection attempt per pass: the next round is the retry.
        with self.connections.acquire(block=True, timeout=self.timeout_s) as connection:
            connection.ensure_connection(max_retries=0, timeout=self.timeout_s)
            channel = connection.channel()
            try:
                # The default exchange is the producer's own (replies); events name theirs.
                yield EventPublisher.Channel(Producer(channel), self.exchange, self.timeout_s)
            finally:
                try:
                    channel.close()
                except Exception:  # the connection is gone already; the pool reconnects it
                    pass

    @dataclass
    class Channel:
        """Publishes on one channel; each method returns once the broker confirmed."""

        producer: Producer
        events: Exchange
        timeout_s: float

        def event(self, kind: EventKind, body: BaseModel, *, task_id: uuid.UUID, message_id: str, tenant_id: uuid.UUID) -> None:
            """``body`` on ``umi.events`` as ``task.<id>.<kind>``: a step (``message_id`` ``<task>:<index>``)
            or the task's final state (``<task>:end``)."""
            self._publish(
                body.model_dump_json(by_alias=True),
                routing_key=f"task.{task_id}.{kind}",
                message_id=message_id,
                event=kind,
                tenant_id=tenant_id,
                exchange=self.events,
                declare=[self.events],
            )

        def reply(self, task: TaskPublic, tenant_id: uuid.UUID, *, reply_to: str, correlation_id: str | None) -> None:
            """The final state to ``reply_to`` through the default exchange, with the task's correlation id."""
            self._publish(
                task.model_dump_json(by_alias=True),
                routing_key=reply_to,
                message_id=_end_message_id(task.id),
                event="end",
                tenant_id=tenant_id,
                correlation_id=correlation_id,
            )

        def _publish(self, body: str, *, routing_key: str, message_id: str, event: str, tenant_id: uuid.UUID, **extra: Any) -> None:
            self.producer.publish(
                body.encode("utf-8"),
                routing_key=routing_key,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,  # persistent
                message_id=message_id,
                type=f"umi.{event}",
                headers={EVENT_VERSION_HEADER: EVENT_SCHEMA_VERSION, TENANT_HEADER: str(tenant_id)},
                retry=False,
                timeout=self.timeout_s,
                confirm_timeout=self.timeout_s,
                **extra,
            )


@dataclass
class RelayRound:
    """What one round published, and the passes that failed (their errors were logged by the caller)."""

    outbox: int = 0
    steps: int = 0
    ends: int = 0
    replies: int = 0
    failed: dict[RelayKind, BaseException] = field(default_factory=dict)

    @property
    def published(self) -> int:
        return self.outbox + self.steps + self.ends + self.replies


def relay_once(
    engine: Engine,
    publisher: EventPublisher,
    dispatcher: Dispatcher,
    *,
    outbox_grace_s: float,
    batch_size: int = BATCH_SIZE,
) -> RelayRound:
    """One round: the outbox pass, the step pass, the end pass; then the backlog gauges.

    A pass that fails (broker or database away) rolls back what it did not mark and is
    recorded in ``failed`` (and counted); the other passes still run.
    """
    result = RelayRound()
    passes = (
        (RelayKind.OUTBOX, lambda: relay_outbox(engine, dispatcher, grace_s=outbox_grace_s, batch_size=batch_size, result=result)),
        (RelayKind.STEP, lambda: relay_step_events(engine, publisher, batch_size=batch_size, result=result)),
        (RelayKind.END, lambda: relay_task_ends(engine, publisher, batch_size=batch_size, result=result)),
    )
    for kind, run_pass in passes:
        try:
            run_pass()
        except Exception as exc:
            observe_relay_error(kind)
            result.failed[kind] = exc
    try:
        _measure_backlog(engine)
    except Exception:
        pass  # the database is away; a failed pass says so already
    return result


def relay_outbox(
    engine: Engine, dispatcher: Dispatcher, *, grace_s: float, batch_size: int = BATCH_SIZE, result: RelayRound | None = None
) -> RelayRound:
    """The outbox pass: publish the first job of each active task the broker never confirmed one for.

    Only tasks created over ``grace_s`` ago (their request path had its attempt) and not yet
    past their deadline (the deadline sweep ends those; a job would only be refused).
    """
    result = result or RelayRound()
    now = utcnow()
    with session_scope(engine) as session:
        tasks = list(
            session.exec(
                select(Task)
                .where(
                    col(Task.enqueued_at).is_(None),
                    col(Task.status).in_(ACTIVE_STATUSES),
                    Task.created_at < now - timedelta(seconds=grace_s),
                    Task.deadline_at > now,
                )
                .order_by(col(Task.created_at))
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        jobs = first_jobs(session, tasks)
        done: list[uuid.UUID] = []
        published = 0
        try:
            with _marking(session, Task, done, enqueued_at=now):
                for task in tasks:
                    # A task a worker already took was enqueued (its mark was lost): mark it, publish nothing.
                    if task.status == TaskStatus.QUEUED:
                        dispatcher.dispatch(jobs[task.id])
                        published += 1
                    done.append(task.id)
        finally:
            result.outbox += published
            observe_relay_published(RelayKind.OUTBOX, published)
    if published:
        logger.info("relay: published the first job of %d task(s) from the outbox", published)
    return result


def relay_step_events(
    engine: Engine, publisher: EventPublisher, *, batch_size: int = BATCH_SIZE, result: RelayRound | None = None
) -> RelayRound:
    """The step pass: one event per stored step not yet published, in id order."""
    result = result or RelayRound()
    with session_scope(engine) as session:
        rows = session.exec(
            select(Step, Task.tenant_id)
            .join(Task, col(Task.id) == col(Step.task_id))
            .where(col(Step.published_at).is_(None))
            .order_by(col(Step.id))
            .limit(batch_size)
            .with_for_update(of=Step, skip_locked=True)  # never the task rows: the workers lock those
        ).all()
        if not rows:
            return result
        done: list[int] = []
        try:
            with publisher.open() as channel, _marking(session, Step, done, published_at=utcnow()):
                for step, tenant_id in rows:
                    event = StepEvent.model_validate(step)
                    message_id = f"{event.task_id}:{event.index}"
                    channel.event("step", event, task_id=event.task_id, message_id=message_id, tenant_id=tenant_id)
                    done.append(step.id)
        finally:
            result.steps += len(done)
            observe_relay_published(RelayKind.STEP, len(done))
    return result


def relay_task_ends(
    engine: Engine, publisher: EventPublisher, *, batch_size: int = BATCH_SIZE, result: RelayRound | None = None
) -> RelayRound:
    """The end pass: each ended task whose steps are all published gets its end event (and reply)."""
    result = result or RelayRound()
    unpublished_step = select(Step.id).where(col(Step.task_id) == col(Task.id), col(Step.published_at).is_(None)).exists()
    with session_scope(engine) as session:
        tasks = list(
            session.exec(
                select(Task)
                .where(col(Task.status).in_(TERMINAL_STATUSES), col(Task.end_published_at).is_(None), ~unpublished_step)
                .order_by(col(Task.updated_at))
                .limit(batch_size)
                .with_for_update(of=Task, skip_locked=True)
            )
        )
        if not tasks:
            return result
        steps = _steps_of(session, [task.id for task in tasks])
        done: list[uuid.UUID] = []
        replies = 0
        try:
            with publisher.open() as channel, _marking(session, Task, done, end_published_at=utcnow()):
                for task in tasks:
                    final = crud.task_public(task=task, steps=steps.get(task.id, []))
                    channel.event("end", final, task_id=task.id, message_id=_end_message_id(task.id), tenant_id=task.tenant_id)
                    if task.reply_to:
                        channel.reply(final, task.tenant_id, reply_to=task.reply_to, correlation_id=task.correlation_id)
                        replies += 1
                    done.append(task.id)
        finally:
            # A task counts once its end and reply are both confirmed (a failed reply: both again next round).
            result.ends += len(done)
            result.replies += replies
            observe_relay_published(RelayKind.END, len(done))
            observe_relay_published(RelayKind.REPLY, replies)
    return result


def _steps_of(session: Session, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Step]]:
    steps: dict[uuid.UUID, list[Step]] = {}
    for step in session.exec(select(Step).where(col(Step.task_id).in_(task_ids)).order_by(col(Step.task_id), col(Step.index))):
        steps.setdefault(step.task_id, []).append(step)
    return steps


@contextmanager
def _marking(session: Session, table: type[Task] | type[Step], ids: list[Any], **values: datetime) -> Iterator[None]:
    """Mark the rows whose ids the block put in ``ids`` — one UPDATE — also when the block fails
    part way (what the broker confirmed stays marked); a kill (``BaseException``) marks nothing."""
    try:
        yield
    except Exception:
        _mark(session, table, ids, values)
        session.commit()
        raise
    _mark(session, table, ids, values)


def _mark(session: Session, table: type[Task] | type[Step], ids: list[Any], values: dict[str, datetime]) -> None:
    if ids:
        session.execute(update(table).where(col(table.id).in_(ids)).values(**values))


def _measure_backlog(engine: Engine) -> None:
    with session_scope(engine) as session:
        outbox = session.exec(
            select(func.count()).select_from(Task).where(col(Task.enqueued_at).is_(None), col(Task.status).in_(ACTIVE_STATUSES))
        ).one()
        oldest = session.exec(
            select(Step.created_at).where(col(Step.published_at).is_(None)).order_by(col(Step.id)).limit(1)
        ).first()
    set_relay_backlog(outbox=int(outbox), lag_s=0.0 if oldest is None else (utcnow() - oldest).total_seconds())


class Relay:
    """Runs :func:`relay_once` every ``UMI_RELAY_INTERVAL_S``; a failed round is logged, counted and retried."""

    def __init__(self, engine: Engine, settings: Settings, *, dispatcher: Dispatcher, connections: ConnectionPool) -> None:
        self.engine = engine
        self.interval_s = settings.relay_interval_s
        self.publisher = EventPublisher(connections, Topology(settings), timeout_s=settings.publish_timeout_s)
        self.dispatcher = dispatcher
        # The request path holds a new task's row for at most one publish attempt; let it win.
        self.outbox_grace_s = settings.publish_timeout_s + 1.0
        #: Rounds run, and messages published, for tests and logs.
        self.rounds = 0
        self.published = 0
        self._failing_since: float | None = None
        self._last_error_log = 0.0
        initialize_relay_metrics()

    def relay_once(self) -> RelayRound:
        """One round; its failures are logged here (the first at once, then every 30 s while they last)."""
        result = relay_once(self.engine, self.publisher, self.dispatcher, outbox_grace_s=self.outbox_grace_s)
        self.rounds += 1
        self.published += result.published
        self._log(result)
        return result

    async def run(self) -> None:
        """Relay forever, one round every ``interval_s`` (in a thread: the passes block on the database and broker)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.relay_once)
            except Exception:  # relay_once contains its passes' outages; this is a bug, and the relay goes on
                logger.exception("relay round failed")

    def _log(self, result: RelayRound) -> None:
        now = time.monotonic()
        if not result.failed:
            if self._failing_since is not None:
                logger.warning("relay: recovered after %.1f s", now - self._failing_since)
                self._failing_since = None
            return
        first = self._failing_since is None
        if first or now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._failing_since = self._failing_since or now
            self._last_error_log = now
            for kind, exc in result.failed.items():
                logger.warning("relay: the %s pass failed (retried every round): %r", kind.value, exc, exc_info=first and exc)


@contextmanager
def relay_thread(engine: Engine, settings: Settings, *, name: str = "umi.relay") -> Iterator[Relay]:
    """Run a relay in a daemon thread for the block (processes without an event loop, e.g. the ingress worker).

    It publishes through its own Celery app's connections, every attempt bounded by
    ``UMI_PUBLISH_TIMEOUT_S``; leaving the block stops it after its current round.
    """
    dispatcher = request_path_dispatcher(settings, name=name)
    relay = Relay(engine, settings, dispatcher=dispatcher, connections=dispatcher.app.pool)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(relay.interval_s):
            try:
                relay.relay_once()
            except Exception:  # as in Relay.run
                logger.exception("relay round failed")

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        # The connections stay in kombu's process-wide pool (shared by every app on this broker URL).
        thread.join(timeout=settings.publish_timeout_s * 3 + 5)
