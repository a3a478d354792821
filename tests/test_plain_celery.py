"""Plain Celery runs a role as ``umi worker`` does (real RabbitMQ and PostgreSQL).

``celery -A services.<role>.worker worker`` gets the same start-up checks, topology,
unique node name and queue as ``umi worker <role>``, which is itself a thin wrapper
passing further options on to ``celery worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.caller.worker import create_app as create_caller_app
from shared.asgi import free_port
from shared.roles import StepRole
from tests.conftest import REPO, UMI, load_trajectories, single_chain_indices
from umi.deployment import Deployment


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("UMI_")}, **extra}


def _celery(deployment: Deployment, role: StepRole, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``celery -A services.<role>.worker worker <args>`` against the deployment (stopped by its close()), and its log."""
    path = deployment.log_dir / f"celery-{role.value}-{uuid.uuid4().hex[:6]}.log"
    log = open(path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"services.{role.value}.worker", "worker", *args],
        env=_env({**deployment.env, **env}),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deployment.processes.append(process)
    return process, path


@pytest.fixture
def deployment(rabbitmq_url: str, postgres_url: str, tmp_path: Path) -> Iterator[Deployment]:
    system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path)
    try:
        yield system
    finally:
        system.close()


def _flower(deployment: Deployment) -> str:
    """``celery -A services.caller.worker flower`` on a free port (stopped by the deployment's close()); its URL."""
    port = free_port()
    log = open(deployment.log_dir / "flower.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "services.caller.worker", "flower", "--address=127.0.0.1", f"--port={port}"],
        env=_env({**deployment.env, "FLOWER_UNAUTHENTICATED_API": "true"}),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deployment.processes.append(process)
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: process.poll() is None and _get(f"{url}/healthcheck") is not None, "Flower answers")
    return url


def _get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=10)
    except httpx.TransportError:
        return None
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text


def _wait_until(condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting until {what}")


def test_a_role_run_by_the_plain_celery_command_completes_tasks_and_flower_lists_it(deployment: Deployment) -> None:
    others = {role: deployment.start_worker(role, wait=False) for role in (StepRole.PLANNER, StepRole.TOOLS, StepRole.SUMMARIZER)}
    queue = deployment.topology.queue_name(StepRole.CALLER)
    process, _ = _celery(deployment, StepRole.CALLER, "-Q", queue, "-P", "threads", "-c", "4", UMI_TASK_EVENTS="true")
    flower = _flower(deployment)  # started before the task: it follows task events as they come
    for role, started in {**others, StepRole.CALLER: process}.items():
        deployment.wait_for_consumers(role, at_least=1, process=started)
    record = load_trajectories()[single_chain_indices()[0]]
    task = deployment.wait(deployment.submit(record["conversations"][0]["value"], record["tools"]), timeout_s=90)
    assert task["status"] == "succeeded", task
    caller_steps = [step for step in task["steps"] if step["role"] == "caller"]
    assert caller_steps

    # Flower lists the worker (remote control) under a unique node name, not celery@<host> ...
    workers: dict[str, Any] = {}
    _wait_until(lambda: workers.update(_get(f"{flower}/api/workers?refresh=1") or {}) or workers, "Flower lists workers")
    (node,) = [name for name in workers if name.startswith("caller-")]
    # ... and, with UMI_TASK_EVENTS on, every caller step it ran.
    def succeeded() -> list[dict[str, Any]]:
        tasks = _get(f"{flower}/api/tasks") or {}
        return [t for t in tasks.values() if t["name"] == "umi.caller.step" and t["state"] == "SUCCESS" and t["worker"] == node]
    _wait_until(lambda: len(succeeded()) == len(caller_steps), f"Flower shows {len(caller_steps)} caller tasks done")


def test_a_plain_celery_worker_consumes_only_its_roles_queue(deployment: Deployment) -> None:
    process, _ = _celery(deployment, StepRole.TOOLS, "-c", "2")  # no -Q, no -P: the role's queue, threads
    deployment.wait_for_consumers(StepRole.TOOLS, at_least=1, process=process)
    assert [deployment.consumer_count(role) for role in (StepRole.PLANNER, StepRole.CALLER, StepRole.SUMMARIZER)] == [0, 0, 0]

    other = deployment.topology.queue_name(StepRole.PLANNER)
    refused, log = _celery(deployment, StepRole.TOOLS, "-Q", other)
    assert refused.wait(60) == 2, log.read_text()
    assert f"a tools worker consumes only {deployment.topology.queue_name(StepRole.TOOLS)} (-Q" in log.read_text()


@pytest.mark.parametrize(
    ("database", "code", "message"),
    [("sqlite:///{tmp}/empty.db", 2, "umi db upgrade"), ("postgresql://umi@127.0.0.1:1/umi", 1, "cannot start")],
    ids=["outdated-schema", "database-unreachable"],
)
def test_the_plain_celery_command_runs_the_start_up_checks(tmp_path: Path, database: str, code: int, message: str) -> None:
    env = _env({"UMI_DATABASE_URL": database.format(tmp=tmp_path), "UMI_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"})
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "services.summarizer.worker", "worker"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == code, result.stderr
    assert message in result.stderr  # it stopped before it consumed anything


def test_umi_worker_passes_options_it_does_not_know_on_to_celery_worker(deployment: Deployment) -> None:
    node = f"probe-{uuid.uuid4().hex[:8]}"
    log = open(deployment.log_dir / "umi-worker-probe.log", "wb")
    process = subprocess.Popen(
        [str(UMI), "worker", "summarizer", "--concurrency", "1", "--", "-n", f"{node}@%h", "--prefetch-multiplier", "1"],
        env=_env(deployment.env), stdout=log, stderr=subprocess.STDOUT,
    )
    deployment.processes.append(process)
    deployment.wait_for_consumers(StepRole.SUMMARIZER, at_least=1, process=process)
    app = create_caller_app(deployment.settings)
    deadline, replies = time.monotonic() + 30, {}
    while time.monotonic() < deadline and not any(name.startswith(f"{node}@") for name in replies):
        replies = app.control.inspect(timeout=2).ping() or {}
    assert any(name.startswith(f"{node}@") for name in replies), replies

    bad = subprocess.run(
        [str(UMI), "worker", "summarizer", "--no-such-celery-option"], env=_env(deployment.env), capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--no-such-celery-option" in bad.stderr, bad.stderr
