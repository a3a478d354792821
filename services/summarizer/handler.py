"""The summarizer step: write the final answer; the task succeeds with it."""

from __future__ import annotations

from shared.crud import steps_to_turns
from shared.lifecycle import EndReason
from shared.llm_step import run_llm_step
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft
from shared.prompts import render_summarizer_prompt
from shared.roles import LLMRole, StepRole
from shared.schemas import StepJob

__all__ = ["handle_summarizer_job"]


def render(context: StepContext) -> str:
    """The summarizer prompt; the history ends with the planner's conclusion step."""
    return render_summarizer_prompt(steps_to_turns(context.steps))


def interpret(generated: str, _context: StepContext) -> StepDraft:
    """The answer step, which ends the task as succeeded."""
    return StepDraft(
        role=StepRole.SUMMARIZER,
        output=generated,
        end_reason=EndReason.ANSWERED,
        answer=generated,
    )


def handle_summarizer_job(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
    """Produce the summarizer step (the last step of a successful task)."""
    return run_llm_step(job, rt, llm_role=LLMRole.SUMMARIZER, render=render, interpret=interpret)
