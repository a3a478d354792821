"""compose.yaml is validated here (Docker cannot run on the development machines)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from shared.topology import QUEUE_ROLES
from tests.conftest import REPO


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_each_role_is_its_own_service_consuming_its_own_queue() -> None:
    services = _compose()["services"]
    for role in QUEUE_ROLES:
        command = services[role.value]["command"]
        assert command[:3] == ["umi", "worker", role.value]
        assert "container_name" not in services[role.value], "a fixed container name prevents --scale"
        assert "ports" not in services[role.value], "a fixed host port prevents --scale"


def test_every_llm_role_points_at_its_own_sglang_server_on_its_own_gpu() -> None:
    compose = _compose()
    services = compose["services"]
    env = services["planner"]["environment"]
    gpus = set()
    for role in ("planner", "caller", "summarizer"):
        server = f"sglang-{role}"
        assert env[f"UMI_{role.upper()}_LLM_URL"] == f"http://{server}:30000"
        assert f"shenwzh3/alpha-umi-{role}-7b" in services[server]["command"]
        (device,) = services[server]["deploy"]["resources"]["reservations"]["devices"]
        gpus.update(device["device_ids"])
    assert len(gpus) == 3


def test_images_are_pinned_and_rabbitmq_is_a_4x_that_celery_supports() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        image = service.get("image")
        assert image and ":" in image and not image.endswith(":latest"), f"{name} must pin its image"
    assert re.fullmatch(r"rabbitmq:4\.[0-2](\.\d+)?-management", services["rabbitmq"]["image"])


def test_workers_wait_for_the_broker_and_the_migrations() -> None:
    services = _compose()["services"]
    for role in QUEUE_ROLES:
        depends = services[role.value]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["umi", "db", "upgrade"]


def test_the_sglang_servers_run_a_grammar_backend_that_compiles_the_callers_ebnf() -> None:
    services = _compose()["services"]
    for role in ("planner", "caller", "summarizer"):
        command = services[f"sglang-{role}"]["command"]
        assert re.search(r"--grammar-backend (xgrammar|llguidance)\b", command), f"sglang-{role}: {command}"
