"""A message never kills a worker; no handler error loses a job; outages don't spend deliveries.

Worker processes run on the real RabbitMQ and PostgreSQL (``umi.deployment``); the
in-process tests call :func:`shared.worker.run_job` on real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy.exc import DataError, OperationalError
from sqlmodel import Session, select

from shared import crud
from shared.db import session_scope
from shared.dead_letters import REASON_HEADER, DeadLetter, drain_dead_letters, pika_parameters
from shared.lifecycle import TERMINAL_STATUSES
from shared.models import Step, Task, ToolCall, ToolCallStatus
from shared.pipeline import JobOutcome, Runtime, StepDraft, store_step
from shared.roles import StepRole
from shared.schemas import EndReason, StepJob, TaskCreate, TaskStatus
from shared.settings import load_settings
from shared.sqltypes import NUL_REPLACEMENT
from shared.topology import QUEUE_ROLES, task_name
from shared.worker import InfrastructureUnavailable, run_job
from tests.conftest import REPO, UMI, load_trajectories, single_chain_indices
from tests.messages import celery_body, celery_headers, confirmed_channel, publish
from tests.pipeline_helpers import CollectingDispatcher
from tests.tcp_proxy import TcpProxy
from umi.deployment import Deployment

MARKER = "x-test-marker"


# --- item 3: a message never kills a worker --------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A message a worker cannot turn into a job, and what its dead letter's reason must say."""

    name: str
    body: bytes
    headers: dict[str, object] | None
    reason: str
    content_type: str | None = "application/json"


def _shapes(role: StepRole) -> list[Shape]:
    task = task_name(role)
    job = {"task_id": str(uuid.uuid4()), "step_index": 1, "role": role.value}
    other_role = StepRole.SUMMARIZER if role is not StepRole.SUMMARIZER else StepRole.PLANNER
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def body(*parts: object) -> bytes:
        return json.dumps(list(parts)).encode()

    def headers(**changes: object) -> dict[str, object]:
        return celery_headers(task, **changes)

    return [
        Shape("int body", b"5", headers(), "invalid Celery body: expected [args, kwargs, embed], got int"),
        Shape("string body", b'"str"', headers(), "invalid Celery body: expected [args, kwargs, embed], got str"),
        Shape("null body", b"null", headers(), "invalid Celery body: expected [args, kwargs, embed], got null"),
        Shape("object body", b"{}", headers(), "got dict"),
        Shape("two-element body", body([job], {}), headers(), "got a list of 2"),
        Shape("args not a list", body(5, {}, embed), headers(), "invalid Celery body: args"),
        Shape("kwargs not a dict", body([job], "kw", embed), headers(), "invalid Celery body: kwargs"),
        Shape("embed not a dict", body([job], {}, 5), headers(), "invalid Celery body: embed"),
        Shape("two args", body([job, 1], {}, embed), headers(), "invalid Celery body: args"),
        Shape("job as a kwarg", body([], {"payload": job}, embed), headers(), "invalid Celery body: args"),
        Shape("a chained callback", body([job], {}, {**embed, "chain": [{"task": task}]}), headers(), "embed.chain"),
        Shape("list-valued task", celery_body(job), headers(task=[task]), "invalid Celery headers: task"),
        Shape("integer task", celery_body(job), headers(task=5), "invalid Celery headers: task"),
        Shape("no id", celery_body(job), {k: v for k, v in headers().items() if k != "id"}, "invalid Celery headers: id"),
        Shape("list-valued id", celery_body(job), headers(id=["a"]), "invalid Celery headers: id"),
        Shape("bad time limit", celery_body(job), headers(timelimit="x"), "invalid Celery headers: timelimit"),
        Shape("an eta", celery_body(job), headers(eta="2999-01-01T00:00:00+00:00"), "invalid Celery headers: eta"),
        Shape("expired", celery_body(job), headers(expires="2000-01-01T00:00:00+00:00"), "invalid Celery headers: expires"),
        Shape("argsrepr a dict", celery_body(job), headers(argsrepr={"a": 1}), "invalid Celery headers: argsrepr"),
        Shape("text/plain", celery_body(job), headers(), "content type 'text/plain' refused", "text/plain"),
        Shape("pickle", b"\x80\x04K\x05.", headers(), "content type 'application/x-python-serialize' refused",
              "application/x-python-serialize"),
        Shape("no content type", celery_body(job), headers(), "content type None refused", None),
        Shape("raw NUL byte", b'[[{"task_id": "a\x00b"}], {}, {}]', headers(), "undecodable message (application/json)"),
        Shape("escaped NUL", celery_body({**job, "task_id": "\x00"}), headers(), f"invalid {role.value} job: task_id"),
        Shape("not UTF-8", b"\xff\xfe[[]]", headers(), "undecodable message (application/json)"),
        Shape("huge body", celery_body("x" * 1_000_000), headers(), "message too large: 1000"),
        Shape("no headers", json.dumps({"hello": job["task_id"]}).encode(), None, "not a Celery task message"),
        Shape("unknown task", celery_body(job), headers(task="umi.nonexistent.step"), "unknown task 'umi.nonexistent.step'"),
        Shape("another role's job", celery_body({**job, "role": other_role.value}), headers(),
              f"a {role.value} worker cannot run a {other_role.value} job"),
        Shape("job with an extra field", celery_body({**job, "extra": 1}), headers(), f"invalid {role.value} job: extra"),
        Shape("job for a missing task", celery_body(job), headers(), f"task {job['task_id']} does not exist"),
    ]


