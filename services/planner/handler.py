"""The planner step: render the planner prompt, ask the planner LLM, decide who acts next."""

from __future__ import annotations

from shared.crud import steps_to_turns
from shared.lifecycle import EndReason
from shared.llm_step import run_llm_step
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft
from shared.prompts import NextRole, parse_planner_output, render_planner_prompt
from shared.roles import LLMRole, StepRole
from shared.schemas import StepJob

__all__ = ["handle_planner_job", "interpret_planner_output"]


def render(context: StepContext) -> str:
    """The planner prompt for the trajectory so far."""
    return render_planner_prompt(context.tools, steps_to_turns(context.steps))


def interpret_planner_output(generated: str, _context: StepContext | None = None) -> StepDraft:
    """A planner step from the normalised output; ``Next: give up.`` ends the task as given up."""
    decision = parse_planner_output(generated)
    gave_up = decision.next is NextRole.GIVE_UP
    return StepDraft(
        role=StepRole.PLANNER,
        output=decision.text,
        raw_output=generated,
        next_role=decision.next,
        end_reason=EndReason.PLANNER_GAVE_UP if gave_up else None,
    )


def handle_planner_job(job: StepJob, rt: Runtime, *, redelivered: bool = False) -> JobOutcome:
    """Produce planner step ``job.step_index``; the follow-up is a caller or summarizer job."""
    return run_llm_step(job, rt, llm_role=LLMRole.PLANNER, render=render, interpret=interpret_planner_output)
