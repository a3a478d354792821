"""Prometheus metrics of every process, scraped over HTTP, against what the database stored.

Tasks run through the multi-process deployment (real RabbitMQ and PostgreSQL, one
``umi worker`` process per role, each serving ``/metrics`` on its own port, the gateway
in this process). Every process is scraped before and after; the summed differences
must equal what the stored steps, tool calls and tasks say.
"""

from __future__ import annotations

import json
import math
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from shared import crud, lifecycle
from shared.asgi import free_port
from shared.db import get_engine, session_scope
from shared.lifecycle import Actor, EndReason
from shared.metrics import serve_metrics
from shared.models import Step, Task, ToolCall
from shared.pipeline import JobOutcome, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.settings import ConfigurationError, load_settings
from shared.topology import task_name
from shared.worker import run_job
from tests.conftest import load_trajectories, single_chain_indices
from tests.messages import celery_body, celery_headers, confirmed_channel, publish
from tests.pipeline_helpers import CollectingDispatcher, create_task, sqlite_settings
from tests.pipeline_helpers import run_job as run_handler
from umi.cli import main
from umi.deployment import Deployment

#: A sample: its name and labels.
Key = tuple[str, frozenset[tuple[str, str]]]
LLM_ROLES = ("planner", "caller", "summarizer")


@pytest.fixture(scope="module")
def deployment(rabbitmq_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path_factory.mktemp("metrics"))
    try:
        system.start_all_workers()
        yield system
    finally:
        system.close()


def scrape(system: Deployment) -> dict[Key, float]:
    """Every sample of every process's ``/metrics``, summed over the processes."""
    totals: dict[Key, float] = {}
    urls = system.metrics_urls()
    assert set(urls) == {"gateway", "planner", "caller", "summarizer", "tools"}
    for url in (url for role_urls in urls.values() for url in role_urls):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, url
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def delta(before: dict[Key, float], after: dict[Key, float], name: str, **labels: str) -> float:
    """How much the samples called ``name`` whose labels include ``labels`` moved."""
    wanted = set(labels.items())

    def total(samples: dict[Key, float]) -> float:
        return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)

    return total(after) - total(before)


#: What a metric should have moved by: (sample name, labels it must carry) → amount.
Expected = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def assert_moved(system: Deployment, before: dict[Key, float], expected: Expected) -> None:
    """Scrape until every sample moved as ``expected`` (a worker counts just after its commit); fail naming the others."""

    def wrong(after: dict[Key, float]) -> dict[str, tuple[float, float]]:
        moved = {key: delta(before, after, key[0], **dict(key[1])) for key in expected}
        return {
            f"{name}{dict(labels)}": (moved[(name, labels)], want)
            for (name, labels), want in expected.items()
            if not math.isclose(moved[(name, labels)], want, rel_tol=1e-6, abs_tol=1e-3)
        }

    deadline = time.monotonic() + 30
    while (mismatched := wrong(scrape(system))) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not mismatched, "moved by (observed, stored): " + json.dumps(mismatched, indent=1)