@pytest.fixture(scope="module")
def deployment(rabbitmq_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Slow enough that a real task is still in flight while the malformed messages arrive.
    system = Deployment(
        rabbitmq_url=rabbitmq_url,
        postgres_url=postgres_url,
        log_dir=tmp_path_factory.mktemp("resilience"),
        simulator={"ttft_s": 0.3},
    )
    try:
        system.start_all_workers()
        yield system
    finally:
        system.close()


def _collect_letters(system: Deployment, expected: set[str], *, timeout_s: float = 60) -> dict[str, DeadLetter]:
    """Consume dead letters until one per marker in ``expected`` arrived; any other letter fails the test."""
    found: dict[str, DeadLetter] = {}
    deadline = time.monotonic() + timeout_s
    while set(found) != expected and time.monotonic() < deadline:
        for letter in drain_dead_letters(system.settings.broker_url, system.topology, limit=100, requeue=False):
            marker = letter.headers.get(MARKER) or next((m for m in expected if m in letter.body), None)
            assert marker in expected, f"an unexpected dead letter: {letter.reason}: {letter.body[:300]}"
            found[marker] = letter
        time.sleep(0.2)
    assert set(found) == expected, f"missing dead letters: {sorted(expected - set(found))}"
    return found


def _submit_recorded(system: Deployment, n: int = 0, **extra: object) -> str:
    record = load_trajectories()[single_chain_indices()[n]]
    return system.submit(record["conversations"][0]["value"], record["tools"], **extra)


@pytest.mark.parametrize("role", QUEUE_ROLES, ids=[role.value for role in QUEUE_ROLES])
def test_no_message_stops_a_worker_and_every_one_is_dead_lettered_whole(deployment: Deployment, role: StepRole) -> None:
    worker = deployment.workers[role]
    in_flight = _submit_recorded(deployment)
    shapes = {f"{role.value}-{i}-{uuid.uuid4().hex[:8]}": shape for i, shape in enumerate(_shapes(role))}
    with confirmed_channel(deployment.settings.broker_url) as channel:
        for marker, shape in shapes.items():
            headers = None if shape.headers is None else {**shape.headers, MARKER: marker}
            body = shape.body if shape.headers is not None else shape.body.replace(b"}", f', "m": "{marker}"}}'.encode())
            shapes[marker] = Shape(shape.name, body, headers, shape.reason, shape.content_type)
            publish(channel, deployment.topology, role, body, headers, content_type=shape.content_type)

    letters = _collect_letters(deployment, set(shapes))
    for marker, shape in shapes.items():
        letter = letters[marker]
        assert shape.reason in letter.reason, (shape.name, letter.reason)
        assert letter.headers[REASON_HEADER] == letter.reason
        assert letter.source_queue == deployment.topology.queue_name(role)
        # The whole message is kept: body, content type, and every header it came with.
        assert letter.body == shape.body.decode("utf-8", "replace"), shape.name
        assert letter.content_type == (shape.content_type or "application/octet-stream"), shape.name
        for name, value in (shape.headers or {}).items():
            assert letter.headers[name] == value, (shape.name, name)

    assert worker.poll() is None and deployment.workers[role] is worker, "the worker process stopped"
    assert deployment.consumer_count(role) >= 1
    # The job that was in flight beside them and the next one are untouched.
    for task_id in (in_flight, _submit_recorded(deployment, 1)):
        task = deployment.wait(task_id, timeout_s=60)
        assert (task["status"], task["end_reason"]) == ("succeeded", "answered"), task


def test_the_dead_letter_tool_keeps_tls_for_amqps() -> None:
    parameters = pika_parameters("amqps://user:pw@broker.example:5671/umi")
    assert parameters.ssl_options is not None
    assert (parameters.host, parameters.port, parameters.virtual_host) == ("broker.example", 5671, "umi")
    plain = pika_parameters("amqp://guest:guest@127.0.0.1:5672//")
    assert plain.ssl_options is None
    assert plain.virtual_host == "/"  # kombu's "//" is the default vhost


# --- exit codes and start-up checks -------------------------------------------------------


def _umi_env(system_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("UMI_")}, **system_env, **extra}


