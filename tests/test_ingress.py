"""The AMQP ingress: JSON task envelopes published with plain pika, as a non-Python backend would.

Real RabbitMQ (the session's vhost, a queue prefix per test module) and PostgreSQL. Most
tests run the consumer in this process (a thread); the refusal test runs the real
``umi worker ingress`` command and checks it survives every malformed message.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jsonschema
import pika
import pytest
from kombu import Connection, Producer
from pika.adapters.blocking_connection import BlockingChannel
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import select

from services.ingress.consumer import MASKED, start_ingress_thread
from services.ingress.handler import Accepted, IngressProperties, Refused, handle_ingress_message, ingress_properties
from services.ingress.schema import envelope_json_schema, envelope_json_schema_text
from shared import crud, tenants
from shared.asgi import free_port
from shared.db import get_engine, session_scope
from shared.dead_letters import REASON_HEADER, SOURCE_QUEUE_HEADER, pika_parameters
from shared.models import DEFAULT_TENANT_ID, Task
from shared.pipeline import Runtime
from shared.relay import relay_thread
from shared.schemas import StepJob
from shared.settings import Settings, load_settings
from shared.topology import Topology
from tests.conftest import REPO, TRAIN_FILES, load_trajectories, single_chain_indices
from tests.pipeline_helpers import CollectingDispatcher
from tests.tcp_proxy import TcpProxy
from umi import cli
from umi.deployment import Deployment
from umi.embedded import EmbeddedSystem

T = TypeVar("T")

TOOLS = [{"Name": "validate_email", "function": "Checks an email address.", "input": {"email": "string"}}]


def envelope(query: str = "Is test@example.com a valid address?", **task: Any) -> dict[str, Any]:
    return {"schema_version": 1, "task": {"query": query, "tools": TOOLS, **task}}


def encoded(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def wait_for(probe: Callable[[], T | None], *, timeout_s: float = 15, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:  # a found row, a non-empty list, True
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Ingress:
    """One deployment's ingress: settings, a pika channel, a reply queue and the database."""

    settings: Settings
    channel: BlockingChannel
    reply_queue: str
    #: Replies read while waiting for another one, by correlation id.
    _replies: dict[str, tuple[pika.BasicProperties, dict[str, Any]]] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return Topology(self.settings)

    @property
    def engine(self) -> Any:
        return get_engine(self.settings.database_url)

    def publish(self, body: bytes, *, message_id: str | None, api_key: str | None = None, correlation_id: str | None = None,
                reply: bool = True, headers: dict[str, Any] | None = None) -> None:
        """Publish to ``umi.ingress`` through the default exchange, persistent and confirmed."""
        all_headers = dict(headers or {})
        if api_key is not None:
            all_headers["x-api-key"] = api_key
        self.channel.basic_publish(
            exchange="",
            routing_key=self.topology.ingress_queue_name,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self.reply_queue if reply else None,
                headers=all_headers or None,
            ),
            mandatory=True,
        )

    def reply(self, correlation_id: str, *, timeout_s: float = 15) -> tuple[pika.BasicProperties, dict[str, Any]]:
        """The reply carrying ``correlation_id`` (others read before it are kept for later calls)."""
        seen = self._replies

        def probe() -> tuple[pika.BasicProperties, dict[str, Any]] | None:
            if correlation_id in seen:
                return seen.pop(correlation_id)
            method, properties, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is not None:
                seen[properties.correlation_id] = (properties, json.loads(body))
            return None

        return wait_for(probe, timeout_s=timeout_s, what=f"a reply with correlation id {correlation_id}")

    def dead_letters(self) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every dead letter now on this deployment's dead-letter queue."""
        letters = []
        while True:
            method, properties, body = self.channel.basic_get(self.topology.dead_letter_queue_name, auto_ack=True)
            if method is None:
                return letters
            letters.append((properties, body))

    def planner_jobs(self) -> list[StepJob]:
        """Take every job now on ``umi.planner`` (Celery protocol-2 JSON bodies)."""
        jobs = []
        while True:
            method, _properties, body = self.channel.basic_get(f"{self.settings.queue_prefix}.planner", auto_ack=True)
            if method is None:
                return jobs
            jobs.append(StepJob.model_validate(json.loads(body)[0][0]))

    def task(self, tenant_id: uuid.UUID, message_id: str) -> Task | None:
        with session_scope(self.engine) as session:
            return crud.get_task_by_idempotency_key(session=session, tenant_id=tenant_id, key=message_id)

    def tasks_with_key(self, message_id: str) -> list[Task]:
        with session_scope(self.engine) as session:
            return list(session.exec(select(Task).where(Task.idempotency_key == message_id)))





