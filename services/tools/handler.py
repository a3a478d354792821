"""The tools step: run the caller's tool call exactly once and store its observation."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import bindparam, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from services.tools.executor import ToolExecutor, build_executor
from services.tools.lease import LeaseKeeper, new_owner_id
from services.tools.models import ToolOutcome, idempotency_key
from shared import crud
from shared.db import session_scope
from shared.metrics import RetryKind, observe_retries, observe_tool_call
from shared.models import ToolCall, ToolCallStatus, utcnow
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft, open_step, store_step
from shared.prompts import CallerAction, parse_caller_output
from shared.roles import StepRole
from shared.schemas import StepJob

__all__ = ["LEASE_KEEPER", "TOOL_EXECUTOR", "handle_tools_job", "lease_keeper", "tool_executor"]

logger = logging.getLogger(__name__)

#: The name of this worker's tool executor among the runtime's resources.
TOOL_EXECUTOR = "tool_executor"
#: The name of this worker's lease keeper among the runtime's resources.
LEASE_KEEPER = "tool_call_lease_keeper"
#: The name of this worker's unfinished tool steps among the runtime's resources.
UNFINISHED_CALLS = "unfinished_tool_calls"
#: Unfinished tool steps remembered per process (an in-place retry finds its own; old ones are forgotten).
MAX_UNFINISHED_CALLS = 1024


@dataclass
class _UnfinishedCall:
    """A tool step this process began: its claim owner, and the outcome once the call ran."""

    owner: str = field(default_factory=new_owner_id)
    outcome: ToolOutcome | None = None
    #: A thread is working on it now (a second copy of the job in this process must not share it).
    active: bool = True


class _UnfinishedCalls:
    """Tool steps begun here whose step is not stored yet, so an in-place retry (the worker waiting
    out a database outage) resumes its own claim and reuses an outcome instead of calling the API again."""

    def __init__(self) -> None:
        self._calls: OrderedDict[tuple[uuid.UUID, int], _UnfinishedCall] = OrderedDict()
        self._lock = threading.Lock()

    def begin(self, job: StepJob) -> _UnfinishedCall:
        """This job's unfinished call to resume, or a new one (also for a copy running beside it)."""
        with self._lock:
            key = (job.task_id, job.step_index)
            call = self._calls.get(key)
            if call is not None and call.active:
                return _UnfinishedCall()  # another copy is on it: this one claims as a stranger
            if call is None:
                call = self._calls[key] = _UnfinishedCall()
            call.active = True
            self._calls.move_to_end(key)
            while len(self._calls) > MAX_UNFINISHED_CALLS:
                self._calls.popitem(last=False)
            return call

    def end(self, job: StepJob, call: _UnfinishedCall, *, finished: bool) -> None:
        """Forget a finished call; keep an unfinished one for the in-place retry."""
        with self._lock:
            call.active = False
            if finished and self._calls.get((job.task_id, job.step_index)) is call:
                del self._calls[(job.task_id, job.step_index)]


#: Built once: building the statement costs more CPU than running it (see ``shared/crud.py``).
_TOOL_CALL_TABLE = ToolCall.__table__  # type: ignore[attr-defined]
_COMPLETE_TOOL_CALL = (
    update(_TOOL_CALL_TABLE)
    .where(_TOOL_CALL_TABLE.c.task_id == bindparam("p_task_id"), _TOOL_CALL_TABLE.c.step_index == bindparam("p_step_index"))
    .values(
        status=ToolCallStatus.COMPLETED,
        # Bind names differ from the column names: SQLAlchemy reserves those for its own use.
        **{name: bindparam(f"p_{name}") for name in ("owner", "ok", "backend", "error", "latency_s", "finished_at")},
    )
)


def tool_executor(rt: Runtime) -> ToolExecutor:
    """This process's tool executor, built from the settings on first use."""
    return rt.resource(TOOL_EXECUTOR, lambda: build_executor(rt.settings))


def lease_keeper(rt: Runtime) -> LeaseKeeper:
    """This process's lease keeper (one renewal thread for all its running calls)."""
    return rt.resource(LEASE_KEEPER, lambda: LeaseKeeper(rt.engine, lease_s=rt.settings.tools_lease_s))


