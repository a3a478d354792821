"""The caller step: turn the planner's thought into one tool call."""

from __future__ import annotations

from shared.crud import steps_to_turns
from shared.lifecycle import EndReason
from shared.llm_step import run_llm_step
from shared.models import TaskMode
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft
from shared.prompts import parse_caller_output, render_caller_prompt
from shared.roles import LLMRole, StepRole
from shared.schemas import StepJob

__all__ = ["handle_caller_job"]


def render(context: StepContext) -> str:
    """The caller prompt; the history ends with the planner step it acts on."""
    return render_caller_prompt(context.tools, steps_to_turns(context.steps))


def interpret(generated: str, context: StepContext) -> StepDraft:
    """A caller step naming the tool it calls (the tool executor parses the input).

    In a ``static_step`` task (static evaluation) the caller's step is the last one.
    """
    return StepDraft(
        role=StepRole.CALLER,
        output=generated,
        tool_name=parse_caller_output(generated).action,
        end_reason=EndReason.STEP_EVALUATED if context.task.mode == TaskMode.STATIC_STEP else None,
    )


def handle_caller_job(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
    """Produce caller step ``job.step_index``; the follow-up is a tools job."""
    return run_llm_step(job, rt, llm_role=LLMRole.CALLER, render=render, interpret=interpret)
