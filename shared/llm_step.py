"""The shared shape of the planner, caller and summarizer steps: prompt → SGLang → stored step.

Each LLM role's handler supplies how to render its prompt and how to interpret the
output; this module asks the role's SGLang server (one client per worker process,
kept in the :class:`~shared.pipeline.Runtime`), normalises the output as the α-UMi
reference does (:func:`shared.prompts.normalize_output`; a blank planner output is
asked again, up to :data:`~shared.prompts.PLANNER_MAX_GENERATIONS` times) and stores
the step idempotently, with the raw output beside the normalised one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from shared.lifecycle import EndReason
from shared.llm import (
    ALL_CONSTRAINT_KINDS,
    build_role_request,
    constraint_kinds_of,
    fit_to_context,
    is_context_overflow,
    replicas_for_role,
)
from shared.metrics import RetryKind, StepPhase, observe_llm_request, observe_llm_tokens, observe_retries, step_phase
from shared.models import TaskMode, utcnow
from shared.pipeline import JobOutcome, Runtime, StepContext, StepDraft, end_task, open_step, store_step
from shared.prompts import (
    NONE_OUTPUT,
    PLANNER_MAX_GENERATIONS,
    is_blank_planner_output,
    normalize_output,
    normalize_static_output,
)
from shared.replicas import ReplicaSet, RoutedClient
from shared.roles import LLMRole
from shared.schemas import StepJob
from shared.sglang_client import GenerateRequest, GenerateResult, ServerInfo, SGLangError

__all__ = ["constraint_kinds", "grammar_backend_check", "llm_client", "refuses_long_prompts", "run_llm_step", "server_info"]

logger = logging.getLogger(__name__)


def llm_client(rt: Runtime, role: LLMRole) -> ReplicaSet:
    """The (shared, thread-safe) replicas of ``role``'s SGLang server in this process."""
    return rt.resource(f"llm:{role.value}", lambda: replicas_for_role(role, rt.settings))


def server_info(rt: Runtime, role: LLMRole, *, deadline: float | None = None) -> ServerInfo | None:
    """``role``'s SGLang server's ``/server_info``, asked once per process.

    None while the server cannot be asked (still loading, unreachable); it is asked again next time.
    """
    name = f"server-info:{role.value}"
    known = rt.resources.get(name)
    if known is not None:
        return known
    try:
        info = llm_client(rt, role).server_info(deadline=deadline)
    except SGLangError as exc:
        logger.info("could not read the %s server's /server_info: %s", role.value, exc)
        return None
    return rt.resource(name, lambda: info)


def constraint_kinds(rt: Runtime, role: LLMRole, *, deadline: float | None = None) -> frozenset[str]:
    """What ``role``'s SGLang server's grammar backend compiles (from :func:`server_info`).

    A server that cannot be asked right now is assumed to run SGLang's default backend.
    """
    name = f"grammar:{role.value}"
    known = rt.resources.get(name)
    if known is not None:
        return known
    info = server_info(rt, role, deadline=deadline)
    if info is None:
        return ALL_CONSTRAINT_KINDS  # assume xgrammar until the server answers
    # Kept, so a backend that lacks the role's constraint is warned about once per process.
    kinds = constraint_kinds_of(info, role, server=llm_client(rt, role).base_url)
    return rt.resource(name, lambda: kinds)


def refuses_long_prompts(rt: Runtime, role: LLMRole, *, deadline: float | None = None) -> bool:
    """Whether ``role``'s SGLang server answers 400 to a prompt beyond its context (from :func:`server_info`).

    Such a server (``allow_auto_truncate`` false) is sent a long prompt as it is, and only a
    refusal costs a ``/tokenize``: most prompts that exceed the byte bound fit in tokens, so
    this saves a round trip per step. A server that truncates by itself (keeping the prompt's
    start, where α-UMi keeps its end), a router, or one that cannot be asked now gets every
    long prompt tokenized and cut first.
    """
    if not llm_client(rt, role).serves_tokenize:
        return False
    info = server_info(rt, role, deadline=deadline)
    return info is not None and info.allow_auto_truncate is False


#: How long a worker's start-up waits for its SGLang server's ``/server_info``.
STARTUP_CHECK_TIMEOUT_S = 5.0


def grammar_backend_check(role: LLMRole) -> Callable[[Runtime], None]:
    """A worker start-up check: read ``role``'s server's grammar backend and warn if it cannot compile the role's constraint.

    Never fatal: a server still loading its model is asked again on the first step.
    """

    def check(rt: Runtime) -> None:
        if rt.settings.constrained:
            constraint_kinds(rt, role, deadline=time.monotonic() + STARTUP_CHECK_TIMEOUT_S)

    return check


