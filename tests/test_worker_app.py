"""Worker apps built in one process (``umi up``, a test that starts a second system) each run their own step.

Two things used to route a step to another app's function, with that app's runtime and settings:

* a step task registered as Celery's default ``shared=True`` is added to every app finalized
  afterwards, and a name resolves to the first callable registered under it;
* a worker run in a thread (:func:`~shared.worker.start_worker_thread`) traces each task in the
  pool thread's current app, else the process's default app — not its own.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from celery.exceptions import DuplicateTaskNameWarning

from shared.dispatch import CeleryDispatcher
from shared.pipeline import JobOutcome, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob
from shared.settings import Settings, load_settings
from shared.topology import task_name
from shared.worker import create_worker_app, start_worker_thread

NAMES = ("first", "second")
ROLE = StepRole.CALLER


def _handler(name: str, ran: list[tuple[str, Runtime]], done: threading.Event) -> Callable[..., JobOutcome]:
    def handle(job: StepJob, rt: Runtime, *, redelivered: bool) -> JobOutcome:
        ran.append((name, rt))
        if len(ran) == len(NAMES):
            done.set()
        return JobOutcome.STORED

    return handle


def _settings(tmp_path: Path) -> dict[str, Settings]:
    return {
        name: load_settings(broker_url="memory://localhost/", database_url=f"sqlite:///{tmp_path}/{name}.db", queue_prefix=f"umi{name}")
        for name in NAMES
    }


def _job() -> StepJob:
    return StepJob(task_id=uuid.uuid4(), step_index=1, role=ROLE)


def test_two_worker_apps_of_one_role_in_one_process_each_run_their_own_step(tmp_path: Path) -> None:
    ran: list[tuple[str, Runtime]] = []
    done = threading.Event()
    settings = _settings(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateTaskNameWarning)
        # Both built before either is finalized, as umi up builds its roles; then each runs a job eagerly.
        apps = {name: create_worker_app(ROLE, _handler(name, ran, done), settings[name]) for name in NAMES}
        for name in reversed(NAMES):
            assert apps[name].tasks[task_name(ROLE)].apply(args=[_job().model_dump(mode="json")]).result == JobOutcome.STORED.value

    assert [(name, rt.settings) for name, rt in ran] == [(name, settings[name]) for name in reversed(NAMES)]
    assert all(rt.dispatcher.app is apps[name] for name, rt in ran)  # type: ignore[attr-defined]


def test_two_worker_threads_of_one_role_in_one_process_each_run_their_own_step(tmp_path: Path) -> None:
    ran: list[tuple[str, Runtime]] = []
    done = threading.Event()
    settings = _settings(tmp_path)
    apps = {name: create_worker_app(ROLE, _handler(name, ran, done), settings[name]) for name in NAMES}
    stops = [start_worker_thread(apps[name], ROLE, settings[name], concurrency=1) for name in NAMES]
    try:
        for name in NAMES:  # one job on each app's own queue (the in-process broker is shared)
            CeleryDispatcher(apps[name]).dispatch(_job())
        assert done.wait(30), f"only {[name for name, _ in ran]} ran"
    finally:
        for stop in reversed(stops):
            stop()

    assert sorted((name, rt.settings.queue_prefix) for name, rt in ran) == [(name, settings[name].queue_prefix) for name in NAMES]
    assert all(rt.dispatcher.app is apps[name] for name, rt in ran)  # type: ignore[attr-defined]
