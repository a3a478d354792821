"""The shared shape of the planner, caller and summarizer steps: prompt → SGLang → stored step.

Each LLM role's handler supplies how to render its prompt and how to interpret the
output; this module asks the role's SGLang server (one client per worker process,
kept in the :class:`~shared.pipeline.Runtime`) and stores the step idempotently.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from shared.llm import build_role_request, client_for_role, fit_to_context
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft, end_task, open_step, store_step
from shared.roles import LLMRole
from shared.lifecycle import EndReason
from shared.schemas import StepJob
from shared.sglang_client import SGLangClient, SGLangError

__all__ = ["llm_client", "run_llm_step"]


def llm_client(rt: Runtime, role: LLMRole) -> SGLangClient:
    """The (shared, thread-safe) client for ``role``'s SGLang server in this process."""
    return rt.resource(f"llm:{role.value}", lambda: client_for_role(role, rt.settings))


def run_llm_step(
    job: StepJob,
    rt: Runtime,
    *,
    llm_role: LLMRole,
    render: Callable[[StepContext], str],
    interpret: Callable[[str, StepContext], StepDraft],
) -> JobOutcome:
    """The shared shape of the planner, caller and summarizer steps: prompt → SGLang → step."""
    context = open_step(job, rt)
    if isinstance(context, JobOutcome):
        return context
    prompt = render(context)
    request = build_role_request(
        llm_role,
        prompt,
        tools=context.tools,
        settings=rt.settings,
        constrained=context.task.constrained,
        rid=f"{job.task_id.hex}-{job.step_index}-{uuid.uuid4().hex[:8]}",
        temperature=context.task.temperature,
        max_new_tokens=context.task.max_new_tokens,
    )
    started = time.monotonic()
    client = llm_client(rt, llm_role)
    try:
        request = fit_to_context(client, request, context_length=rt.settings.context_length, deadline=context.deadline)
        result = client.generate(request, deadline=context.deadline)
    except SGLangError as exc:
        if context.remaining_s <= 0:
            return end_task(job, rt, reason=EndReason.DEADLINE, error="deadline exceeded")
        return end_task(job, rt, reason=EndReason.LLM_ERROR, error=f"{llm_role} LLM failed: {exc}")
    draft = interpret(result.text, context)
    draft = draft.model_copy(
        update={
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_tokens": result.cached_tokens,
            "latency_s": time.monotonic() - started,
            "attempts": getattr(result, "attempts", None),
        }
    )
    return store_step(job, draft, rt)