def handle_tools_job(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
    """Produce observation step ``job.step_index`` from the caller step before it.

    The call is claimed in the database before it runs, under a lease its owner keeps
    renewing, so it runs once while its worker lives. A copy of the job that finds a
    live lease waits in place (no requeue, so the queue's delivery limit is not spent)
    until the step is stored — then it is a duplicate and re-sends a missing follow-up —
    or the lease lapses because the owner died; then it takes the call over.
    ``redelivered`` is deliberately not trusted: the broker also redelivers the messages
    of a live worker that only lost its connection.
    """
    keeper = lease_keeper(rt)
    unfinished = rt.resource(UNFINISHED_CALLS, _UnfinishedCalls)
    begun = unfinished.begin(job)
    finished = False
    try:
        outcome = _claim_run_and_store(job, rt, keeper, begun)
        finished = True
        return outcome
    finally:
        unfinished.end(job, begun, finished=finished)  # unfinished: the in-place retry finds it again


def _claim_run_and_store(job: StepJob, rt: Runtime, keeper: LeaseKeeper, begun: _UnfinishedCall) -> JobOutcome:
    owner = begun.owner
    waited = False
    while True:
        context = open_step(job, rt)
        if isinstance(context, JobOutcome):
            return context
        call = parse_caller_output(context.steps[-1].output)
        try:
            with session_scope(rt.engine) as session:
                claim = crud.claim_tool_call(
                    session=session,
                    task_id=job.task_id,
                    step_index=job.step_index,
                    tool_name=call.action,
                    arguments=call.action_input,
                    owner=owner,
                    lease_s=keeper.lease_s,
                )
        except IntegrityError:
            continue  # another copy inserted the claim first: look at it
        if claim.runs_here:
            break
        if claim.state is crud.ClaimState.COMPLETED:
            return JobOutcome.DUPLICATE  # (open_step normally sees its step or the task's end first)
        logger.log(
            logging.DEBUG if waited else logging.INFO,
            "task %s step %d: tool call held by a live worker (lease %.1fs left); waiting for its step or the lease to lapse",
            job.task_id, job.step_index, claim.lease_left_s,
        )  # fmt: skip
        waited = True
        time.sleep(min(keeper.interval_s, claim.lease_left_s + 0.05, max(context.remaining_s, 0.0) + 0.05))

    if claim.state is crud.ClaimState.TAKEN_OVER:
        logger.warning("task %s step %d: took over a tool call whose owner's lease lapsed", job.task_id, job.step_index)
    if claim.state is crud.ClaimState.RESUMED and begun.outcome is not None:
        logger.info("task %s step %d: storing the outcome of the call made before the outage", job.task_id, job.step_index)
    with keeper.hold(claim.call):
        return _run_and_store(job, rt, context, call, begun)


def _run_and_store(job: StepJob, rt: Runtime, context: StepContext, call: CallerAction, begun: _UnfinishedCall) -> JobOutcome:
    owner = begun.owner
    if begun.outcome is None:
        # The history lets the mirror tell apart identical calls recorded with different observations.
        begun.outcome = tool_executor(rt).execute(
            call.action,
            call.action_input,
            context.tools,
            history=crud.steps_to_turns(context.steps),
            idempotency_key=idempotency_key(job.task_id, job.step_index),
            deadline=context.deadline,
        )
        observe_tool_call(begun.outcome.backend, begun.outcome.latency_s, ok=begun.outcome.ok)
        observe_retries(StepRole.TOOLS.value, RetryKind.TOOL, begun.outcome.attempts - 1)
    outcome = begun.outcome

    def complete_tool_call(session: Session) -> None:
        session.execute(
            _COMPLETE_TOOL_CALL,
            {
                "p_task_id": job.task_id,
                "p_step_index": job.step_index,
                "p_owner": owner,  # who produced the stored outcome, even if its lease had lapsed meanwhile
                "p_ok": outcome.ok,
                "p_backend": outcome.backend,
                "p_error": outcome.error,
                "p_latency_s": outcome.latency_s,
                "p_finished_at": utcnow(),
            },
        )

    draft = StepDraft(
        role=StepRole.TOOLS,
        output=outcome.observation,
        tool_name=call.action,
        latency_s=outcome.latency_s,
        # The call returned just now (or before an outage this copy waited out) and took latency_s.
        started_at=utcnow() - timedelta(seconds=outcome.latency_s or 0.0),
    )
    # A task cancelled (or past its deadline) meanwhile: store_step completes the claim, stores no step, sends nothing.
    return store_step(job, draft, rt, also=complete_tool_call)