def test_every_process_serves_metrics_and_they_add_up_to_the_stored_steps(deployment: Deployment) -> None:
    records = load_trajectories()
    indices = single_chain_indices()[:3]
    before = scrape(deployment)
    task_ids = [deployment.submit(records[i]["conversations"][0]["value"], records[i]["tools"]) for i in indices]
    for task_id in task_ids:
        assert deployment.wait(task_id)["status"] == "succeeded"

    ids = [uuid.UUID(task_id) for task_id in task_ids]
    with Session(get_engine(deployment.settings.database_url)) as session:
        steps = session.exec(select(Step).where(col(Step.task_id).in_(ids), Step.role != StepRole.USER)).all()
        calls = session.exec(select(ToolCall).where(col(ToolCall.task_id).in_(ids))).all()
        tasks = session.exec(select(Task).where(col(Task.id).in_(ids))).all()
        all_steps = session.exec(select(Step).where(col(Step.task_id).in_(ids))).all()

    truth: Expected = {}
    for role in ("planner", "caller", "summarizer", "tools"):
        mine = [step for step in steps if step.role == role]
        assert mine, role
        truth[("umi_step_duration_seconds_count", (("role", role),))] = len(mine)
        truth[("umi_step_duration_seconds_sum", (("role", role),))] = sum(step.latency_s or 0.0 for step in mine)
        truth[("umi_queue_wait_seconds_count", (("role", role),))] = len(mine)
        truth[("umi_jobs_in_progress", (("role", role),))] = 0
        # Each job read once and stored once; every stored step but the task's last publishes its follow-up.
        truth[("umi_step_phase_seconds_count", (("role", role), ("phase", "read")))] = len(mine)
        truth[("umi_step_phase_seconds_count", (("role", role), ("phase", "store")))] = len(mine)
        truth[("umi_step_phase_seconds_count", (("role", role), ("phase", "publish")))] = 0 if role == "summarizer" else len(mine)
        if role != "tools":
            truth[("umi_step_phase_seconds_count", (("role", role), ("phase", "prepare")))] = len(mine)
    for role in LLM_ROLES:
        mine = [step for step in steps if step.role == role]
        truth[("umi_llm_request_duration_seconds_count", (("role", role), ("outcome", "ok")))] = len(mine)
        truth[("umi_llm_tokens_total", (("role", role), ("kind", "prompt")))] = sum(step.prompt_tokens or 0 for step in mine)
        truth[("umi_llm_tokens_total", (("role", role), ("kind", "completion")))] = sum(step.completion_tokens or 0 for step in mine)
        truth[("umi_llm_tokens_total", (("role", role), ("kind", "cached")))] = sum(step.cached_tokens or 0 for step in mine)
    truth[("umi_step_duration_seconds_count", (("role", "summarizer"), ("outcome", "succeeded")))] = len(tasks)
    calls_by_label: defaultdict[tuple[tuple[str, str], ...], list[ToolCall]] = defaultdict(list)
    for call in calls:
        calls_by_label[(("tool_backend", call.backend or "none"), ("outcome", "ok" if call.ok else "error"))].append(call)
    assert calls_by_label
    for labels, group in calls_by_label.items():
        truth[("umi_tool_call_duration_seconds_count", labels)] = len(group)
        truth[("umi_tool_call_duration_seconds_sum", labels)] = sum(call.latency_s or 0.0 for call in group)
    truth[("umi_tasks_total", (("status", "succeeded"),))] = len(tasks)
    truth[("umi_task_steps_count", ())] = len(tasks)
    truth[("umi_task_steps_sum", ())] = len(all_steps)
    truth[("umi_task_duration_seconds_sum", ())] = sum(
        (task.finished_at - task.created_at).total_seconds() for task in tasks if task.finished_at
    )

    assert_moved(deployment, before, truth)
    # A task's jobs run one after another, each waiting inside the task's life.
    waited = delta(before, scrape(deployment), "umi_queue_wait_seconds_sum")
    assert 0 < waited < truth[("umi_task_duration_seconds_sum", ())]
    assert sum(truth[("umi_llm_tokens_total", (("role", role), ("kind", "prompt")))] for role in LLM_ROLES) > 0
    after = scrape(deployment)
    for role in ("planner", "caller", "summarizer", "tools"):
        assert delta(before, after, "umi_step_phase_cpu_seconds_total", role=role, phase="store") > 0
        assert 0 < delta(before, after, "umi_step_phase_seconds_sum", role=role, phase="read") < waited + 60


def test_dead_letters_are_counted_by_reason_kind(deployment: Deployment) -> None:
    before = scrape(deployment)
    job = {"v": 1, "task_id": str(uuid.uuid4()), "step_index": 3, "role": "caller"}
    with confirmed_channel(deployment.settings.broker_url) as channel:
        publish(channel, deployment.topology, StepRole.CALLER, b'{"not a celery message": 1}', None)
        publish(channel, deployment.topology, StepRole.CALLER, celery_body(job), celery_headers(task_name(StepRole.CALLER)))
        publish(channel, deployment.topology, StepRole.CALLER, celery_body({"v": 1}), celery_headers(task_name(StepRole.CALLER)))
    assert_moved(
        deployment,
        before,
        {
            ("umi_dead_letters_total", (("role", "caller"), ("reason", "malformed"))): 1,
            ("umi_dead_letters_total", (("role", "caller"), ("reason", "impossible_step"))): 1,
            ("umi_dead_letters_total", (("role", "caller"), ("reason", "invalid_job"))): 1,
            ("umi_dead_letters_total", ()): 3,
        },
    )