def issue_key(engine: Any, tenant_name: str, **limits: Any) -> tuple[str, uuid.UUID]:
    """A new API key of tenant ``tenant_name`` (its limits set as given): the key and the tenant's id."""
    with session_scope(engine) as session:
        issued = tenants.create_api_key(session=session, tenant_name=tenant_name)
        for name, value in limits.items():
            setattr(issued.tenant, name, value)
        return issued.key, issued.tenant.id


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Ingress]:
    """A pika channel with publisher confirms and an exclusive reply queue, on ``settings``' broker."""
    connection = pika.BlockingConnection(pika_parameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        yield Ingress(settings, channel, reply_queue)
    finally:
        connection.close()


def ingress_settings(rabbitmq_url: str, postgres_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": rabbitmq_url, "database_url": postgres_url, "queue_prefix": f"ing{uuid.uuid4().hex[:6]}",
        "auth": True, "infra_retry_s": 5,
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def ingress(rabbitmq_url: str, postgres_url: str) -> Iterator[Ingress]:
    """The ingress consumer in a thread of this process, with authentication on."""
    settings = ingress_settings(rabbitmq_url, postgres_url)
    stop = start_ingress_thread(settings)
    try:
        with connected(settings) as ingress:
            yield ingress
    finally:
        stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- the envelope's JSON Schema ---------------------------------------------------------


def test_the_checked_in_json_schema_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    checked_in = (REPO / "docs" / "ingress-envelope.schema.json").read_text()
    assert checked_in == envelope_json_schema_text(), "regenerate: umi schema ingress > docs/ingress-envelope.schema.json"
    assert cli.main(["schema", "ingress"]) == 0
    assert capsys.readouterr().out == checked_in


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"task": envelope()["task"]}, "'schema_version' is a required property"),
        ({**envelope(), "schema_version": 2}, "1 was expected"),
        ({"schema_version": 1}, "'task' is a required property"),
        ({**envelope(), "priority": 3}, "Additional properties are not allowed"),
        (envelope(tools=[]), "should be non-empty"),
        (envelope(colour="red"), "Additional properties are not allowed"),
        ({"schema_version": 1, "task": {"tools": TOOLS}}, "'query' is a required property"),
    ],
)
def test_the_json_schema_refuses_bad_envelopes(document: dict[str, Any], problem: str) -> None:
    schema = json.loads((REPO / "docs" / "ingress-envelope.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(envelope(max_steps=8, history=[]))  # a good one passes
    errors = [error.message for error in validator.iter_errors(document)]
    assert any(problem in message for message in errors), errors


def test_the_schema_is_the_models(tmp_path: Path) -> None:
    assert envelope_json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert envelope_json_schema()["required"] == ["schema_version", "task"]


def test_umi_worker_ingress_refuses_celery_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worker", "ingress", "--concurrency", "8"]) == 2
    assert "takes no --concurrency or Celery options" in capsys.readouterr().err


# --- the handler, called directly --------------------------------------------------------


def test_the_handler_accepts_once_per_key_and_names_what_it_refuses(postgres_url: str) -> None:
    dispatcher = CollectingDispatcher()
    runtime = Runtime(settings=load_settings(database_url=postgres_url, auth=True), dispatcher=dispatcher)
    key, tenant_id = issue_key(runtime.engine, unique("handler"))
    # An AMQP header may arrive as bytes; the key is a secret, never shown.
    properties = ingress_properties({"message_id": unique("m"), "reply_to": "replies"}, {"x-api-key": key.encode()})
    assert key not in repr(properties)
    body = encoded(envelope())
    first = handle_ingress_message(body, properties, runtime)
    again = handle_ingress_message(body, properties, runtime)
    assert isinstance(first, Accepted) and isinstance(again, Accepted)
    assert (first.task_id, first.tenant_id, first.duplicate) == (again.task_id, tenant_id, False) and again.duplicate
    assert [job.task_id for job in dispatcher.jobs] == [first.task_id]  # one first job
    with session_scope(runtime.engine) as session:
        stored = crud.get_task(session=session, task_id=first.task_id)
        assert stored is not None
        assert (stored.reply_to, stored.correlation_id) == ("replies", properties.message_id)  # correlation falls back

    reused = handle_ingress_message(encoded(envelope("another question")), properties, runtime)
    assert isinstance(reused, Refused) and reused.error.error.type == "idempotency_key_reused"
    assert handle_ingress_message(body, properties.model_copy(update={"api_key": None}), runtime).error.error.type == (
        "unauthenticated"
    )
    not_text = ingress_properties({"message_id": unique("m")}, {"x-api-key": 12345})
    assert not_text.api_key is None
    long_id = IngressProperties(message_id="m" * 256, reply_to="replies", correlation_id="c", api_key=properties.api_key)
    refused = handle_ingress_message(body, long_id, runtime)
    assert isinstance(refused, Refused) and refused.error.error.type == "invalid_message_id" and "256" in refused.reason
    assert (refused.reply_to, refused.correlation_id) == ("replies", "c")  # answered there
    # Replies never go to the system's own queues (a role queue would take them as jobs).
    own_queue = properties.model_copy(update={"message_id": unique("m"), "reply_to": "umi.planner"})
    refused = handle_ingress_message(body, own_queue, runtime)
    assert isinstance(refused, Refused) and refused.error.error.type == "invalid_reply_to" and refused.reply_to is None
    too_many_tokens = handle_ingress_message(encoded(envelope(max_new_tokens=4096)), properties.model_copy(update={"message_id": unique("m")}), runtime)
    assert isinstance(too_many_tokens, Refused)
    assert too_many_tokens.error.error.detail and too_many_tokens.error.error.detail[0]["loc"] == ["task", "max_new_tokens"]
    assert len(dispatcher.jobs) == 1


# --- the consumer, with plain pika --------------------------------------------------------


def test_a_valid_envelope_becomes_the_tenants_task_with_its_first_planner_job(ingress: Ingress) -> None:
    key, tenant_id = issue_key(ingress.engine, unique("valid"))
    ingress.planner_jobs()
    message_id = unique("order")
    ingress.publish(encoded(envelope(max_steps=6)), message_id=message_id, correlation_id="corr-1", api_key=key)
    task = wait_for(lambda: ingress.task(tenant_id, message_id), what="the task")
    assert (task.tenant_id, task.idempotency_key, task.correlation_id, task.reply_to) == (
        tenant_id, message_id, "corr-1", ingress.reply_queue
    )
    assert task.max_steps == 6 and task.query == envelope()["task"]["query"]
    jobs = wait_for(ingress.planner_jobs, what="the first planner job")
    assert [(job.task_id, job.step_index) for job in jobs] == [(task.id, 1)]
    # Acceptance is not answered (the final state is, when the task ends); nothing is dead-lettered.
    time.sleep(0.3)
    assert ingress.channel.basic_get(ingress.reply_queue, auto_ack=True)[0] is None
    assert ingress.dead_letters() == []


def test_a_redelivered_duplicate_is_one_task(ingress: Ingress) -> None:
    key, tenant_id = issue_key(ingress.engine, unique("dup"))
    ingress.planner_jobs()
    message_id = unique("order")
    for _ in range(3):
        ingress.publish(encoded(envelope()), message_id=message_id, api_key=key)
    ingress.publish(encoded(envelope("a marker after the copies")), message_id=unique("marker"), api_key=key)
    jobs: list[StepJob] = []

    def both_jobs() -> bool:  # one consumer takes the queue in order: the marker's job comes last
        jobs.extend(ingress.planner_jobs())
        return len(jobs) >= 2

    wait_for(both_jobs, what="the jobs of the task and the marker")
    time.sleep(0.3)
    jobs.extend(ingress.planner_jobs())
    assert len(ingress.tasks_with_key(message_id)) == 1
    task = ingress.task(tenant_id, message_id)
    assert task is not None and len(jobs) == 2 and [job.task_id for job in jobs].count(task.id) == 1
    assert ingress.dead_letters() == []


def test_two_tenants_are_isolated_and_one_message_id_is_a_task_each(ingress: Ingress) -> None:
    key_a, tenant_a = issue_key(ingress.engine, unique("tenant-a"))
    key_b, tenant_b = issue_key(ingress.engine, unique("tenant-b"))
    message_id = unique("shared-id")
    ingress.publish(encoded(envelope()), message_id=message_id, api_key=key_a)
    ingress.publish(encoded(envelope()), message_id=message_id, api_key=key_b)
    task_a = wait_for(lambda: ingress.task(tenant_a, message_id), what="tenant a's task")
    task_b = wait_for(lambda: ingress.task(tenant_b, message_id), what="tenant b's task")
    assert task_a.id != task_b.id
    assert {task.tenant_id for task in ingress.tasks_with_key(message_id)} == {tenant_a, tenant_b}
    with session_scope(ingress.engine) as session:
        assert crud.get_task(session=session, task_id=task_a.id, tenant_id=tenant_b) is None
        assert crud.get_task(session=session, task_id=task_b.id, tenant_id=tenant_a) is None
    ingress.planner_jobs()


def test_over_its_limits_a_tenant_is_refused_with_retry_after_and_nothing_is_lost(ingress: Ingress) -> None:
    key, tenant_id = issue_key(ingress.engine, unique("slow"), rate_per_s=0.01, burst=1)
    accepted_id, refused_id = unique("first"), unique("second")
    ingress.publish(encoded(envelope()), message_id=accepted_id, api_key=key)
    wait_for(lambda: ingress.task(tenant_id, accepted_id), what="the first task")
    ingress.publish(encoded(envelope("one more")), message_id=refused_id, correlation_id=refused_id, api_key=key)
    _, reply = ingress.reply(refused_id)
    assert reply["error"]["type"] == "rate_limited"
    assert 1 < reply["error"]["retry_after_s"] <= 100
    letters = wait_for(ingress.dead_letters, what="the dead letter")
    assert [(props.message_id, props.headers[REASON_HEADER].split(":")[0]) for props, _ in letters] == [(refused_id, "rate_limited")]
    assert json.loads(letters[0][1]) == envelope("one more")  # the message itself, kept whole
    # A redelivered copy of the accepted message is not refused for the rate it already paid.
    ingress.publish(encoded(envelope()), message_id=accepted_id, correlation_id="copy", api_key=key)
    key_2, tenant_2 = issue_key(ingress.engine, unique("busy"), max_in_flight=1)
    ingress.publish(encoded(envelope()), message_id="busy-1", api_key=key_2)
    wait_for(lambda: ingress.task(tenant_2, "busy-1"), what="the busy tenant's task")
    ingress.publish(encoded(envelope()), message_id="busy-2", correlation_id="busy-2", api_key=key_2)
    _, reply = ingress.reply("busy-2")
    assert reply["error"]["type"] == "rate_limited" and "in flight" in reply["error"]["message"]
    assert len(ingress.tasks_with_key(accepted_id)) == 1 and ingress.task(tenant_2, "busy-2") is None
    assert [props.message_id for props, _ in wait_for(ingress.dead_letters, what="the second letter")] == ["busy-2"]
    ingress.planner_jobs()


def test_the_consumer_reconnects_after_the_broker_connection_is_cut(rabbitmq_url: str, postgres_url: str) -> None:
    host, port = rabbitmq_url.split("@", 1)[1].split("/", 1)[0].split(":")
    with TcpProxy(host, int(port)) as proxy:
        settings = ingress_settings(rabbitmq_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}"), postgres_url)
        stop = start_ingress_thread(settings)
        try:
            direct = settings.model_copy(update={"broker_url": rabbitmq_url})
            with connected(direct) as ingress:
                key, tenant_id = issue_key(ingress.engine, unique("reconnect"))
                ingress.publish(encoded(envelope()), message_id="before", api_key=key)
                wait_for(lambda: ingress.task(tenant_id, "before"), what="the task before the cut")
                proxy.cut()
                ingress.publish(encoded(envelope()), message_id="during", api_key=key)  # waits on the queue
                time.sleep(1)
                proxy.restore()
                wait_for(lambda: ingress.task(tenant_id, "during"), timeout_s=40, what="the task published during the cut")
            # Asked to stop while the broker is away, it stops at once instead of reconnecting forever.
            proxy.cut()
            time.sleep(2)  # it is reconnecting now
            started = time.monotonic()
            stop()
            assert time.monotonic() - started < 5
        finally:
            stop()


def test_a_database_outage_is_waited_out_and_the_message_accepted(rabbitmq_url: str, postgres_url: str) -> None:
    host, port = postgres_url.split("@", 1)[1].split("/", 1)[0].split(":")
    with TcpProxy(host, int(port)) as proxy:
        settings = ingress_settings(rabbitmq_url, postgres_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}"))
        stop = start_ingress_thread(settings)
        try:
            direct = settings.model_copy(update={"database_url": postgres_url})
            with connected(direct) as ingress:
                key, tenant_id = issue_key(ingress.engine, unique("outage"))
                proxy.cut()
                ingress.publish(encoded(envelope()), message_id="in-outage", correlation_id="in-outage", api_key=key)
                time.sleep(1.5)  # retried in place meanwhile, the message unacked
                assert ingress.task(tenant_id, "in-outage") is None
                proxy.restore()
                wait_for(lambda: ingress.task(tenant_id, "in-outage"), what="the task after the outage")
                assert ingress.dead_letters() == []
                assert ingress.channel.basic_get(ingress.reply_queue, auto_ack=True)[0] is None  # no error answered
        finally:
            stop()


def test_umi_up_runs_the_ingress_on_its_in_process_broker(tmp_path: Path) -> None:
    system = EmbeddedSystem.start(environ={}, with_gateway=False, database_url=f"sqlite:///{tmp_path}/umi.db", concurrency=1)
    try:
        assert any("only messages published inside this process" in line for line in system.describe())
        with Connection(system.settings.broker_url) as connection:
            Producer(connection).publish(
                encoded(envelope()), exchange="", routing_key=Topology(system.settings).ingress_queue_name,
                content_type="application/json", message_id="embedded-1",
            )
        engine = get_engine(system.settings.database_url)

        def stored() -> Task | None:
            with session_scope(engine) as session:
                return crud.get_task_by_idempotency_key(session=session, tenant_id=DEFAULT_TENANT_ID, key="embedded-1")

        assert wait_for(stored, what="the embedded task").tenant_id == DEFAULT_TENANT_ID
    finally:
        system.stop()


# --- the real `umi worker ingress` -------------------------------------------------------


@dataclass
class Case:
    name: str
    body: bytes
    expected_type: tuple[str, ...]
    message_id: str | None = "set"
    key: str = "live"
    #: A field that the error's ``detail`` must name (its ``loc``).
    loc: tuple[object, ...] | None = None
    #: Words the error's message must contain.
    says: str | None = None


def _cases() -> list[Case]:
    task = envelope()["task"]
    return [
        Case("not json", b"{this is not json", ("invalid_envelope",)),
        Case("not utf-8", b"\xff\xfe{}", ("invalid_envelope",), says="not UTF-8"),
        Case("encoded surrogate", b'{"schema_version": 1, "task": {"query": "\xed\xa0\x80"}}', ("invalid_envelope",), says="not UTF-8"),
        Case("not an object", b"[1, 2, 3]", ("invalid_envelope",)),
        Case("wrong version", encoded({"schema_version": 2, "task": task}), ("invalid_envelope",), loc=("schema_version",)),
        Case("no version", encoded({"task": task}), ("invalid_envelope",), loc=("schema_version",)),
        Case("no task", encoded({"schema_version": 1}), ("invalid_envelope",), loc=("task",)),
        Case("task without tools", encoded({"schema_version": 1, "task": {"query": "q"}}), ("invalid_envelope",), loc=("task", "tools")),
        Case("unknown field", encoded(envelope(colour="red")), ("invalid_envelope",), loc=("task", "colour")),
        Case("NUL byte", encoded(envelope()).replace(b"Is test", b"Is\x00test"), ("invalid_envelope",)),
        Case("lone surrogate", encoded(envelope("a\ud800b")), ("invalid_envelope",)),
        Case("escaped NUL", encoded(envelope("a\x00b")), ("invalid_envelope",), loc=("task", "query")),
        Case("NaN", encoded(envelope(timeout_s=float("nan"))), ("invalid_envelope",), loc=("task", "timeout_s")),
        Case("infinity in a tool input", encoded(envelope(tools=[{**TOOLS[0], "input": {"n": float("inf")}}])),
             ("invalid_envelope",), loc=("task", "tools", 0, "input", "n")),
        Case("2 MB", encoded(envelope("x" * 2_000_000)), ("too_large",), says="UMI_MAX_BODY_BYTES"),
        Case("no message_id", encoded(envelope()), ("invalid_message_id",), message_id=None, says="message_id property"),
        # (A message_id over 255 characters cannot be sent: AMQP's shortstr holds 255 bytes; see the handler's test.)
        Case("no key", encoded(envelope()), ("unauthenticated",), key="none", says="x-api-key"),
        Case("unknown key", encoded(envelope()), ("unauthenticated",), key="umi_not-a-key"),
        Case("revoked key", encoded(envelope()), ("unauthenticated",), key="revoked"),
    ]


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_umi_worker_ingress_dead_letters_and_answers_every_malformed_message_and_keeps_running(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    deployment = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path, settings={"auth": True})
    try:
        metrics_port = free_port()
        process = deployment.start_ingress(env={"UMI_METRICS_PORT": str(metrics_port)})
        pid = process.pid
        assert _metrics(metrics_port)[("umi_dead_letters_total", (("reason", "malformed"), ("role", "ingress")))] == 0
        with connected(deployment.settings) as ingress:
            live, tenant_id = issue_key(ingress.engine, unique("worker"))
            revoked, _ = issue_key(ingress.engine, unique("revoked"))
            with session_scope(ingress.engine) as session:
                tenants.revoke_api_key(session=session, key_or_id=revoked)
            keys = {"live": live, "revoked": revoked, "none": None, "umi_not-a-key": "umi_not-a-key"}
            cases = _cases()
            for case in cases:
                message_id = unique("case") if case.message_id == "set" else case.message_id
                ingress.publish(case.body, message_id=message_id, correlation_id=case.name, api_key=keys[case.key])
            for case in cases:
                properties, reply = ingress.reply(case.name)
                assert properties.content_type == "application/json", case.name
                error = reply["error"]
                assert error["type"] in case.expected_type, (case.name, error)
                assert error["message"], case.name
                if case.says is not None:
                    assert case.says in error["message"], (case.name, error)
                if case.loc is not None:
                    assert [list(case.loc)] == [item["loc"] for item in error["detail"] if tuple(item["loc"]) == case.loc], (case.name, error)
            found: list[tuple[pika.BasicProperties, bytes]] = []

            def every_letter() -> bool:
                found.extend(ingress.dead_letters())
                return len(found) >= len(cases)

            wait_for(every_letter, what="every dead letter")
            letters = {props.correlation_id: (props, body) for props, body in found}
            assert sorted(letters) == sorted(case.name for case in cases)
            for case in cases:
                props, body = letters[case.name]
                assert body == case.body, case.name  # the message whole
                assert props.headers[REASON_HEADER].split(":")[0] in case.expected_type, case.name
                assert props.headers[SOURCE_QUEUE_HEADER] == deployment.topology.ingress_queue_name
                assert props.reply_to == ingress.reply_queue and props.correlation_id == case.name
                if keys[case.key] is not None:
                    assert props.headers["x-api-key"] == MASKED, case.name  # never stored
            assert process.poll() is None and process.pid == pid  # the consumer is still the same process
            counted = _metrics(metrics_port)
            for kind, count in {"malformed": 2, "invalid_envelope": 14, "unauthenticated": 3}.items():
                assert counted[("umi_dead_letters_total", (("reason", kind), ("role", "ingress")))] == count, kind
            # A valid message afterwards is accepted.
            ingress.publish(encoded(envelope()), message_id="after", api_key=live)
            assert wait_for(lambda: ingress.task(tenant_id, "after"), what="the valid task").tenant_id == tenant_id
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        log = "".join(path.read_text(errors="replace") for path in tmp_path.glob("ingress-*.log"))
        assert live not in log and revoked not in log  # keys never logged
        assert "dead-lettered" in log
    finally:
        deployment.close()


def test_killing_umi_worker_ingress_mid_way_loses_and_duplicates_nothing(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    deployment = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path, settings={"auth": True})
    try:
        first = deployment.start_ingress()
        with connected(deployment.settings) as ingress:
            key, tenant_id = issue_key(ingress.engine, unique("killed"))
            message_ids = [f"kill-{i}" for i in range(40)]
            for message_id in message_ids:
                ingress.publish(encoded(envelope(f"question {message_id}")), message_id=message_id, api_key=key)
            wait_for(lambda: ingress.task(tenant_id, "kill-5"), what="a few tasks")
            first.send_signal(signal.SIGKILL)  # mid-way: no warm shutdown, the messages in hand unacked
            first.wait(10)
            # A consumer that dies after committing, before its ack: take the next message, store its task
            # as the consumer does, and let the connection close with the message unacked (requeued).
            runtime = Runtime(settings=deployment.settings, dispatcher=CollectingDispatcher())
            with connected(deployment.settings) as dying:
                method, properties, body = dying.channel.basic_get(deployment.topology.ingress_queue_name, auto_ack=False)
                assert method is not None
                committed = handle_ingress_message(body, ingress_properties(vars(properties), properties.headers), runtime)
                assert isinstance(committed, Accepted)
            deployment.start_ingress()
            for message_id in message_ids:
                wait_for(lambda message_id=message_id: ingress.task(tenant_id, message_id), what=message_id)
            with session_scope(ingress.engine) as session:
                keys = list(session.exec(select(Task.idempotency_key).where(Task.tenant_id == tenant_id)))
            assert sorted(keys) == sorted(message_ids)  # each once
            assert ingress.dead_letters() == []
        log = (tmp_path / "ingress-1.log").read_text()
        assert f"accepted again (duplicate message_id {properties.message_id!r})" in log  # the redelivered copy
    finally:
        deployment.close()


# --- the round trip a non-Python backend makes ------------------------------------------------


def test_a_task_published_over_amqp_runs_and_comes_back_on_reply_to_with_its_events_on_umi_events(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """Publish an envelope with pika, follow the steps on ``umi.events``, get the final state on ``reply_to``.

    Real worker processes, the real ``umi worker ingress`` (whose relay, like the gateway's, publishes
    the events and the reply), the simulator replaying a recorded trajectory.
    """
    record = load_trajectories()[single_chain_indices()[0]]
    deployment = Deployment(
        rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path, simulator={"data": TRAIN_FILES}, settings={"auth": True}
    )
    try:
        deployment.start_all_workers()
        deployment.start_ingress()
        with connected(deployment.settings) as ingress:
            key, tenant_id = issue_key(ingress.engine, unique("amqp"))
            events = ingress.channel.queue_declare("", exclusive=True).method.queue
            ingress.channel.queue_bind(events, deployment.topology.events_exchange.name, routing_key="task.#")
            task = {"query": record["conversations"][0]["value"], "tools": record["tools"]}
            ingress.publish(encoded({"schema_version": 1, "task": task}), message_id=unique("trip"), api_key=key, correlation_id="trip-1")

            properties, final = ingress.reply("trip-1", timeout_s=90)
            assert properties.content_type == "application/json"
            assert final["status"] == "succeeded" and final["answer"] == record["conversations"][-1]["value"]
            shown = deployment.http.get(f"/v1/tasks/{final['id']}", headers={"Authorization": f"Bearer {key}"})
            assert final == shown.json()  # the reply is the task as GET shows it
            with session_scope(ingress.engine) as session:
                stored = crud.get_task(session=session, task_id=uuid.UUID(final["id"]))
                assert stored is not None and stored.tenant_id == tenant_id

            received: list[tuple[str, dict[str, Any]]] = []

            def end_seen() -> bool:
                while (message := ingress.channel.basic_get(events, auto_ack=True))[0] is not None:
                    method, _properties, body = message
                    received.append((method.routing_key, json.loads(body)))
                return any(key == f"task.{final['id']}.end" for key, _ in received)

            wait_for(end_seen, timeout_s=15, what="the end event")
            steps = sorted((body for key, body in received if key == f"task.{final['id']}.step"), key=lambda step: step["index"])
            assert [step["index"] for step in steps] == list(range(len(record["conversations"])))
            assert [{k: v for k, v in step.items() if k != "task_id"} for step in steps] == final["steps"]
            assert [body for key, body in received if key == f"task.{final['id']}.end"][-1] == final
    finally:
        deployment.close()


def test_a_tenants_broker_user_gets_its_own_events_and_cannot_bind_to_every_task(rabbitmq_url: str, postgres_url: str) -> None:
    """The broker permissions docs/ingress.md gives a tenant's own RabbitMQ user: it publishes to
    ``umi.ingress``, reads its replies and binds ``umi.events`` by a task id it knows; binding
    ``task.#`` (every tenant's tasks) is refused by RabbitMQ itself."""
    settings = ingress_settings(rabbitmq_url, postgres_url)
    events_exchange = Topology(settings).events_exchange.name
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    user, password = unique("tenant-user"), uuid.uuid4().hex

    def rabbitmqctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    rabbitmqctl("add_user", user, password)
    try:
        # Exactly as docs/ingress.md ("Tenant isolation on the broker") sets them.
        exchange = events_exchange.replace(".", r"\.")
        rabbitmqctl("set_permissions", "-p", vhost, user,
                    r"^amq\.gen-.*", r"^(amq\.gen-.*|amq\.default)$", rf"^(amq\.gen-.*|{exchange})$")
        rabbitmqctl("set_topic_permissions", "-p", vhost, user, events_exchange, "^$", r"^task\.[0-9a-f-]{36}\.(\*|step|end)$")
        stop = start_ingress_thread(settings)
        try:
            with connected(settings) as admin:
                key, tenant_id = issue_key(admin.engine, unique("brokeruser"))
                tenant_url = rabbitmq_url.replace("guest:guest@", f"{user}:{password}@")
                with connected(settings.model_copy(update={"broker_url": tenant_url})) as tenant:
                    message_id = unique("own")
                    tenant.publish(encoded(envelope()), message_id=message_id, api_key=key, correlation_id="own-1")
                    task = wait_for(lambda: admin.task(tenant_id, message_id), what="the tenant's task")
                    events = tenant.channel.queue_declare("", exclusive=True).method.queue
                    tenant.channel.queue_bind(events, events_exchange, routing_key=f"task.{task.id}.*")
                    with relay_thread(admin.engine, settings):
                        with session_scope(admin.engine) as session:
                            crud.cancel_task(session=session, task_id=task.id)
                        _, final = tenant.reply("own-1")
                    assert (final["id"], final["status"]) == (str(task.id), "cancelled")
                    routing_keys = []
                    while (message := tenant.channel.basic_get(events, auto_ack=True))[0] is not None:
                        routing_keys.append(message[0].routing_key)
                    assert routing_keys == [f"task.{task.id}.step", f"task.{task.id}.end"]
                    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
                        tenant.channel.queue_bind(events, events_exchange, routing_key="task.#")
        finally:
            stop()
    finally:
        rabbitmqctl("delete_user", user)
