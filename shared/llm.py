"""Per-role SGLang requests and clients: the α-UMi generation settings in one place.

Every α-UMi role stops at ``</s>``, generates at most ``max_new_tokens`` (512)
and samples at the configured temperature (0.5, as the published real-API
runs). With constrained generation on, the planner gets a ``regex`` that makes
it end with a ``Next:`` marker and the caller an ``ebnf`` grammar that limits
it to the task's tool names and a JSON-object input; the summarizer is free
text. The prompt itself is never changed.

Usage::

    from shared.llm import build_role_request, client_for_role

    replicas = replicas_for_role(LLMRole.PLANNER, settings)     # one per worker process
    client = replicas.for_task(task_id.hex)                      # this task's replica
    request = build_role_request(
        LLMRole.PLANNER, prompt, tools=tools, settings=settings, constrained=settings.constrained, rid="t1-s3"
    )
    result = client.generate(request, deadline=time.monotonic() + settings.llm_read_timeout_s)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared.constraints import caller_ebnf, planner_regex
from shared.context_window import cut_text_to_tokens, max_prompt_tokens, prompt_budget
from shared.prompts import STOP_SEQUENCE, ToolDoc
from shared.redaction import install_log_redaction, secrets_redactor
from shared.replicas import ReplicaSet, RoutedClient
from shared.roles import LLMRole
from shared.settings import Settings
from shared.sglang_client import (
    GenerateRequest,
    LLMTimeout,
    SamplingParams,
    ServerInfo,
    SGLangClient,
    SGLangError,
    SGLangRequestError,
)

__all__ = [
    "GRAMMAR_BACKEND_KINDS",
    "build_role_request",
    "client_for_role",
    "constraint_kinds_of",
    "fit_to_context",
    "is_context_overflow",
    "replicas_for_role",
    "role_constraint",
    "server_constraint_kinds",
]

logger = logging.getLogger(__name__)

#: What a role's requests go through: one server's client, a replica set, or a set bound to one task.
LLMEndpoint = SGLangClient | ReplicaSet | RoutedClient

#: A worker's pool never shrinks below this, so SGLang always has requests to batch.
MIN_CONNECTIONS = 64


#: The constraint kinds each SGLang ``--grammar-backend`` compiles. ``outlines`` has no EBNF
#: (the caller's grammar would abort every caller request) and ``none`` compiles nothing.
GRAMMAR_BACKEND_KINDS: dict[str, frozenset[str]] = {
    "xgrammar": frozenset({"json_schema", "regex", "ebnf", "structural_tag"}),
    "llguidance": frozenset({"json_schema", "regex", "ebnf", "structural_tag"}),
    "outlines": frozenset({"json_schema", "regex"}),
    "none": frozenset(),
}
#: SGLang's default backend, assumed where a server does not say (e.g. a router).
DEFAULT_GRAMMAR_BACKEND = "xgrammar"
ALL_CONSTRAINT_KINDS = GRAMMAR_BACKEND_KINDS[DEFAULT_GRAMMAR_BACKEND]


def server_constraint_kinds(client: LLMEndpoint, role: LLMRole, *, deadline: float | None = None) -> frozenset[str]:
    """The constraint kinds ``role``'s SGLang server can compile, from its ``--grammar-backend``."""
    return constraint_kinds_of(client.server_info(deadline=deadline), role, server=client.base_url)


def constraint_kinds_of(info: ServerInfo, role: LLMRole, *, server: str) -> frozenset[str]:
    """The constraint kinds a server with ``info`` (its ``/server_info``) compiles for ``role``.

    The caller's grammar is EBNF, which only ``xgrammar`` and ``llguidance`` compile; on
    another backend the caller generates unconstrained (and the planner keeps its regex
    where the backend has regex), with a warning naming the fix.
    """
    backend = info.grammar_backend or DEFAULT_GRAMMAR_BACKEND
    kinds = GRAMMAR_BACKEND_KINDS.get(backend)
    if kinds is None:
        logger.warning("%s SGLang server at %s reports grammar backend %r; assuming it compiles every constraint",
                       role.value, server, backend)
        return ALL_CONSTRAINT_KINDS
    needed = _ROLE_CONSTRAINT_KIND.get(role)
    if needed is not None and needed not in kinds:
        logger.warning(
            "%s SGLang server at %s runs --grammar-backend %s, which cannot compile the %s's %s constraint: "
            "%s requests go unconstrained (run SGLang with --grammar-backend xgrammar or llguidance)",
            role.value, server, backend, role.value, needed, role.value,
        )
    return kinds


_ROLE_CONSTRAINT_KIND = {LLMRole.PLANNER: "regex", LLMRole.CALLER: "ebnf"}


def role_constraint(
    role: LLMRole, tools: Sequence[ToolDoc], *, kinds: frozenset[str] = ALL_CONSTRAINT_KINDS
) -> dict[str, str]:
    """The one grammar parameter for ``role`` (``{}`` for the summarizer).

    A caller with no tools cannot satisfy its grammar, so it generates
    unconstrained, as the reference does; the tool executor then rejects the call.
    A role whose constraint kind is not in ``kinds`` (what its server's grammar
    backend compiles) generates unconstrained too.
    """
    if _ROLE_CONSTRAINT_KIND.get(role) not in kinds:
        return {}
    if role is LLMRole.PLANNER:
        return {"regex": planner_regex()}
    if role is LLMRole.CALLER:
        if not tools:
            logger.debug("caller request without tools: generating unconstrained")
            return {}
        return {"ebnf": caller_ebnf(tools)}
    return {}


