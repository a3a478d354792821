"""Stored tasks as α-UMi trajectory records (``{"tools", "instruction", "conversations"}``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared import crud
from shared.lifecycle import TaskStatus
from shared.models import Task, TaskMode

__all__ = ["stored_trajectories", "task_trajectory"]

#: Finished agent runs: an answer or a give-up. Failed and cancelled runs are not trajectories.
EXPORTED_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.GAVE_UP)


def task_trajectory(session: Session, task: Task) -> dict[str, Any]:
    """One task's trajectory in the α-UMi data format."""
    turns = crud.steps_to_turns(crud.list_steps(session=session, task_id=task.id))
    return {
        "tools": task.tools,
        "instruction": task.query,
        "conversations": [turn.model_dump(by_alias=True, mode="json") for turn in turns],
    }


def stored_trajectories(engine: Engine) -> list[dict[str, Any]]:
    """Every finished agent-mode task (succeeded or gave up), oldest first."""
    with Session(engine) as session:
        tasks = session.exec(
            select(Task)
            .where(col(Task.status).in_(EXPORTED_STATUSES), Task.mode == TaskMode.AGENT)
            .order_by(col(Task.created_at))
        ).all()
        return [task_trajectory(session, task) for task in tasks]
