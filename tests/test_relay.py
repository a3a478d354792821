"""The event relay on the real PostgreSQL and RabbitMQ, consumed with plain pika as another backend would.

* every stored step is published once on ``umi.events`` (``task.<id>.step``), then the end
  (``task.<id>.end``) with the ``GET /v1/tasks/{id}`` body, and an AMQP task's final state
  goes to its ``reply_to`` with its ``correlation_id``;
* a relay killed between the broker's confirm and its mark publishes again (same
  ``message_id``), nothing lost; a broker failure part way keeps what was confirmed;
* two relays at once publish every event exactly once (``SKIP LOCKED``);
* a relay keeps running through a database outage and a broker outage, counting its errors.

Each test module gets its own database, so no other test's rows meet these relays.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.gateway.app import create_app
from shared import crud
from shared.celery_app import create_celery_app
from shared.db import get_engine, session_scope
from shared.models import DEFAULT_TENANT_ID, Step, Task
from shared.relay import (
    EVENT_VERSION_HEADER,
    TENANT_HEADER,
    EventPublisher,
    relay_once,
    relay_step_events,
    relay_task_ends,
    relay_thread,
)
from shared.schemas import TaskCreate, TaskOrigin
from shared.settings import Settings, load_settings
from shared.tenants import get_or_create_tenant
from shared.topology import Topology
from tests.conftest import fresh_postgres_database
from tests.pipeline_helpers import CollectingDispatcher
from tests.tcp_proxy import TcpProxy

TOOL = {"Name": "get_weather_for_weather", "function": "Weather by city.", "input": {"city": "string, "}}
HISTORY = [
    {"from": "assistant", "value": "I should call the tool.\nNext: caller."},
    {"from": "caller", "value": 'Action: get_weather_for_weather\nAction Input: {\"city\": \"Paris\"}'},
    {"from": "observation", "value": '{"error": "", "response": "sunny"}'},
]


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with fresh_postgres_database("umi_relay") as url:
        yield url


@pytest.fixture
def settings(database_url: str, rabbitmq_url: str) -> Settings:
    return load_settings(database_url=database_url, broker_url=rabbitmq_url, queue_prefix=f"umi{uuid.uuid4().hex[:6]}", publish_timeout_s=1.0)


@pytest.fixture
def publisher(settings: Settings) -> EventPublisher:
    app = create_celery_app(settings, name="test.relay")
    with app.connection_for_write() as connection:
        Topology(settings).declare(connection)
    return EventPublisher(app.pool, Topology(settings), timeout_s=settings.publish_timeout_s)


class EventConsumer:
    """A pika queue bound to ``umi.events`` for some routing keys; collects (routing key, properties, body)."""

    def __init__(self, settings: Settings, *binding_keys: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        exchange = Topology(settings).events_exchange.name
        self.channel.exchange_declare(exchange, "topic", durable=True)  # as the relay declares it, whoever comes first
        for key in binding_keys:
            self.channel.queue_bind(self.queue, exchange, routing_key=key)
        self.messages: list[tuple[str, pika.BasicProperties, dict[str, Any]]] = []

    def drain(self, queue: str | None = None) -> list[tuple[str, pika.BasicProperties, dict[str, Any]]]:
        """Everything waiting on the queue now."""
        while True:
            method, properties, body = self.channel.basic_get(queue or self.queue, auto_ack=True)
            if method is None:
                return self.messages
            self.messages.append((method.routing_key, properties, json.loads(body)))

    def close(self) -> None:
        self.connection.close()


def ended_task(engine: Engine, *, history: list[dict[str, str]] = HISTORY, origin: TaskOrigin | None = None) -> uuid.UUID:
    """A task with its query and history stored, then cancelled: steps 0..3 and an end to publish."""
    with session_scope(engine) as session:
        task = crud.create_task(
            session=session,
            task_in=TaskCreate.model_validate({"query": "Weather in Paris?", "tools": [TOOL], "history": history}),
            max_steps=12,
            timeout_s=60,
            constrained=True,
            origin=origin,
        )
    with session_scope(engine) as session:
        crud.cancel_task(session=session, task_id=task.id)
    return task.id


def until(predicate: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def relay_until_idle(engine: Engine, publisher: EventPublisher) -> None:
    """Rounds until one publishes nothing (and none fails)."""
    while True:
        result = relay_once(engine, publisher, CollectingDispatcher(), outbox_grace_s=3600)
        assert not result.failed, result.failed
        if result.published == 0:
            return


def stored(engine: Engine, task_id: uuid.UUID) -> tuple[Task, list[Step]]:
    with Session(engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
        assert task is not None
        return task, crud.list_steps(session=session, task_id=task_id)


def test_each_stored_step_then_the_end_is_published_once_as_the_api_shows_it(settings: Settings, publisher: EventPublisher) -> None:
    engine = get_engine(settings.database_url)
    task_id = ended_task(engine)
    consumer = EventConsumer(settings, f"task.{task_id}.*")
    try:
        relay_until_idle(engine, publisher)
        messages = consumer.drain()
    finally:
        consumer.close()
    with TestClient(create_app(settings, dispatcher=CollectingDispatcher())) as client:
        shown = client.get(f"/v1/tasks/{task_id}").json()

    assert [key for key, _, _ in messages] == [f"task.{task_id}.step"] * 4 + [f"task.{task_id}.end"]
    steps = [body for key, _, body in messages[:4]]
    assert steps == [{**step, "task_id": str(task_id)} for step in shown["steps"]]
    assert [step["index"] for step in steps] == [0, 1, 2, 3] and steps[1]["next"] == "caller"
    assert messages[-1][2] == shown and shown["status"] == "cancelled"
    for (_, properties, body), message_id in zip(messages, [f"{task_id}:{i}" for i in range(4)] + [f"{task_id}:end"], strict=True):
        assert properties.message_id == message_id
        assert properties.type == ("umi.end" if message_id.endswith(":end") else "umi.step")
        assert properties.content_type == "application/json" and properties.delivery_mode == 2
        assert properties.headers == {EVENT_VERSION_HEADER: 1, TENANT_HEADER: str(DEFAULT_TENANT_ID)}  # the task's tenant
    task, rows = stored(engine, task_id)
    assert task.end_published_at is not None and all(row.published_at is not None for row in rows)


def test_an_amqp_task_gets_its_final_state_on_its_reply_queue_with_its_correlation_id(settings: Settings, publisher: EventPublisher) -> None:
    consumer = EventConsumer(settings)
    reply_queue = consumer.channel.queue_declare("", exclusive=True).method.queue
    try:
        engine = get_engine(settings.database_url)
        with session_scope(engine) as session:
            tenant_id = get_or_create_tenant(session=session, name=f"acme-{uuid.uuid4().hex[:6]}").id
        origin = TaskOrigin(tenant_id=tenant_id, reply_to=reply_queue, correlation_id="order-17")
        task_id = ended_task(engine, origin=origin)
        relay_until_idle(engine, publisher)
        replies = consumer.drain(reply_queue)
    finally:
        consumer.close()
    task, steps = stored(engine, task_id)  # another tenant's task: GET as the default tenant would be a 404
    shown = json.loads(crud.task_public(task=task, steps=steps).model_dump_json(by_alias=True))
    assert len(replies) == 1
    _, properties, body = replies[0]
    assert properties.correlation_id == "order-17" and body == shown
    assert properties.message_id == f"{task_id}:end" and properties.headers[TENANT_HEADER] == str(tenant_id)


class Killed(BaseException):
    """The relay process dies (not an error it handles)."""


class FailingPublisher(EventPublisher):
    """Publishes for real, but at the ``at``-th step event raises ``error``: after its confirm
    (a relay killed before its mark), or instead of publishing it (``confirmed=False``: the broker failed)."""

    def __init__(self, base: EventPublisher, *, at: int, error: BaseException, confirmed: bool = True) -> None:
        self.__dict__.update(vars(base))
        self.at, self.error, self.confirmed, self.sent = at, error, confirmed, 0

    def open(self) -> Any:
        outer = super().open()
        publisher = self

        class Wrapped:
            def __enter__(self) -> Any:
                channel = outer.__enter__()
                original = channel.event

                def event(kind: str, *args: Any, **kwargs: Any) -> None:
                    if kind != "step":
                        return original(kind, *args, **kwargs)
                    publisher.sent += 1
                    if publisher.sent == publisher.at and not publisher.confirmed:
                        raise publisher.error
                    original(kind, *args, **kwargs)
                    if publisher.sent == publisher.at:
                        raise publisher.error

                channel.event = event  # type: ignore[method-assign]
                return channel

            def __exit__(self, *exc: Any) -> Any:
                return outer.__exit__(*exc)

        return Wrapped()


def test_a_relay_killed_between_confirm_and_mark_publishes_again_and_nothing_is_lost(settings: Settings, publisher: EventPublisher) -> None:
    engine = get_engine(settings.database_url)
    relay_until_idle(engine, publisher)  # nothing else waits in this database
    task_id = ended_task(engine)
    consumer = EventConsumer(settings, f"task.{task_id}.*")
    try:
        with pytest.raises(Killed):
            relay_step_events(engine, FailingPublisher(publisher, at=2, error=Killed()))
        assert [row.published_at for row in stored(engine, task_id)[1]] == [None] * 4, "a killed relay marks nothing"
        relay_until_idle(engine, publisher)
        messages = consumer.drain()
    finally:
        consumer.close()
    ids = [properties.message_id for _, properties, _ in messages]
    # Steps 0 and 1 were confirmed before the kill: published twice, with the same message ids.
    assert ids == [f"{task_id}:{i}" for i in (0, 1, 0, 1, 2, 3)] + [f"{task_id}:end"]
    assert sorted(set(ids)) == sorted([f"{task_id}:{i}" for i in range(4)] + [f"{task_id}:end"])


def test_a_broker_failure_part_way_keeps_what_was_confirmed_and_the_end_waits(settings: Settings, publisher: EventPublisher) -> None:
    engine = get_engine(settings.database_url)
    relay_until_idle(engine, publisher)
    task_id = ended_task(engine)
    consumer = EventConsumer(settings, f"task.{task_id}.*")
    try:
        with pytest.raises(ConnectionError):
            relay_step_events(engine, FailingPublisher(publisher, at=3, error=ConnectionError("broker went away"), confirmed=False))
        assert [row.published_at is not None for row in stored(engine, task_id)[1]] == [True, True, False, False]
        assert relay_task_ends(engine, publisher).ends == 0, "no end event while a step event is missing"
        relay_until_idle(engine, publisher)
        ids = [properties.message_id for _, properties, _ in consumer.drain()]
    finally:
        consumer.close()
    assert ids == [f"{task_id}:{i}" for i in range(4)] + [f"{task_id}:end"]


def test_two_relays_at_once_publish_every_event_exactly_once(settings: Settings, publisher: EventPublisher) -> None:
    engine = get_engine(settings.database_url)
    relay_until_idle(engine, publisher)
    consumer = EventConsumer(settings, "task.#")
    task_ids = [ended_task(engine) for _ in range(12)]
    failures: list[BaseException] = []

    def relay() -> None:
        try:
            idle = 0
            while idle < 3:  # the other relay may hold the last rows for a moment
                result = relay_once(engine, publisher, CollectingDispatcher(), outbox_grace_s=3600, batch_size=5)
                assert not result.failed, result.failed
                idle = idle + 1 if result.published == 0 else 0
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=relay) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        until(lambda: len(consumer.drain()) >= 12 * 5, "every event arrived")
        time.sleep(0.3)
        ids = [properties.message_id for _, properties, _ in consumer.drain()]
    finally:
        consumer.close()
    assert not failures, failures
    expected = {f"{task_id}:{suffix}" for task_id in task_ids for suffix in ("0", "1", "2", "3", "end")}
    assert len(ids) == len(expected) and set(ids) == expected, "each event once"


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_relay_keeps_running_through_a_database_outage_and_a_broker_outage(
    database_url: str, rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.relay")
    host, port = "127.0.0.1", int(rabbitmq_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    pg_port = int(database_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    with TcpProxy(host, port) as broker, TcpProxy(host, pg_port) as database:
        settings = load_settings(
            database_url=database_url.replace(f":{pg_port}/", f":{database.port}/"),
            broker_url=rabbitmq_url.replace(f":{port}/", f":{broker.port}/"),
            queue_prefix=f"umi{uuid.uuid4().hex[:6]}",
            publish_timeout_s=0.5,
            relay_interval_s=0.05,
        )
        direct = get_engine(database_url)
        consumer = EventConsumer(load_settings(broker_url=rabbitmq_url, queue_prefix=settings.queue_prefix), "task.#")
        proxied = get_engine(settings.database_url)
        try:
            with relay_thread(proxied, settings) as relay:
                for outage, kind in ((database, "step"), (broker, "step")):
                    errors = _sample("umi_relay_errors_total", kind=kind)
                    outage.cut()
                    task_id = ended_task(direct)
                    until(lambda: _sample("umi_relay_errors_total", kind=kind) >= errors + 3, f"{outage} errors counted")
                    assert stored(direct, task_id)[0].end_published_at is None
                    rounds = relay.rounds
                    outage.restore()
                    until(lambda: stored(direct, task_id)[0].end_published_at is not None, "published after the outage")
                    assert relay.rounds > rounds
                    until(lambda: any(p.message_id == f"{task_id}:end" for _, p, _ in consumer.drain()), "the end arrived")
        finally:
            consumer.close()
            proxied.dispose()
        ids = [properties.message_id for _, properties, _ in consumer.messages]
        assert {f"{task_id}:{i}" for i in range(4)} <= set(ids)
    logged = [record.getMessage() for record in caplog.records if record.name == "shared.relay"]
    # Each outage logs its first failing round (one line per pass that failed in it, so which passes
    # appear depends on where the cut fell); logging every round would give dozens of lines.
    failed = [line for line in logged if "pass failed" in line]
    assert 2 <= len(failed) <= 6, ("each outage logged once, not every round", failed)
    assert sum(line.startswith("relay: recovered") for line in logged) == 2