def build_role_request(
    role: LLMRole,
    prompt: str,
    *,
    tools: Sequence[ToolDoc],
    settings: Settings,
    constrained: bool,
    rid: str | None = None,
    greedy: bool = False,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    constraint_kinds: frozenset[str] = ALL_CONSTRAINT_KINDS,
) -> GenerateRequest:
    """The ``/generate`` request for one step of ``role`` on the raw-text ``prompt``.

    ``greedy`` sets temperature 0 (deterministic runs, evaluation); otherwise
    the settings' temperature and top_p apply. ``constrained`` adds the role's
    grammar (at most one per request, as SGLang requires) where ``constraint_kinds``
    (what the server's grammar backend compiles) has its kind. ``temperature`` and
    ``max_new_tokens`` override the settings for one task.
    """
    if temperature is None:
        temperature = settings.temperature
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or settings.max_new_tokens,
        "temperature": 0.0 if greedy else temperature,
        "top_p": settings.top_p,
        "stop": [STOP_SEQUENCE],
        # The reference generates with force_generate: never stop on the first token.
        "min_new_tokens": 1,
    }
    if constrained:
        params.update(role_constraint(role, tools, kinds=constraint_kinds))
    return GenerateRequest(text=prompt, sampling_params=SamplingParams(**params), rid=rid)


def client_for_role(
    role: LLMRole, settings: Settings, *, url: str | None = None, max_retries: int | None = None
) -> SGLangClient:
    """A client for ``role``'s SGLang server (``url``: one of its replicas) with the configured timeouts, retries and API key.

    Every secret of the settings is masked in its errors, and in what httpx logs. Without
    ``url`` the role must have one server; :func:`replicas_for_role` serves several.
    """
    if url is None:
        urls = settings.llm_urls(role)
        if len(urls) > 1:
            raise ValueError(f"{role.value} has {len(urls)} SGLang replicas: use replicas_for_role")
        url = urls[0]
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
    redactor = secrets_redactor(settings)
    install_log_redaction(redactor)
    return SGLangClient(
        url,
        api_key=api_key,
        timeout=LLMTimeout(connect=settings.llm_connect_timeout_s, read=settings.llm_read_timeout_s),
        max_retries=settings.llm_max_retries if max_retries is None else max_retries,
        backoff_s=settings.llm_backoff_s,
        max_connections=max(MIN_CONNECTIONS, settings.worker_concurrency),
        redactor=redactor,
    )


def replicas_for_role(role: LLMRole, settings: Settings) -> ReplicaSet:
    """``role``'s SGLang replicas (``UMI_<ROLE>_LLM_URL``, comma-separated) or router (``UMI_LLM_ROUTER``).

    Each replica's client sends one attempt; the set retries with the configured policy,
    each retry on the task's next replica (see :mod:`shared.replicas`).
    """
    clients = [client_for_role(role, settings, url=url, max_retries=0) for url in settings.llm_urls(role)]
    return ReplicaSet(
        role.value,
        clients,
        retry=clients[0].retry.model_copy(update={"max_retries": settings.llm_max_retries}),
        health_interval_s=settings.llm_health_interval_s,
        routing=settings.llm_routing,
        router=settings.llm_router,
    )


def fit_to_context(
    client: LLMEndpoint, request: GenerateRequest, *, context_length: int, deadline: float | None = None
) -> GenerateRequest:
    """Cut an over-long prompt from the left so prompt + ``max_new_tokens`` fits the context.

    A prompt whose UTF-8 byte count (plus BOS and a prefix space) fits the budget cannot
    be too long and is sent as text without asking the server. A longer one is tokenized
    by the server; if it does not fit, its last tokens are sent as ``input_ids`` — as the
    α-UMi reference keeps ``tokens[-max_len:]``. Where the server has no ``/tokenize``
    route (an SGLang router, a gateway), the prompt's tail is cut by the byte bound and
    sent as text: shorter than the exact cut, never too long. In router mode
    (``client.serves_tokenize`` false) ``/tokenize`` is not even asked.
    """
    assert request.text is not None
    max_new_tokens = request.sampling_params.max_new_tokens or 0
    budget = prompt_budget(context_length, max_new_tokens)
    if max_prompt_tokens(request.text) <= budget:
        return request
    if not client.serves_tokenize:
        cut = cut_text_to_tokens(request.text, budget)
        logger.info("router at %s serves no /tokenize: prompt cut by its byte count to %d characters", client.base_url, len(cut))
        return request.model_copy(update={"text": cut})
    try:
        tokenized = client.tokenize(request.text, deadline=deadline)
    except SGLangRequestError as exc:
        if exc.status_code not in TOKENIZE_MISSING_STATUSES:
            raise
        cut = cut_text_to_tokens(request.text, budget)
        logger.info("no /tokenize at %s: prompt cut by its byte count to %d characters", client.base_url, len(cut))
        return request.model_copy(update={"text": cut})
    budget = min(budget, tokenized.max_model_len - max_new_tokens)
    if tokenized.count <= budget:
        return request
    logger.info("prompt of %d tokens cut to its last %d (context %d)", tokenized.count, budget, tokenized.max_model_len)
    return request.model_copy(update={"text": None, "input_ids": tokenized.tokens[-budget:]})


def is_context_overflow(exc: SGLangError) -> bool:
    """Whether ``exc`` is SGLang's 400 for a prompt (plus ``max_new_tokens``) beyond the context length.

    SGLang's ``_validate_one_request`` words both cases with "context length" ("The input
    (N tokens) is longer than the model's context length (M tokens)." and "Requested token
    count exceeds the model's maximum context length of M tokens. …").
    """
    return isinstance(exc, SGLangRequestError) and exc.status_code == 400 and "context length" in exc.message


#: Answers meaning "this server has no /tokenize route" (a router or gateway in front of SGLang).
TOKENIZE_MISSING_STATUSES = frozenset({404, 405, 501})
