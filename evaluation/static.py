"""``umi eval static``: the α-UMi static (step-level) evaluation, run through the live system.

Every planner decision point of a test file (an assistant turn with a ``Next:``
marker) becomes one ``static_step`` task: the recorded history before it is
given as the task's history, the planner decides, and — by its own decision —
the caller or the summarizer takes the one step that follows. That is the
α-UMi static protocol with the training-consistent history (the dispatch turn is
``assistant:``; one released script writes ``planner:``, see docs/evaluation.md).

The tasks go through the configured system: over the broker to the role
services when ``UMI_BROKER_URL`` is set, else through in-process workers (the
embedded default, with the SGLang simulator replaying the test file itself
unless ``UMI_*_LLM_URL`` point at real servers).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from evaluation.metrics import StaticMetrics, format_prediction, is_decision_point, reference_for
from shared import crud
from shared.dispatch import Dispatcher
from shared.lifecycle import TERMINAL_STATUSES
from shared.models import Task, TaskMode
from shared.prompts import Speaker, ToolDoc, Turn
from shared.roles import StepRole
from shared.schemas import RecordedTaskCreate
from shared.settings import Settings
from shared.tasks import submit_task

__all__ = [
    "DecisionPoint",
    "DecisionPoints",
    "SkippedPoint",
    "StaticEvalOptions",
    "decision_points",
    "run_static_eval",
    "write_results",
]


class DecisionPoint(BaseModel):
    """One planner decision of a recorded trajectory, with what the recording did there."""

    record_index: int
    turn_index: int
    tools: list[ToolDoc]
    instruction: str
    history: list[Turn]
    reference: str


class StaticEvalOptions(BaseModel):
    """Generation settings of an evaluation run (α-UMi defaults; ``greedy`` for reproducible runs)."""

    temperature: float = Field(default=0.5, ge=0)
    max_new_tokens: int = Field(default=512, ge=1)
    greedy: bool = False
    constrained: bool = False
    concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=600, gt=0)


class SkippedPoint(BaseModel):
    """A record (or one decision point of it) the evaluation could not use, and why."""

    record_index: int
    turn_index: int | None = None
    reason: str


class DecisionPoints(BaseModel):
    """The decision points of a test file, and what had to be left out (reported, never fatal)."""

    points: list[DecisionPoint]
    skipped: list[SkippedPoint] = Field(default_factory=list)


def decision_points(records: Sequence[Any], *, limit: int | None = None) -> DecisionPoints:
    """The decision points of α-UMi records ``{"tools", "instruction", "conversations"}``, in order.

    Tool lists and histories are taken as recorded (two tools of one ``Name``, turns after a
    ``conclusion``), as the reference does. A record that cannot be read at all, or a
    decision point no planner can act on, is reported in :attr:`DecisionPoints.skipped`
    with its index and the reason; one bad record never stops the rest.
    """
    result = DecisionPoints(points=[])
    for record_index, record in enumerate(records):
        try:
            tools, turns, instruction = _read_record(record)
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            result.skipped.append(SkippedPoint(record_index=record_index, reason=_reason(exc)))
            continue
        for turn_index, turn in enumerate(turns):
            if turn.speaker is not Speaker.ASSISTANT or not is_decision_point(turn.value):
                continue
            following = turns[turn_index + 1] if turn_index + 1 < len(turns) else None
            point = DecisionPoint(
                record_index=record_index,
                turn_index=turn_index,
                tools=tools,
                instruction=instruction,
                history=turns[:turn_index],
                reference=reference_for(turn.value, following.model_dump(by_alias=True) if following else None),
            )
            try:
                _task_for(point, StaticEvalOptions())
            except ValueError as exc:
                result.skipped.append(SkippedPoint(record_index=record_index, turn_index=turn_index, reason=_reason(exc)))
                continue
            result.points.append(point)
            if limit is not None and len(result.points) >= limit:
                return result
    return result


def _read_record(record: Any) -> tuple[list[ToolDoc], list[Turn], str]:
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a JSON object, not {type(record).__name__}")
    tools = [ToolDoc.model_validate(tool) for tool in record["tools"]]
    turns = [Turn.model_validate(turn) for turn in record["conversations"]]
    if not turns or turns[0].speaker is not Speaker.USER:
        raise ValueError("the conversation must start with a user turn")
    return tools, turns, str(record.get("instruction", turns[0].value))


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        return f"{where}: {first['msg']}"
    return str(exc)


def _task_for(point: DecisionPoint, options: StaticEvalOptions) -> RecordedTaskCreate:
    return RecordedTaskCreate(
        query=point.history[0].value,
        tools=point.tools,
        history=point.history[1:],
        mode=TaskMode.STATIC_STEP,
        max_steps=100,
        timeout_s=options.timeout_s,
        constrained=options.constrained,
        temperature=0.0 if options.greedy else options.temperature,
        max_new_tokens=options.max_new_tokens,
    )


def run_static_eval(
    points: Sequence[DecisionPoint],
    *,
    engine: Engine,
    dispatcher: Dispatcher,
    settings: Settings,
    options: StaticEvalOptions,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every decision point as a task, ``options.concurrency`` at a time; α-UMi prediction records."""
    results: dict[int, dict[str, Any]] = {}
    in_flight: dict[uuid.UUID, int] = {}
    next_point = 0
    while len(results) < len(points):
        while next_point < len(points) and len(in_flight) < options.concurrency:
            task = submit_task(engine=engine, dispatcher=dispatcher, settings=settings, task_in=_task_for(points[next_point], options))
            in_flight[task.id] = next_point
            next_point += 1
        for task_id in _finished(engine, list(in_flight)):
            index = in_flight.pop(task_id)
            results[index] = _prediction_record(engine, points[index], task_id)
            if progress is not None:
                progress(len(results), len(points))
        time.sleep(0.02)
    return [results[i] for i in range(len(points))]


