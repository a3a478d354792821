"""A real Prometheus with the product's own scrape configuration, alert rules and dashboard.

``promtool`` checks the configuration and the rules and runs the rules' unit tests. Then a
Prometheus server (``umi.prometheus``) scrapes the four worker processes, the gateway, the
three SGLang simulators and RabbitMQ's own ``rabbitmq_prometheus`` plugin while tasks run
through RabbitMQ and PostgreSQL; PromQL must then show per-role throughput and latency
quantiles that agree with the stored steps, queue depth and consumers per queue, data for
every query of every dashboard panel, and the alert expressions firing on the situations
they describe.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from sqlmodel import Session, col, func, select

from shared.db import get_engine
from shared.models import Step
from shared.roles import StepRole
from shared.topology import QUEUE_ROLES, task_name
from tests.conftest import load_trajectories, single_chain_indices
from tests.messages import celery_headers, confirmed_channel, publish
from umi.deployment import Deployment
from umi.prometheus import (
    PROMETHEUS_CONFIG,
    PrometheusServer,
    Sample,
    grafana_expr,
    load_dashboard,
    local_scrape_config,
    start_observed,
)

RULES = PROMETHEUS_CONFIG.parent / "alerts.yml"
#: The worker jobs only: the gateway here serves this test process's own registry, which also
#: holds what in-process workers of earlier tests counted.
WORKER_JOBS = 'job=~"umi-(planner|caller|summarizer|tools)"'


def _promtool(*args: str, cwd: Path = PROMETHEUS_CONFIG.parent) -> str:
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_promtool_accepts_the_scrape_configuration_and_the_alert_rules() -> None:
    assert "SUCCESS" in _promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert "SUCCESS: 5 rules found" in _promtool("check", "rules", RULES.name)


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")
    unit_tests = yaml.safe_load((RULES.parent / "alerts_test.yml").read_text())["tests"]
    seen_firing = {case["alertname"] for test in unit_tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert seen_firing == set(_alert_names()), "every alert has a unit test that fires it"


def test_the_local_configuration_swaps_only_discovery_and_intervals() -> None:
    product = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [job["job_name"] for job in product["scrape_configs"]]
    local = local_scrape_config({job: [f"127.0.0.1:{9000 + i}"] for i, job in enumerate(jobs)}, rabbitmq_vhost="v1")
    assert local["rule_files"] == product["rule_files"] == ["alerts.yml"]
    for before, after in zip(product["scrape_configs"], local["scrape_configs"], strict=True):
        assert not any(key.endswith("_sd_configs") for key in after)
        kept = {key: value for key, value in before.items() if key != "static_configs" and not key.endswith("_sd_configs")}
        if after["job_name"] == "rabbitmq":
            assert after.pop("params") == {**before["params"], "vhost": ["v1"]}
            kept.pop("params")
        assert {key: value for key, value in after.items() if key != "static_configs"} == kept
    with pytest.raises(ValueError, match="umi-caller"):
        local_scrape_config({job: ["127.0.0.1:1"] for job in jobs if job != "umi-caller"})


# --- the live system -------------------------------------------------------------------
@dataclass
class Observed:
    system: Deployment
    prometheus: PrometheusServer
    vhost: str
    started: float
    task_ids: list[str]

    def window(self) -> str:
        """A rate window covering everything since Prometheus started (Grafana's "last N minutes")."""
        return f"{int(time.time() - self.started) + 30}s"


def _run_load(system: Deployment, rounds: int = 1) -> list[str]:
    records = [load_trajectories()[index] for index in single_chain_indices()]
    task_ids = [system.submit(r["conversations"][0]["value"], r["tools"]) for _ in range(rounds) for r in records]
    for task_id in task_ids:
        assert system.wait(task_id, timeout_s=120)["status"] == "succeeded"
    return task_ids


@pytest.fixture(scope="module")
def observed(rabbitmq_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path_factory.mktemp("prom"))
    prometheus: PrometheusServer | None = None
    try:
        vhost = urlsplit(rabbitmq_url).path.lstrip("/")
        prometheus = start_observed(system, vhost=vhost)
        started = time.time()
        task_ids = _run_load(system)
        prometheus.wait_for_scrape()
        yield Observed(system, prometheus, vhost, started, task_ids)
    finally:
        if prometheus is not None:
            prometheus.stop()
        system.close()


def _by(samples: list[Sample], label: str) -> dict[str, float]:
    return {sample.metric[label]: sample.number for sample in samples}


def test_prometheus_counts_every_stored_step_per_role(observed: Observed) -> None:
    with Session(get_engine(observed.system.settings.database_url)) as session:
        stored = dict(
            session.exec(
                select(Step.role, func.count())
                .where(col(Step.task_id).in_([uuid.UUID(t) for t in observed.task_ids]), Step.index > 0)
                .group_by(Step.role)
            ).all()
        )
    counted = _by(observed.prometheus.query(f"sum by (role) (umi_step_duration_seconds_count{{{WORKER_JOBS}}})"), "role")
    assert counted == {str(role): float(count) for role, count in stored.items()}
    assert set(counted) == {role.value for role in QUEUE_ROLES}
    throughput = _by(observed.prometheus.query(f"sum by (role) (rate(umi_step_duration_seconds_count[{observed.window()}]))"), "role")
    assert set(throughput) == set(counted) and all(value > 0 for value in throughput.values())


@pytest.mark.parametrize("metric", ["umi_queue_wait_seconds", "umi_step_duration_seconds"])
def test_per_role_latency_quantiles_come_from_promql(observed: Observed, metric: str) -> None:
    for quantile in (0.5, 0.95, 0.99):
        expr = f"histogram_quantile({quantile}, sum by (role, le) (rate({metric}_bucket[{observed.window()}])))"
        values = _by(observed.prometheus.query(expr), "role")
        assert set(values) == {role.value for role in QUEUE_ROLES}, expr
        assert all(0 <= value < 600 for value in values.values()), (expr, values)


def test_rabbitmq_reports_depth_and_consumers_of_each_queue_of_the_test_vhost(observed: Observed) -> None:
    topology = observed.system.topology
    role_queues = {topology.queue_name(role) for role in QUEUE_ROLES}
    # RabbitMQ refreshes its queue statistics every few seconds (collect_statistics_interval).
    consumers = _wait_for(
        observed.prometheus, "rabbitmq_detailed_queue_consumers", lambda by_queue: all(by_queue.get(q) == 1.0 for q in role_queues)
    )
    assert {sample.metric["vhost"] for sample in consumers} == {observed.vhost}  # restricted to the test's vhost
    assert _by(consumers, "queue")[topology.dead_letter_queue_name] == 0.0
    _wait_for(observed.prometheus, "rabbitmq_detailed_queue_messages_ready", lambda by_queue: all(by_queue.get(q) == 0.0 for q in role_queues))


def test_every_dashboard_query_returns_data_after_a_load(observed: Observed) -> None:
    empty = []
    for panel in load_dashboard().panels:
        for target in panel.targets:
            assert target.datasource == panel.datasource == {"type": "prometheus", "uid": "umi-prometheus"}
            expr = grafana_expr(target.expr, rate_interval=observed.window())
            values = [sample.number for sample in observed.prometheus.query(expr)]
            if not any(value == value and abs(value) != float("inf") for value in values):  # no finite sample
                empty.append(f"{panel.title} [{target.refId}]: {expr} -> {values}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_rule_evaluates_without_error(observed: Observed) -> None:
    rules = observed.prometheus.rules()
    assert {rule["name"] for rule in rules} == set(_alert_names())
    for rule in rules:
        assert rule["health"] == "ok", rule
        if rule["name"] not in ("UmiWorkersDeadLettering", "UmiMessagesWaitingNoConsumer"):
            assert rule["state"] == "inactive", rule  # a healthy load alerts nothing
    assert observed.prometheus.query(_on_workers(_alert_expr("UmiWorkersDeadLettering"))) == []
    # The vhost is the whole test session's: other modules leave jobs on queues of their own
    # prefixes that nobody consumes (that alert is right about them). This deployment's queues:
    waiting = observed.prometheus.query(_alert_expr("UmiMessagesWaitingNoConsumer"))
    prefix = observed.system.settings.queue_prefix + "."
    assert [sample.metric for sample in waiting if sample.metric["queue"].startswith(prefix)] == []


def _on_workers(expr: str) -> str:
    """``expr`` on the worker jobs' dead-letter counters only (see :data:`WORKER_JOBS`)."""
    return re.sub(r"umi_dead_letters_total(\{)?", lambda m: f"umi_dead_letters_total{{{WORKER_JOBS}" + ("," if m.group(1) else "}"), expr)


def _alert_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alert_expr(name: str) -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    (expr,) = [rule["expr"] for group in groups for rule in group["rules"] if rule.get("alert") == name]
    return str(expr)


def _wait_for(prometheus: PrometheusServer, expr: str, done: Callable[[dict[str, float]], bool], *, label: str = "queue", timeout_s: float = 60) -> list[Sample]:
    """Query ``expr`` until ``done`` holds for its values by ``label``; the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = prometheus.query(expr)
        if done(_by(samples, label)):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr} did not get there in {timeout_s}s: {_by(samples, label)}")
        time.sleep(0.5)


def test_the_alert_expressions_see_dead_letters_and_a_queue_nobody_consumes(observed: Observed) -> None:
    """Runs last in this module: it stops the tools worker."""
    system, prometheus = observed.system, observed.prometheus
    with confirmed_channel(system.settings.broker_url) as channel:
        publish(channel, system.topology, StepRole.TOOLS, b'{"not json', celery_headers(task_name(StepRole.TOOLS)))
    _wait_for(prometheus, _alert_expr("UmiDeadLettersRising"), lambda by_queue: system.topology.dead_letter_queue_name in by_queue)
    _wait_for(prometheus, _on_workers(_alert_expr("UmiWorkersDeadLettering")), lambda by_role: "tools" in by_role, label="role")

    system.kill_worker(StepRole.TOOLS)
    record = load_trajectories()[single_chain_indices()[0]]
    system.submit(record["conversations"][0]["value"], record["tools"])  # reaches the tools queue and waits there
    tools_queue = system.topology.queue_name(StepRole.TOOLS)
    _wait_for(prometheus, _alert_expr("UmiMessagesWaitingNoConsumer"), lambda by_queue: tools_queue in by_queue)
