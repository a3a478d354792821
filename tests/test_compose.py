"""compose.yaml is validated here (Docker cannot run on the development machines).

Against the Compose Specification's JSON schema (the copy check-jsonschema ships), for
its wiring in each profile (every URL names a service that runs, every role has a
consumer that waits for its LLM server, every metrics port is scraped), and with
``promtool check config`` on the Prometheus configuration it mounts.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from packaging.requirements import Requirement
from packaging.version import Version

from shared.db import POOL_MAX_OVERFLOW, POOL_SIZE
from shared.roles import LLMRole
from shared.settings import Settings
from shared.topology import QUEUE_ROLES
from tests.conftest import REPO

PROFILES = ("gpu", "sim")
#: Where the worker metrics are served in compose (the UMI_METRICS_PORT contract).
METRICS_PORT = 9100


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _prometheus() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())


def _active(profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile <profile> up` starts."""
    return {name: s for name, s in _compose()["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def _hostnames(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each DNS name on the compose network → the services answering it (name and aliases)."""
    names: dict[str, list[str]] = {}
    for name, service in services.items():
        aliases = ((service.get("networks") or {}).get("default") or {}).get("aliases", [])
        for host in [name, *aliases]:
            names.setdefault(host, []).append(name)
    return names


def _seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``11m``, ``600s``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def _scrape_targets(job: dict[str, Any]) -> set[tuple[str, int]]:
    targets = {tuple(t.rsplit(":", 1)) for c in job.get("static_configs", []) for t in c["targets"]}
    targets |= {(name, c["port"]) for c in job.get("dns_sd_configs", []) for name in c["names"]}
    return {(host, int(port)) for host, port in targets}


def test_compose_yaml_follows_the_compose_specification() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = Draft202012Validator(json.loads(schema_file.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors


def test_the_prometheus_configuration_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install -y prometheus (a test prerequisite, see README)"
    result = subprocess.run([promtool, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_every_url_names_a_service_that_runs_in_the_profile(profile: str) -> None:
    services = _active(profile)
    hosts = _hostnames(services)
    checked = 0
    for name, service in services.items():
        for variable, value in (service.get("environment") or {}).items():
            if not (variable.startswith("UMI_") and variable.endswith("_URL")) or str(value).startswith("${"):
                continue
            host = urlsplit(value).hostname
            assert len(hosts.get(host, [])) == 1, f"{name}: {variable}={value}: {host!r} is served by {hosts.get(host)} in {profile}"
            checked += 1
    assert checked >= 5 * len(QUEUE_ROLES)  # broker, database, three LLM servers, for every role at least


@pytest.mark.parametrize("profile", PROFILES)
def test_every_role_has_a_consumer_that_starts_once_its_llm_server_is_healthy(profile: str) -> None:
    services = _active(profile)
    hosts = _hostnames(services)
    for role in QUEUE_ROLES:
        service = services[role.value]
        assert service["command"][:3] == ["umi", "worker", role.value]
        depends = service["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    for role in LLMRole:
        (server,) = hosts[urlsplit(services[role.value]["environment"][f"UMI_{role.value.upper()}_LLM_URL"]).hostname]
        assert services[role.value]["depends_on"][server]["condition"] == "service_healthy", (profile, role)
        assert "/health" in " ".join(services[server]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["umi", "db", "upgrade"]


def test_roles_scale_independently_and_stop_after_their_longest_step() -> None:
    services = _compose()["services"]
    longest_step = Settings().task_timeout_s  # LLM and tool calls are cut at the task's deadline
    for role in QUEUE_ROLES:
        service = services[role.value]
        assert "container_name" not in service, "a fixed container name prevents --scale"
        assert "ports" not in service, "a fixed host port prevents --scale"
        assert service["deploy"]["replicas"] >= 1
        assert _seconds(service["stop_grace_period"]) > longest_step
        assert service["environment"]["UMI_METRICS_PORT"] == str(METRICS_PORT)


def test_postgres_accepts_every_connection_the_replicas_can_open() -> None:
    services = _compose()["services"]
    per_process_cap = POOL_SIZE + POOL_MAX_OVERFLOW
    needed = 1 + per_process_cap + 3  # migrate, the gateway's pool, PostgreSQL's reserved superuser slots
    for role in QUEUE_ROLES:
        command = services[role.value]["command"]
        concurrency = int(command[command.index("--concurrency") + 1])
        needed += services[role.value]["deploy"]["replicas"] * min(concurrency + 2, per_process_cap)
    (setting,) = [arg for arg in services["postgres"]["command"] if arg.startswith("max_connections=")]
    assert int(setting.split("=")[1]) >= needed


def test_every_metrics_port_is_scraped_by_prometheus() -> None:
    services = _compose()["services"]
    jobs = {job["job_name"]: _scrape_targets(job) for job in _prometheus()["scrape_configs"]}
    for role in QUEUE_ROLES:  # one A record per replica: --scale is scraped per replica
        assert (role.value, METRICS_PORT) in jobs[f"umi-{role.value}"]
    gateway = services["gateway"]["command"]
    assert ("gateway", int(gateway[gateway.index("--port") + 1])) in jobs["umi-gateway"]
    assert services["ingress"]["command"] == ["umi", "worker", "ingress"]
    assert services["ingress"]["environment"]["UMI_METRICS_PORT"] == str(METRICS_PORT)
    assert ("ingress", METRICS_PORT) in jobs["umi-ingress"]
    for role in LLMRole:
        server = f"sglang-{role.value}"
        assert "--enable-metrics" in services[server]["command"]
        assert (server, 30000) in jobs[server]
    assert ("rabbitmq", 15692) in jobs["rabbitmq"]
    assert "rabbitmq_prometheus" in (REPO / "deploy/rabbitmq/enabled_plugins").read_text()


def test_mounted_configuration_exists_where_the_containers_read_it() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which the repo lacks"
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    providers = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/umi.yml").read_text())["providers"]
    assert {p["options"]["path"] for p in providers} == {grafana_mounts["./deploy/grafana/dashboards"]}
    assert "/etc/prometheus/prometheus.yml" in " ".join(services["prometheus"]["command"])


def test_every_llm_role_points_at_its_own_sglang_server_on_its_own_gpu() -> None:
    services = _compose()["services"]
    gpus = set()
    for role in LLMRole:
        server = services[f"sglang-{role.value}"]
        command = server["command"]
        assert f"${{UMI_{role.value.upper()}_MODEL:-shenwzh3/alpha-umi-{role.value}-7b}}" in command  # configurable
        assert "--dtype bfloat16" in command
        assert re.search(r"--grammar-backend (xgrammar|llguidance)\b", command), command  # compiles the caller's EBNF
        assert _seconds(server["healthcheck"]["start_period"]) >= 600  # a model download and load
        (device,) = server["deploy"]["resources"]["reservations"]["devices"]
        gpus.update(device["device_ids"])
    assert len(gpus) == 3


def test_images_are_pinned_and_rabbitmq_is_a_version_the_required_celery_supports() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        image = service.get("image")
        assert image and ":" in image and not image.endswith(":latest"), f"{name} must pin its image"
    match = re.fullmatch(r"rabbitmq:(4)\.(\d+)(\.\d+)?-management", services["rabbitmq"]["image"])
    assert match, services["rabbitmq"]["image"]
    if int(match[2]) >= 3:  # 4.3 refuses transient non-exclusive queues: Celery and kombu >= 5.7 declare none
        requirements = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
        for package in ("celery", "kombu"):
            (floor,) = [s.version for r in requirements if r.name == package for s in r.specifier if s.operator == ">="]
            assert Version(floor) >= Version("5.7"), f"pyproject.toml allows {package} {floor}, which RabbitMQ 4.3 breaks"
            assert Version(version(package)) >= Version("5.7")


def test_compose_defaults_to_the_gpu_profile_and_sim_replaces_it() -> None:
    dotenv = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines() if line and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "gpu"
    gpu, sim = _active("gpu"), _active("sim")
    assert not any(name.startswith("sim-") for name in gpu) and not any(name.startswith("sglang-") for name in sim)
    assert "tools" in sim and Path(REPO / "shared/data/raw_data_stage_2.json").is_file()  # the mirror the sim profile names
