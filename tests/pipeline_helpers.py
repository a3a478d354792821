"""Helpers for calling the role handlers directly (SQLite, the simulator over HTTP, jobs collected)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlmodel import Session

from services.caller.handler import handle_caller_job
from services.planner.handler import handle_planner_job
from services.summarizer.handler import handle_summarizer_job
from services.tools.handler import handle_tools_job
from shared import crud
from shared.db import session_scope, upgrade_schema
from shared.models import Step
from shared.pipeline import JobOutcome, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.settings import Settings, load_settings
from tests.conftest import TRAJECTORIES

HANDLERS = {
    StepRole.PLANNER: handle_planner_job,
    StepRole.CALLER: handle_caller_job,
    StepRole.TOOLS: handle_tools_job,
    StepRole.SUMMARIZER: handle_summarizer_job,
}


class CollectingDispatcher:
    """Keeps published jobs in order so the test can run them."""

    def __init__(self) -> None:
        self.jobs: list[StepJob] = []

    def dispatch(self, job: StepJob) -> None:
        self.jobs.append(job)


def sqlite_settings(tmp_path: Path, llm_url: str, **overrides: object) -> Settings:
    """Migrated SQLite in ``tmp_path``, every LLM role on ``llm_url``, the bundled mirror."""
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/umi.db",
        planner_llm_url=llm_url,
        caller_llm_url=llm_url,
        summarizer_llm_url=llm_url,
        tools_mirror=TRAJECTORIES,
        **overrides,
    )
    upgrade_schema(settings.database_url)
    return settings


def create_task(rt: Runtime, record: dict[str, Any]) -> uuid.UUID:
    """Store a task for a recorded trajectory's query and tools."""
    with session_scope(rt.engine) as session:
        task = crud.create_task(
            session=session,
            task_in=TaskCreate(query=record["conversations"][0]["value"], tools=record["tools"]),
            max_steps=12,
            timeout_s=60,
            constrained=True,
        )
        return task.id


def stored_steps(rt: Runtime, task_id: uuid.UUID) -> list[Step]:
    with Session(rt.engine) as session:
        return crud.list_steps(session=session, task_id=task_id)


def run_job(rt: Runtime, job: StepJob, *, redelivered: bool = False) -> JobOutcome:
    return HANDLERS[job.role](job, rt, redelivered=redelivered)


def run_to_end(rt: Runtime, dispatcher: CollectingDispatcher, task_id: uuid.UUID) -> None:
    """Run the task's jobs one after another, as the queues would, until none follows."""
    job = StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)
    while True:
        assert run_job(rt, job) is JobOutcome.STORED
        if not dispatcher.jobs or dispatcher.jobs[-1].step_index == job.step_index:
            return
        job = dispatcher.jobs[-1]
