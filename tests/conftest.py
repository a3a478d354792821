"""Shared fixtures. Data paths point into the repo, so a fresh clone has everything it needs.

Tests that need RabbitMQ or PostgreSQL use the real servers on this machine
(``.ci/run`` starts them when they are down) and fail, never skip, when they
cannot reach them. Each test session gets its own RabbitMQ vhost and its own
PostgreSQL database, removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shared.example_data import BUNDLED_TRAJECTORIES as TRAJECTORIES
from shared.example_data import load_trajectories, single_chain_indices

__all__ = ["REPO", "TRAIN_DIR", "TRAIN_FILES", "TRAJECTORIES", "UMI", "load_trajectories", "single_chain_indices"]

REPO = Path(__file__).resolve().parent.parent
TRAIN_DIR = REPO / "tests" / "data" / "toolbench-train-example"
#: The shipped GLPFT training pairs ``{input, target}``: the replay data of the end-to-end tests.
#: They were built by α-UMi's own preprocessing, not by ``shared.prompts``, so a prompt that is
#: wrong by one byte finds no recording and the test fails (an independent oracle).
TRAIN_FILES = [TRAIN_DIR / f"train_{role}.json" for role in ("planner", "caller", "summarizer")]
UMI = REPO / ".venv" / "bin" / "umi"

# The pipeline's tests run as the default tenant (their processes inherit this); the tests of
# tenants, keys and limits turn authentication on in the settings they build.
os.environ.setdefault("UMI_AUTH", "off")

RABBITMQ_HOST = os.environ.get("UMI_TEST_RABBITMQ_HOST", "127.0.0.1:5672")
POSTGRES_ADMIN_URL = os.environ.get("UMI_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _rabbitmqctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed (is RabbitMQ running?): {result.stderr.strip()}")


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A fresh vhost on the local RabbitMQ for this test session."""
    vhost = f"umi-test-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{RABBITMQ_HOST}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost)


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "umi_test") -> Iterator[str]:
    """A new, migrated PostgreSQL database (its SQLAlchemy URL), dropped afterwards."""
    from shared.db import get_engine, upgrade_schema

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"cannot reach PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    upgrade_schema(url)
    yield url
    get_engine(url).dispose()
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    """One SGLang simulator (all roles) replaying the shipped training pairs (:data:`TRAIN_FILES`)."""
    from services.simulator import SimulatorConfig, create_app
    from shared.asgi import ServerThread

    with ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES))) as server:
        yield server.url