def _generate(
    client: RoutedClient, request: GenerateRequest, role: LLMRole, *, deadline: float, overflow_expected: bool = False
) -> GenerateResult:
    """One ``/generate`` request, counted in the LLM metrics (duration, outcome, tokens, retries).

    With ``overflow_expected`` a context-length refusal is not counted as a failure: the
    prompt was sent before it was tokenized (:func:`refuses_long_prompts`).
    """
    started = time.monotonic()
    try:
        result = client.generate(request, deadline=deadline)
    except SGLangError as exc:
        if overflow_expected and is_context_overflow(exc):
            raise
        observe_llm_request(role.value, time.monotonic() - started, ok=False)
        observe_retries(role.value, RetryKind.LLM, exc.attempts - 1)
        raise
    observe_llm_request(role.value, time.monotonic() - started, ok=True)
    observe_retries(role.value, RetryKind.LLM, getattr(result, "attempts", 1) - 1)
    observe_llm_tokens(
        role.value, prompt=result.prompt_tokens or 0, completion=result.completion_tokens or 0, cached=result.cached_tokens or 0
    )
    return result


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
    with step_phase(llm_role.value, StepPhase.PREPARE):
        prompt = render(context)
        constrained = context.task.constrained
        use_grammar = constrained and llm_role is not LLMRole.SUMMARIZER
        kinds = constraint_kinds(rt, llm_role, deadline=context.deadline) if use_grammar else ALL_CONSTRAINT_KINDS
        request = build_role_request(
            llm_role,
            prompt,
            tools=context.tools,
            settings=rt.settings,
            constrained=constrained,
            constraint_kinds=kinds,
            rid=f"{job.task_id.hex}-{job.step_index}-{uuid.uuid4().hex[:8]}",
            temperature=context.task.temperature,
            max_new_tokens=context.task.max_new_tokens,
        )
    started = time.monotonic()
    started_at = utcnow()
    client = llm_client(rt, llm_role).for_task(job.task_id.hex)  # every step of a task on the same replica
    # The static evaluation keeps outputs as GLPFT's infer_pipeline does and never asks again.
    static = context.task.mode == TaskMode.STATIC_STEP
    generations = PLANNER_MAX_GENERATIONS if llm_role is LLMRole.PLANNER and not static else 1
    prompt_tokens = completion_tokens = cached_tokens = attempts = 0
    context_length = rt.settings.context_length
    try:
        fitted = not refuses_long_prompts(rt, llm_role, deadline=context.deadline)
        if fitted:
            request = fit_to_context(client, request, context_length=context_length, deadline=context.deadline)
        for generation in range(1, generations + 1):
            if generation > 1:
                request = request.model_copy(update={"rid": f"{request.rid}-{generation}"})
            try:
                result = _generate(client, request, llm_role, deadline=context.deadline, overflow_expected=not fitted)
            except SGLangError as exc:
                if fitted or not is_context_overflow(exc):
                    raise
                # Refused as too long: tokenize and keep its last tokens, as the reference does.
                request = fit_to_context(client, request, context_length=context_length, deadline=context.deadline)
                fitted = True
                result = _generate(client, request, llm_role, deadline=context.deadline)
            prompt_tokens += result.prompt_tokens or 0
            completion_tokens += result.completion_tokens or 0
            cached_tokens += result.cached_tokens or 0
            attempts += getattr(result, "attempts", 1)
            text = normalize_static_output(result.text) if static else normalize_output(llm_role, result.text)
            if llm_role is not LLMRole.PLANNER or static or not is_blank_planner_output(text):
                break
            logger.info("task %s step %d: blank planner output %r (generation %d of %d)", job.task_id, job.step_index, text, generation, generations)
        else:
            text = NONE_OUTPUT  # as the reference, after the last blank generation
    except SGLangError as exc:
        if context.remaining_s <= 0:
            return end_task(job, rt, reason=EndReason.DEADLINE, error="deadline exceeded")
        return end_task(job, rt, reason=EndReason.LLM_ERROR, error=f"{llm_role} LLM failed: {exc}")
    draft = interpret(text, context)
    draft = draft.model_copy(
        update={
            "raw_output": result.text,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
            "latency_s": time.monotonic() - started,
            "started_at": started_at,
            "attempts": attempts,
        }
    )
    return store_step(job, draft, rt)
