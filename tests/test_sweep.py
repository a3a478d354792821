"""The deadline sweep runs once per deployment: two gateways on one PostgreSQL database.

Each test gets its own database (advisory locks are per database), so no other
test's gateway can hold the sweep lock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from fastapi import FastAPI
from sqlmodel import Session

from services.gateway.app import create_app
from services.gateway.sweep import SWEEP_LOCK_KEY, DeadlineSweeper
from shared import crud
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.models import utcnow
from shared.schemas import TaskCreate
from shared.settings import load_settings
from tests.conftest import fresh_postgres_database
from tests.pipeline_helpers import CollectingDispatcher

TOOL = {"Name": "ping_for_demo", "function": "ping", "input": {}}


@pytest.fixture
def database_url() -> Iterator[str]:
    with fresh_postgres_database("umi_sweep") as url:
        yield url


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def sweeper(app: FastAPI) -> DeadlineSweeper:
    return app.state.sweeper


def sweep_lock_holders(url: str) -> int:
    """How many sessions hold the sweep's advisory lock (pg_locks splits a bigint key in two halves)."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = %s AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            (SWEEP_LOCK_KEY,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def overdue_task(url: str) -> uuid.UUID:
    """A task whose deadline passed long ago and whose job never comes."""
    with session_scope(get_engine(url)) as session:
        task = crud.create_task(session=session, task_in=TaskCreate(query="q", tools=[TOOL]), max_steps=12, timeout_s=60,
                                constrained=True)
        task.deadline_at = utcnow() - timedelta(seconds=60)
        return task.id


def task_status(url: str, task_id: uuid.UUID) -> str:
    with Session(get_engine(url)) as session:
        task = crud.get_task(session=session, task_id=task_id)
        assert task is not None
        return str(task.status)


def test_one_gateway_sweeps_and_another_takes_over_when_it_stops(database_url: str) -> None:
    settings = load_settings(database_url=database_url, sweep_interval_s=0.1)
    apps = [create_app(settings, dispatcher=CollectingDispatcher()) for _ in range(2)]
    servers = [ServerThread(app).start() for app in apps]
    try:
        wait_for(lambda: sum(sweeper(app).rounds for app in apps) >= 10, "the gateways swept ten rounds")
        leading = [i for i, app in enumerate(apps) if sweeper(app).rounds > 0]
        assert len(leading) == 1, [sweeper(app).rounds for app in apps]
        leader, follower = apps[leading[0]], apps[1 - leading[0]]
        assert sweeper(leader).leads and not sweeper(follower).leads
        assert sweep_lock_holders(database_url) == 1
        task_id = overdue_task(database_url)
        wait_for(lambda: task_status(database_url, task_id) == "failed", "the leader ended the overdue task")
        assert sweeper(follower).rounds == 0  # it tried every round, and never swept

        servers[leading[0]].stop()  # the leading replica goes away, and its lock with it
        task_id = overdue_task(database_url)
        wait_for(lambda: sweeper(follower).rounds > 0, "the other gateway took over the sweep")
        wait_for(lambda: task_status(database_url, task_id) == "failed", "the new leader ended the overdue task")
        assert sweep_lock_holders(database_url) == 1
    finally:
        for server in servers:
            server.stop()


def test_a_leader_whose_lock_session_dies_gives_way_and_the_sweep_goes_on(database_url: str) -> None:
    settings = load_settings(database_url=database_url, sweep_interval_s=0.1)
    apps = [create_app(settings, dispatcher=CollectingDispatcher()) for _ in range(2)]
    servers = [ServerThread(app).start() for app in apps]
    try:
        wait_for(lambda: sweep_lock_holders(database_url) == 1, "one gateway took the sweep lock")
        with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND ((classid::bigint << 32) | objid::bigint) = %s AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())",  # not other test runs' gateways
                (SWEEP_LOCK_KEY,),
            ).fetchall()
        assert killed == [(True,)]
        task_id = overdue_task(database_url)
        wait_for(lambda: task_status(database_url, task_id) == "failed", "a gateway swept again after the lock died")
        assert sweep_lock_holders(database_url) == 1
        wait_for(lambda: sum(sweeper(app).leads for app in apps) == 1, "exactly one gateway leads")
    finally:
        for server in servers:
            server.stop()