def test_tasks_the_gateway_ends_are_counted_once_by_final_status(deployment: Deployment) -> None:
    records = load_trajectories()
    index = single_chain_indices()[0]
    before = scrape(deployment)
    task_ids = [deployment.submit(records[index]["conversations"][0]["value"], records[index]["tools"]) for _ in range(4)]
    for task_id in task_ids:
        assert deployment.http.post(f"/v1/tasks/{task_id}/cancel").status_code == 200
    statuses = Counter(deployment.wait(task_id)["status"] for task_id in task_ids)
    assert statuses["cancelled"] >= 1  # a cancel may lose the race to a fast answer; the count must follow either way
    assert_moved(
        deployment,
        before,
        {("umi_tasks_total", (("status", status),)): count for status, count in statuses.items()}
        | {("umi_tasks_total", ()): len(task_ids), ("umi_task_steps_count", ()): len(task_ids)},
    )


def test_a_metrics_port_that_cannot_be_served_is_an_error_naming_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "caller", "--metrics-port", "70000"]) == 2
    assert "UMI_METRICS_PORT" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigurationError, match="UMI_METRICS_PORT"):
            serve_metrics(taken.getsockname()[1], host="127.0.0.1")


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _new_task(engine: Engine) -> uuid.UUID:
    record = load_trajectories()[single_chain_indices()[0]]
    with session_scope(engine) as session:
        task = crud.create_task(
            session=session, task_in=TaskCreate(query="q", tools=record["tools"]), max_steps=12, timeout_s=60, constrained=True
        )
        return task.id


def test_in_place_retries_and_a_task_end_are_counted_once_committed(postgres_url: str) -> None:
    rt = Runtime(settings=load_settings(database_url=postgres_url, infra_retry_s=20), dispatcher=CollectingDispatcher())
    outage = OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
    failures = [outage, outage, RuntimeError("boom")]

    def handler(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
        raise failures.pop(0)

    retries, failed, steps = _sample("umi_retries_total", role="caller", kind="in_place"), _sample("umi_tasks_total", status="failed"), _sample("umi_task_steps_sum")
    job = StepJob(task_id=_new_task(rt.engine), step_index=1, role=StepRole.CALLER)
    assert run_job(handler, job, rt, redelivered=False) is JobOutcome.TASK_ENDED  # two outages retried, then ended
    assert _sample("umi_retries_total", role="caller", kind="in_place") - retries == 2
    assert _sample("umi_tasks_total", status="failed") - failed == 1
    assert _sample("umi_task_steps_sum") - steps == 1  # step 0, the query

    # An end rolled back is no end: nothing is counted.
    cancelled = _sample("umi_tasks_total", status="cancelled")
    task_id = _new_task(rt.engine)
    with Session(rt.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        lifecycle.finish(task, reason=EndReason.CANCELLED, by=Actor.CLIENT)
        session.flush()
        session.rollback()
    assert _sample("umi_tasks_total", status="cancelled") == cancelled
    rt.close()


def test_a_failing_llm_request_is_counted_with_its_retries(tmp_path: Path) -> None:
    # A context this long needs no /tokenize first: the one request made is /generate, to a closed port.
    settings = sqlite_settings(tmp_path, f"http://127.0.0.1:{free_port()}", llm_max_retries=2, llm_backoff_s=0, context_length=1_000_000)
    rt = Runtime(settings=settings, dispatcher=CollectingDispatcher())
    task_id = create_task(rt, load_trajectories()[single_chain_indices()[0]])
    errors, retries, failed = (
        _sample("umi_llm_request_duration_seconds_count", role="planner", outcome="error"),
        _sample("umi_retries_total", role="planner", kind="llm"),
        _sample("umi_tasks_total", status="failed"),
    )
    assert run_handler(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)) is JobOutcome.TASK_ENDED
    assert _sample("umi_llm_request_duration_seconds_count", role="planner", outcome="error") - errors == 1
    assert _sample("umi_retries_total", role="planner", kind="llm") - retries == 2  # three attempts: two retries
    assert _sample("umi_tasks_total", status="failed") - failed == 1
    rt.close()
