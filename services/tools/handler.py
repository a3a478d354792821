"""The tools step: run the caller's tool call exactly once and store its observation."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from services.tools.executor import ToolExecutor, build_executor
from shared import crud
from shared.db import session_scope
from shared.models import ToolCall, ToolCallStatus, utcnow
from shared.pipeline import JobOutcome, Runtime, StepDraft, open_step, store_step
from shared.prompts import parse_caller_output
from shared.roles import StepRole
from shared.schemas import StepJob

__all__ = ["TOOL_EXECUTOR", "handle_tools_job", "tool_executor"]

#: The name of this worker's tool executor among the runtime's resources.
TOOL_EXECUTOR = "tool_executor"


def tool_executor(rt: Runtime) -> ToolExecutor:
    """This process's tool executor, built from the settings on first use."""
    return rt.resource(TOOL_EXECUTOR, lambda: build_executor(rt.settings))


def handle_tools_job(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
    """Produce observation step ``job.step_index`` from the caller step before it.

    The call is claimed in the database before it runs, so a duplicate message
    never runs it twice; a redelivered message (its worker died mid-call) takes
    the claim over.
    """
    context = open_step(job, rt)
    if isinstance(context, JobOutcome):
        return context
    call = parse_caller_output(context.steps[-1].output)
    settings = rt.settings
    # Longer than any live attempt can take (calls, backoff waits), so only dead claims look stale.
    retries = settings.tools_max_retries + 1
    stale_after_s = settings.tools_timeout_s * retries + settings.tools_backoff_s * 2**retries + 30
    try:
        with session_scope(rt.engine) as session:
            claim = crud.claim_tool_call(
                session=session,
                task_id=job.task_id,
                step_index=job.step_index,
                tool_name=call.action,
                arguments=call.action_input,
                takeover=redelivered,
                stale_after_s=stale_after_s,
            )
    except IntegrityError:
        claim = None
    if claim is None:
        return JobOutcome.DUPLICATE

    # The history lets the mirror tell apart identical calls recorded with different observations.
    outcome = tool_executor(rt).execute(
        call.action, call.action_input, context.tools, history=crud.steps_to_turns(context.steps), deadline=context.deadline
    )

    def complete_tool_call(session: Session) -> None:
        row = session.exec(
            select(ToolCall).where(ToolCall.task_id == job.task_id, ToolCall.step_index == job.step_index)
        ).one()
        row.status = ToolCallStatus.COMPLETED
        row.ok = outcome.ok
        row.backend = outcome.backend
        row.error = outcome.error
        row.latency_s = outcome.latency_s
        row.finished_at = utcnow()

    draft = StepDraft(role=StepRole.TOOLS, output=outcome.observation, tool_name=call.action, latency_s=outcome.latency_s)
    return store_step(job, draft, rt, also=complete_tool_call)
