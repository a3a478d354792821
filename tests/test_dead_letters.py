"""Malformed messages on a role queue end in the dead-letter queue with a reason; the worker lives on."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from shared.dead_letters import DeadLetter, drain_dead_letters
from shared.roles import StepRole
from shared.topology import task_name
from tests.conftest import UMI, load_trajectories, single_chain_indices
from tests.messages import celery_body, celery_headers, confirmed_channel, publish
from umi.deployment import Deployment


@pytest.fixture(scope="module")
def planner_only(rabbitmq_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path_factory.mktemp("dlq"))
    try:
        system.start_worker(StepRole.PLANNER)
        yield system
    finally:
        system.close()


def _publish(system: Deployment, body: bytes, headers: dict[str, object] | None) -> None:
    """Publish like a non-Python producer would: plain AMQP with pika, confirmed."""
    with confirmed_channel(system.settings.broker_url) as channel:
        publish(channel, system.topology, StepRole.PLANNER, body, headers)


def _wait_for_letter(system: Deployment, marker: str, timeout_s: float = 20) -> DeadLetter:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for letter in drain_dead_letters(system.settings.broker_url, system.topology, limit=50):
            if marker in letter.body:
                return letter
        time.sleep(0.2)
    raise AssertionError(f"no dead letter containing {marker!r}")


def test_an_undecodable_message_is_dead_lettered_with_the_reason(planner_only: Deployment) -> None:
    marker = f"broken-{uuid.uuid4().hex}"
    _publish(planner_only, f'{{"not json {marker}'.encode(), celery_headers(task_name(StepRole.PLANNER)))
    letter = _wait_for_letter(planner_only, marker)
    assert letter.reason.startswith("undecodable message (application/json)")
    assert letter.source_queue == planner_only.topology.queue_name(StepRole.PLANNER)


def test_a_message_for_an_unknown_task_is_dead_lettered(planner_only: Deployment) -> None:
    marker = f"unknown-{uuid.uuid4().hex}"
    _publish(planner_only, celery_body(marker), celery_headers("umi.nonexistent.step"))
    assert _wait_for_letter(planner_only, marker).reason == "unknown task 'umi.nonexistent.step': no worker here runs it"


def test_a_message_without_celery_headers_is_dead_lettered(planner_only: Deployment) -> None:
    marker = f"plain-{uuid.uuid4().hex}"
    _publish(planner_only, json.dumps({"hello": marker}).encode(), None)
    assert _wait_for_letter(planner_only, marker).reason == "not a Celery task message (no task header)"


def test_a_job_that_fails_validation_is_dead_lettered_naming_the_field(planner_only: Deployment) -> None:
    marker = f"badjob-{uuid.uuid4().hex}"
    job = {"task_id": marker, "step_index": 1, "role": "planner"}
    _publish(planner_only, celery_body(job), celery_headers(task_name(StepRole.PLANNER)))
    letter = _wait_for_letter(planner_only, marker)
    assert letter.reason.startswith("invalid planner job: task_id: Input should be a valid UUID")


def test_a_job_for_a_task_that_does_not_exist_is_dead_lettered(planner_only: Deployment) -> None:
    missing = uuid.uuid4()
    job = {"task_id": str(missing), "step_index": 1, "role": "planner"}
    _publish(planner_only, celery_body(job), celery_headers(task_name(StepRole.PLANNER)))
    assert _wait_for_letter(planner_only, str(missing)).reason == f"task {missing} does not exist"


def test_umi_dlq_list_shows_the_reasons_and_leaves_the_letters_queued(planner_only: Deployment) -> None:
    marker = f"listed-{uuid.uuid4().hex}"
    _publish(planner_only, celery_body(marker), celery_headers("umi.other.step"))
    _wait_for_letter(planner_only, marker)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("UMI_")}, **planner_only.env}
    for _ in range(2):  # listing does not consume
        result = subprocess.run([str(UMI), "dlq", "list", "--limit", "100"], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "unknown task 'umi.other.step': no worker here runs it" in result.stdout
        assert marker in result.stdout


def test_the_worker_keeps_consuming_after_poison_messages(planner_only: Deployment) -> None:
    _publish(planner_only, b"\xff\xfe garbage", celery_headers(task_name(StepRole.PLANNER)))
    time.sleep(1.0)
    assert planner_only.workers[StepRole.PLANNER].poll() is None
    assert planner_only.consumer_count(StepRole.PLANNER) >= 1


def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_by_the_broker_and_its_task_ended(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path
) -> None:
    system = Deployment(
        rabbitmq_url=rabbitmq_url,
        postgres_url=postgres_url,
        log_dir=tmp_path,
        simulator={"ttft_s": 1.5},
        settings={"delivery_limit": 1, "sweep_interval_s": 0.5},
    )
    try:
        system.start_all_workers()
        record = load_trajectories()[single_chain_indices()[0]]
        task_id = system.submit(record["conversations"][0]["value"], record["tools"], timeout_s=15)
        while len(system.get(task_id)["steps"]) < 2:  # the caller job is now in flight
            time.sleep(0.05)
        for _ in range(2):  # the caller dies on this message twice: more returns than the limit of 1
            time.sleep(0.6)
            system.kill_worker(StepRole.CALLER)
            system.start_worker(StepRole.CALLER)
        letter = _wait_for_letter(system, task_id, timeout_s=30)
        assert letter.reason == "broker: delivery_limit"
        assert letter.source_queue == system.topology.queue_name(StepRole.CALLER)
        task = system.wait(task_id, timeout_s=40)
        assert (task["status"], task["end_reason"]) == ("failed", "deadline")
        assert [step["role"] for step in task["steps"]] == ["user", "planner"]
    finally:
        system.close()


def _queue_arguments(system: Deployment) -> dict[str, dict[str, object]]:
    """Each queue of the deployment's vhost: its type and arguments, as RabbitMQ holds them."""
    vhost = unquote(urlsplit(system.settings.broker_url).path[1:]) or "/"
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "type", "arguments", "--formatter", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return {
        queue["name"]: {"type": queue["type"], **{name: value for name, _kind, value in queue["arguments"]}}
        for queue in json.loads(listed.stdout)
    }


def test_role_queues_dead_letter_at_least_once_into_a_queue_with_no_delivery_limit(planner_only: Deployment) -> None:
    queues = _queue_arguments(planner_only)
    topology = planner_only.topology
    planner = queues[topology.queue_name(StepRole.PLANNER)]
    assert planner["type"] == "quorum"
    assert planner["x-dead-letter-strategy"] == "at-least-once" and planner["x-overflow"] == "reject-publish"
    letters = queues[topology.dead_letter_queue_name]
    assert letters["type"] == "classic" and "x-delivery-limit" not in letters

    marker = f"reread-{uuid.uuid4().hex}"
    _publish(planner_only, celery_body(marker), celery_headers("umi.unknown.step"))
    _wait_for_letter(planner_only, marker)
    for _ in range(25):  # more often than RabbitMQ 4's default delivery limit of 20
        assert marker in "".join(letter.body for letter in drain_dead_letters(planner_only.settings.broker_url, topology, limit=500))
