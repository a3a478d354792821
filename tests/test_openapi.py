"""The OpenAPI document: checked in, in step with the app, complete, and true under fuzzing.

* ``docs/openapi.json`` is what ``umi openapi`` writes for today's app (the test says how to regenerate it).
* Every route declares the statuses its kind can answer (401/429 behind a key, 404 by id, 413/422 with a body).
* schemathesis fuzzes the checked-in document against the real gateway (PostgreSQL, RabbitMQ through
  Celery; no workers, so tasks stay queued), with auth off and with a valid key: no 5xx, no status or
  body the document does not declare.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from services.gateway.app import create_app
from services.gateway.auth import current_tenant
from services.gateway.openapi import OPENAPI_PATH, REGENERATE_COMMAND, openapi_document
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.settings import Settings, load_settings
from shared.tenants import create_api_key
from tests.conftest import REPO, UMI


def _app_document() -> str:
    return openapi_document(create_app(load_settings()))


def test_the_checked_in_document_is_the_apps() -> None:
    checked_in = (REPO / OPENAPI_PATH).read_text(encoding="utf-8")
    assert checked_in == _app_document(), f"{OPENAPI_PATH} is out of date: run `{REGENERATE_COMMAND}` and commit it"


def test_umi_openapi_writes_the_document(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMI_")}
    out = tmp_path / "openapi.json"
    subprocess.run([str(UMI), "openapi", "--out", str(out)], env=env, check=True, timeout=60)
    printed = subprocess.run([str(UMI), "openapi"], env=env, check=True, timeout=60, capture_output=True, text=True).stdout
    assert out.read_text(encoding="utf-8") == printed == _app_document()
    assert printed.endswith("}\n")


def _routes() -> list[APIRoute]:
    return [route for route in create_app(load_settings()).routes if isinstance(route, APIRoute) and route.include_in_schema]


def _needs_a_tenant(route: APIRoute) -> bool:
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if dependency.call is current_tenant:
            return True
        pending.extend(dependency.dependencies)
    return False


@pytest.mark.parametrize("route", _routes(), ids=lambda route: f"{sorted(route.methods)[0]} {route.path}")
def test_every_route_declares_the_errors_its_kind_can_answer(route: APIRoute) -> None:
    declared = {str(code) for code in route.responses}
    expected = set()
    if _needs_a_tenant(route):
        expected |= {"401", "429"}
    if route.dependant.path_params:
        expected |= {"404"}
    if route.body_field is not None:
        expected |= {"413"}
    assert expected <= declared, f"{route.path} does not declare {sorted(expected - declared)}"
    if route.body_field is not None or route.dependant.path_params or route.dependant.query_params:
        document = create_app(load_settings()).openapi()
        operation = document["paths"][route.path][sorted(route.methods)[0].lower()]
        assert "422" in operation["responses"]


# The fuzz: the checked-in document (the one clients read), every operation, bounded.
SCHEMA = schemathesis.openapi.from_path(REPO / OPENAPI_PATH)
SCHEMA.config.generation.update(max_examples=30, no_shrink=True, deterministic=True)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _gateway_settings(postgres_url: str, rabbitmq_url: str, *, auth: bool) -> Settings:
    # A rate high enough that the fuzz explores the routes rather than the 429 (tested elsewhere).
    return load_settings(database_url=postgres_url, broker_url=rabbitmq_url, auth=auth, tenant_rate_per_s=10_000, tenant_burst=10_000)


@pytest.fixture(scope="module", params=[False, True], ids=["auth-off", "auth-on"])
def fuzzed_gateway(request: pytest.FixtureRequest, postgres_url: str, rabbitmq_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    auth: bool = request.param
    headers: dict[str, str] = {}
    if auth:
        with session_scope(get_engine(postgres_url)) as session:
            headers = {"Authorization": f"Bearer {create_api_key(session=session, tenant_name='fuzz').key}"}
    with ServerThread(create_app(_gateway_settings(postgres_url, rabbitmq_url, auth=auth))) as server:
        yield server.url, headers


@SCHEMA.parametrize()
@settings(database=None, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_fuzzing_the_document_finds_no_server_error_and_nothing_undeclared(case: schemathesis.Case, fuzzed_gateway: tuple[str, dict[str, str]]) -> None:
    base_url, headers = fuzzed_gateway
    case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)