def test_a_tools_worker_with_a_missing_catalog_stops_at_start_naming_the_variable(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    env = _umi_env(
        {"UMI_BROKER_URL": rabbitmq_url, "UMI_DATABASE_URL": postgres_url, "UMI_QUEUE_PREFIX": f"umi{uuid.uuid4().hex[:6]}"},
        UMI_TOOLS_HTTP_CATALOG=str(tmp_path / "no-such-catalog"),
    )
    result = subprocess.run([str(UMI), "worker", "tools"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"UMI_TOOLS_HTTP_CATALOG: not a folder: {tmp_path / 'no-such-catalog'}" in result.stderr


def test_a_worker_started_with_a_lower_case_log_level_runs_and_stops_cleanly(deployment: Deployment) -> None:
    process = subprocess.Popen(
        [str(UMI), "worker", "summarizer", "--concurrency", "1", "--loglevel", "warning"],
        env=_umi_env(deployment.env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deployment.wait_for_consumers(StepRole.SUMMARIZER, at_least=2, process=process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert b"INFO" not in stderr  # the level was applied


STOPS_ON_AN_UNRECOVERABLE_ERROR = """
import sys
from celery import bootsteps
from services.planner.worker import create_app
from shared.roles import StepRole
from shared.settings import get_settings
from shared.worker import run_worker

class Broken(bootsteps.StartStopStep):
    def start(self, worker):
        raise RuntimeError("unrecoverable")

app = create_app()
app.steps["worker"].add(Broken)
sys.exit(run_worker(app, StepRole.PLANNER, get_settings(), concurrency=1))
"""


def test_a_worker_that_stops_on_an_unrecoverable_error_exits_non_zero(deployment: Deployment) -> None:
    result = subprocess.run(
        [sys.executable, "-c", STOPS_ON_AN_UNRECOVERABLE_ERROR],
        env=_umi_env(deployment.env), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert "unrecoverable" in result.stderr
    assert result.returncode != 0


# --- item 4: no handler error loses a job -------------------------------------------------

SECRET = "sk-resilience-secret-0123456789"


@pytest.fixture
def runtime(postgres_url: str) -> Iterator[Runtime]:
    settings = load_settings(database_url=postgres_url, llm_api_key=SecretStr(SECRET), infra_retry_s=20)
    rt = Runtime(settings=settings, dispatcher=CollectingDispatcher())
    yield rt
    rt.close()


def _new_task(rt: Runtime, query: str = "what is the weather?") -> uuid.UUID:
    record = load_trajectories()[single_chain_indices()[0]]
    with session_scope(rt.engine) as session:
        task = crud.create_task(
            session=session,
            task_in=TaskCreate(query=query, tools=record["tools"]),
            max_steps=12, timeout_s=60, constrained=True,
        )
        return task.id


def _task(rt: Runtime, task_id: uuid.UUID) -> Task:
    with Session(rt.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def _handler(*errors: BaseException) -> tuple[Callable[..., JobOutcome], list[bool]]:
    """A handler that raises ``errors`` one per call, then stores; it records each call's ``redelivered``."""
    calls: list[bool] = []

    def handle(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
        calls.append(redelivered)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return JobOutcome.STORED

    return handle, calls


def _outage() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_an_unexpected_error_ends_the_task_at_once_with_a_bounded_redacted_reason(runtime: Runtime) -> None:
    task_id = _new_task(runtime)
    handler, calls = _handler(RuntimeError(f"the server said {SECRET} " + "x" * 100_000))
    outcome = run_job(handler, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER), runtime, redelivered=False)
    assert outcome is JobOutcome.TASK_ENDED
    assert calls == [False]  # not retried
    task = _task(runtime, task_id)
    assert (task.status, task.end_reason) == (TaskStatus.FAILED, EndReason.INTERNAL_ERROR)
    assert task.error is not None and task.error.startswith("planner worker: RuntimeError: the server said ***")
    assert SECRET not in task.error
    assert len(task.error) <= 4096


def test_a_data_error_is_not_retried_as_if_the_database_were_down(runtime: Runtime) -> None:
    task_id = _new_task(runtime)
    handler, calls = _handler(DataError("INSERT …", {}, ValueError("value refused")))
    run_job(handler, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER), runtime, redelivered=False)
    assert calls == [False]
    task = _task(runtime, task_id)
    assert task.end_reason == EndReason.INTERNAL_ERROR
    assert task.error == "planner worker: ValueError: value refused"  # the driver's words, no SQL or parameters


def test_an_outage_is_retried_in_place_and_the_retries_count_as_redelivered(runtime: Runtime) -> None:
    handler, calls = _handler(_outage(), _outage())
    job = StepJob(task_id=_new_task(runtime), step_index=1, role=StepRole.TOOLS)
    assert run_job(handler, job, runtime, redelivered=False) is JobOutcome.STORED
    assert calls == [False, True, True]


def test_an_outage_longer_than_the_budget_gives_the_message_back(runtime: Runtime) -> None:
    rt = Runtime(settings=runtime.settings.model_copy(update={"infra_retry_s": 0.5}), dispatcher=runtime.dispatcher)
    handler, calls = _handler(*[_outage()] * 1000)
    started = time.monotonic()
    with pytest.raises(InfrastructureUnavailable):
        run_job(handler, StepJob(task_id=_new_task(rt), step_index=1, role=StepRole.PLANNER), rt, redelivered=False)
    assert len(calls) >= 2
    assert time.monotonic() - started < 10


def test_nul_characters_are_stored_as_replacement_characters(runtime: Runtime) -> None:
    # A query with NUL is refused at the door (tests/test_input_hardening.py); what models and tools produce is stored.
    task_id = _new_task(runtime, query="find this")
    job = StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)
    draft = StepDraft(role=StepRole.PLANNER, output="thought \x00", raw_output="raw \x00", tool_name="tool\x00name")

    def claim_with_nul(session: Session) -> None:
        session.add(ToolCall(task_id=task_id, step_index=9, tool_name="tool\x00name", arguments='{"a": "\x00"}',
                             status=ToolCallStatus.COMPLETED, error="error \x00"))

    assert store_step(job, draft, runtime, also=claim_with_nul) is JobOutcome.STORED
    with Session(runtime.engine) as session:
        step = session.exec(select(Step).where(Step.task_id == task_id, Step.tool_name == "tool\x00name")).one()
        call = session.exec(select(ToolCall).where(ToolCall.task_id == task_id)).one()
        task = session.get(Task, task_id)
    assert task is not None
    assert (step.output, step.raw_output, step.tool_name) == (
        f"thought {NUL_REPLACEMENT}", f"raw {NUL_REPLACEMENT}", f"tool{NUL_REPLACEMENT}name"
    )
    assert (call.arguments, call.error) == (f'{{"a": "{NUL_REPLACEMENT}"}}', f"error {NUL_REPLACEMENT}")


def test_a_nul_in_an_error_is_stored_when_a_task_ends(runtime: Runtime) -> None:
    task_id = _new_task(runtime)
    handler, _ = _handler(RuntimeError("bad byte \x00 here"))
    run_job(handler, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER), runtime, redelivered=False)
    assert _task(runtime, task_id).error == f"planner worker: RuntimeError: bad byte {NUL_REPLACEMENT} here"


# --- item 5: infrastructure failures don't spend the delivery limit ---------------------------


def test_a_20s_database_outage_mid_run_loses_and_dead_letters_nothing(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    host, port = postgres_url.rsplit("@", 1)[1].split("/", 1)[0].split(":")
    with TcpProxy(host, int(port)) as proxy:
        system = Deployment(
            rabbitmq_url=rabbitmq_url,
            postgres_url=postgres_url,
            log_dir=tmp_path,
            simulator={"ttft_s": 0.5},
            # Two deliveries: rejecting and requeueing through a 20 s outage would dead-letter at once.
            settings={"delivery_limit": 2, "infra_retry_s": 60},
        )
        try:
            # Only the workers reach PostgreSQL through the proxy; the gateway (and this test) directly.
            system.env["UMI_DATABASE_URL"] = postgres_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
            system.start_all_workers()
            tasks = [_submit_recorded(system, n) for n in range(6)]
            _wait_until(lambda: sum(len(system.get(t)["steps"]) for t in tasks) >= 12, timeout_s=60)
            proxy.cut()
            assert any(system.get(t)["status"] not in TERMINAL_STATUSES for t in tasks), "the outage must hit tasks mid-run"
            cut_at = time.monotonic()
            time.sleep(20)
            proxy.restore()
            finished = [system.wait(task_id, timeout_s=120) for task_id in tasks]
            assert all(w.poll() is None for w in system.workers.values())
        finally:
            system.close()
    assert [(t["status"], t["end_reason"]) for t in finished] == [("succeeded", "answered")] * len(tasks)
    assert time.monotonic() - cut_at >= 20
    assert drain_dead_letters(system.settings.broker_url, system.topology) == []


def _wait_until(condition: Callable[[], bool], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