def _finished(engine: Engine, task_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    if not task_ids:
        return []
    with Session(engine) as session:
        rows = session.exec(select(Task.id, Task.status).where(col(Task.id).in_(task_ids))).all()
    return [task_id for task_id, status in rows if status in TERMINAL_STATUSES]


def _prediction_record(engine: Engine, point: DecisionPoint, task_id: uuid.UUID) -> dict[str, Any]:
    with Session(engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
        steps = crud.list_steps(session=session, task_id=task_id)
    assert task is not None
    new_steps = steps[len(point.history) :]
    planner = new_steps[0] if new_steps and new_steps[0].role == StepRole.PLANNER else None
    follower = new_steps[1] if len(new_steps) > 1 else None
    if planner is None:
        prediction = "none"
    elif follower is None:
        prediction = format_prediction(planner.output, None, None)
    else:
        prediction = format_prediction(planner.output, StepRole(follower.role).value, follower.output)
    return {
        "tools": [tool.model_dump() for tool in point.tools],
        "instruction": point.instruction,
        "history": [turn.model_dump(by_alias=True) for turn in point.history],
        "reference": point.reference,
        "predictions": prediction,
        "record_index": point.record_index,
        "turn_index": point.turn_index,
        "task_id": str(task_id),
        "status": task.status,
        "error": task.error,
        "latency_s": sum(step.latency_s or 0.0 for step in new_steps),
    }


def write_results(
    out_dir: Path, predictions: list[dict[str, Any]], metrics: StaticMetrics, skipped: Sequence[SkippedPoint] = ()
) -> None:
    """``predictions.json`` (α-UMi format plus our fields), ``metrics.json`` and ``skipped.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=2, ensure_ascii=False))
    (out_dir / "metrics.json").write_text(json.dumps(metrics.model_dump(), indent=2))
    (out_dir / "skipped.json").write_text(json.dumps([point.model_dump() for point in skipped], indent=2, ensure_ascii=False))
