"""Bad configuration and bad task input fail with errors that name what is wrong."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from services.gateway.app import create_app
from shared.asgi import ServerThread
from shared.db import get_engine, upgrade_schema
from shared.models import Task
from shared.schemas import StepJob
from shared.settings import ConfigurationError, load_settings
from tests.conftest import UMI


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"broker_url": "redis://localhost:6379/0"}, "UMI_BROKER_URL"),
        ({"database_url": "mysql://root@localhost/umi"}, "UMI_DATABASE_URL"),
        ({"planner_llm_url": "localhost:30000"}, "UMI_PLANNER_LLM_URL"),
        ({"max_steps": 0}, "UMI_MAX_STEPS"),
        ({"tools_mirror": "/nonexistent/trajectories.json"}, "UMI_TOOLS_MIRROR"),
    ],
)
def test_bad_settings_name_the_variable(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        load_settings(**overrides)


def test_postgres_urls_are_normalised_to_psycopg3() -> None:
    assert load_settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"


def _umi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UMI_")}
    return subprocess.run([str(UMI), *args], env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_a_worker_with_a_bad_broker_url_exits_with_a_clear_error() -> None:
    result = _umi("worker", "planner", env={"UMI_BROKER_URL": "redis://localhost:6379/0"})
    assert result.returncode == 2
    assert "UMI_BROKER_URL" in result.stderr and "amqp://" in result.stderr


def test_a_worker_refuses_a_database_without_the_schema(tmp_path: Path) -> None:
    result = _umi("worker", "caller", env={"UMI_DATABASE_URL": f"sqlite:///{tmp_path}/empty.db"})
    assert result.returncode == 2
    assert "run `umi db upgrade`" in result.stderr


def test_submit_with_a_missing_tools_file_says_so(tmp_path: Path) -> None:
    result = _umi("submit", "hi", "--tools", str(tmp_path / "nope.json"), env={})
    assert result.returncode == 2 and "file not found" in result.stderr


class _RecordingDispatcher:
    def __init__(self, fail: bool = False) -> None:
        self.jobs: list[StepJob] = []
        self.fail = fail

    def dispatch(self, job: StepJob) -> None:
        if self.fail:
            raise ConnectionRefusedError("broker unreachable")
        self.jobs.append(job)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[httpx.Client, _RecordingDispatcher]]:
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/umi.db")
    upgrade_schema(settings.database_url)
    dispatcher = _RecordingDispatcher()
    with ServerThread(create_app(settings, dispatcher=dispatcher)) as server, httpx.Client(base_url=server.url) as client:
        yield client, dispatcher


TOOL = {"Name": "get_weather_for_weather", "function": "Weather by city.", "input": {"city": "string, "}}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"tools": [TOOL]}, "query", "Field required"),
        ({"query": "   ", "tools": [TOOL]}, "query", "query must not be blank"),
        ({"query": "q", "tools": []}, "tools", "at least 1 item"),
        ({"query": "q", "tools": [TOOL, TOOL]}, "tools", "duplicate tool Name 'get_weather_for_weather'"),
        ({"query": "q", "tools": [{"function": "f", "input": {}}]}, "Name", "Field required"),
        ({"query": "q", "tools": [TOOL], "max_steps": 0}, "max_steps", "greater than or equal to 1"),
        ({"query": "q", "tools": [TOOL], "priority": 3}, "priority", "Extra inputs are not permitted"),
        ({"query": "q", "tools": [TOOL], "history": [{"from": "caller", "value": "Action: x"}]}, "history", "must end where the planner acts next"),
        ({"query": "q", "tools": [TOOL], "history": [{"from": "robot", "value": "hi"}]}, "from", "Input should be 'user'"),
        ({"query": "q", "tools": [TOOL], "mode": "batch"}, "mode", "Input should be 'agent' or 'static_step'"),
        ({"query": "q", "tools": [TOOL], "max_new_tokens": 4090}, "max_new_tokens", "leaves 6 of the 4096-token context"),
    ],
)
def test_bad_task_input_is_refused_naming_the_field(gateway: Any, body: dict[str, Any], field: str, message: str) -> None:
    client, dispatcher = gateway
    response = client.post("/v1/tasks", json=body)
    assert response.status_code == 422
    details = response.json()["detail"]
    assert any(field in map(str, d["loc"]) and message in d["msg"] for d in details), details
    assert dispatcher.jobs == []


def test_the_task_row_exists_when_the_202_arrives(gateway: Any) -> None:
    client, dispatcher = gateway
    accepted = client.post("/v1/tasks", json={"query": "Weather in Paris?", "tools": [TOOL]})
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued"
    task = client.get(f"/v1/tasks/{accepted.json()['id']}").json()
    assert task["status"] == "queued" and task["steps"][0] == {**task["steps"][0], "index": 0, "role": "user", "output": "Weather in Paris?"}
    assert [(str(j.task_id), j.step_index, j.role.value) for j in dispatcher.jobs] == [(accepted.json()["id"], 1, "planner")]


def test_an_unknown_task_is_a_404(gateway: Any) -> None:
    client, _ = gateway
    assert client.get(f"/v1/tasks/{uuid.uuid4()}").status_code == 404
    assert client.post(f"/v1/tasks/{uuid.uuid4()}/cancel").status_code == 404


def test_when_the_broker_refuses_the_task_is_still_accepted_and_left_to_the_outbox(tmp_path: Path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/umi.db")
    upgrade_schema(settings.database_url)
    with ServerThread(create_app(settings, dispatcher=_RecordingDispatcher(fail=True))) as server:
        response = httpx.post(f"{server.url}/v1/tasks", json={"query": "q", "tools": [TOOL]})
        assert response.status_code == 202, response.text
    with Session(get_engine(settings.database_url)) as session:
        tasks = list(session.exec(select(Task)))
    # Queued, not yet enqueued: the relay publishes its first job (tests/test_outbox.py).
    assert [(t.status, t.end_reason, t.enqueued_at) for t in tasks] == [("queued", None, None)]


def test_a_task_whose_job_never_runs_is_ended_at_its_deadline_by_the_gateway(tmp_path: Path) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/umi.db", sweep_interval_s=0.2)
    upgrade_schema(settings.database_url)
    dispatcher = _RecordingDispatcher()  # the job is "lost": nobody ever runs it
    with ServerThread(create_app(settings, dispatcher=dispatcher)) as server, httpx.Client(base_url=server.url) as client:
        task_id = client.post("/v1/tasks", json={"query": "q", "tools": [TOOL], "timeout_s": 0.1}).json()["id"]
        deadline = time.monotonic() + 15
        while client.get(f"/v1/tasks/{task_id}").json()["status"] == "queued":
            assert time.monotonic() < deadline, "the sweep never ended the overdue task"
            time.sleep(0.2)
        task = client.get(f"/v1/tasks/{task_id}").json()
    assert (task["status"], task["end_reason"]) == ("failed", "deadline")
    assert "no step finished in time" in task["error"]
