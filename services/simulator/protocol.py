"""SGLang ``/generate`` request handling for the SGLang **simulator**: batching, rids, sampling params.

This mirrors SGLang 0.5.23's ``GenerateReqInput.normalize_batch_and_arguments``
and ``SamplingParams`` (``__post_init__``, ``normalize``, ``verify``), including
their error messages, so a client sees the same 400s it would see from a real
server. Bodies reaching this module have already passed the request contract
(:func:`shared.sglang_contract.generate_contract_error`), so field types are right.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from services.simulator.errors import RequestValueError
from services.simulator.tokenizer import VOCAB_SIZE

__all__ = ["GenerateItem", "GenerateRequest", "SamplingParams", "normalize_generate", "resolve_sampling_params"]

DEFAULT_MAX_NEW_TOKENS = 128
TOP_K_ALL = 1 << 30
MAX_STOP_COUNT = 32
MAX_STOP_REGEX_COUNT = 32
MAX_STOP_REGEX_LEN = 256
_SAMPLING_EPS = 1e-6
_CONSTRAINT_PARAMS = ("json_schema", "regex", "ebnf", "structural_tag")


@dataclass(frozen=True)
class SamplingParams:
    """Resolved and verified sampling parameters of one request."""

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    stop_regex: tuple[str, ...] = ()
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    stream_interval: int | None = None

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(parameter name, source)`` of the request's structured-output constraint, if any."""
        for name in _CONSTRAINT_PARAMS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None


@dataclass(frozen=True)
class GenerateItem:
    """One prompt of a (possibly batched) ``/generate`` request."""

    index: int
    rid: str
    text: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any]


@dataclass(frozen=True)
class GenerateRequest:
    """A normalized ``/generate`` body."""

    items: list[GenerateItem]
    is_single: bool
    stream: bool


def _or_default(raw: dict[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key)
    return default if value is None else value


def _as_list(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def resolve_sampling_params(raw: dict[str, Any]) -> SamplingParams:
    """Apply SGLang's defaults, then its ``normalize`` and ``verify`` checks; raises :class:`RequestValueError`."""
    temperature = _or_default(raw, "temperature", 1.0)
    top_k = _or_default(raw, "top_k", TOP_K_ALL)
    if 0 <= temperature < _SAMPLING_EPS:
        temperature, top_k = 1.0, 1  # greedy
    if top_k == -1:
        top_k = TOP_K_ALL
    params = SamplingParams(
        max_new_tokens=raw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        min_new_tokens=_or_default(raw, "min_new_tokens", 0),
        temperature=temperature,
        top_p=_or_default(raw, "top_p", 1.0),
        top_k=top_k,
        min_p=_or_default(raw, "min_p", 0.0),
        frequency_penalty=_or_default(raw, "frequency_penalty", 0.0),
        presence_penalty=_or_default(raw, "presence_penalty", 0.0),
        repetition_penalty=_or_default(raw, "repetition_penalty", 1.0),
        stop=_as_list(raw.get("stop")),
        stop_token_ids=frozenset(int(t) for t in raw.get("stop_token_ids") or () if t is not None),
        stop_regex=_as_list(raw.get("stop_regex")),
        n=_or_default(raw, "n", 1),
        json_schema=raw.get("json_schema") or None,
        regex=raw.get("regex") or None,
        ebnf=raw.get("ebnf") or None,
        structural_tag=raw.get("structural_tag") or None,
        ignore_eos=_or_default(raw, "ignore_eos", False),
        no_stop_trim=_or_default(raw, "no_stop_trim", False),
        stream_interval=raw.get("stream_interval"),
    )
    _check_stops(params)
    _verify(params, raw)
    return params


def _check_stops(params: SamplingParams) -> None:
    """SGLang's ``SamplingParams.normalize`` limits."""
    if len(params.stop) > MAX_STOP_COUNT:
        raise RequestValueError(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(params.stop)}")
    if len(params.stop_regex) > MAX_STOP_REGEX_COUNT:
        raise RequestValueError(
            f"at most {MAX_STOP_REGEX_COUNT} stop_regex patterns are allowed, got {len(params.stop_regex)}"
        )
    for pattern in params.stop_regex:
        size = len(pattern.encode("utf-8"))
        if size > MAX_STOP_REGEX_LEN:
            raise RequestValueError(f"stop_regex is {size} bytes, over the {MAX_STOP_REGEX_LEN}-byte limit")


def _verify(params: SamplingParams, raw: dict[str, Any]) -> None:
    """SGLang's ``SamplingParams.verify``, message for message."""
    _verify_sampler(params)
    _verify_lengths(params)
    for token_id in raw.get("logit_bias") or {}:
        try:
            in_range = 0 <= int(token_id) < VOCAB_SIZE
        except ValueError as exc:
            raise RequestValueError(str(exc)) from exc
        if not in_range:
            raise RequestValueError(f"logit_bias must has keys in [0, {VOCAB_SIZE - 1}], got {token_id}.")
    beam_width = raw.get("beam_width")
    if beam_width is not None and beam_width < 1:
        raise RequestValueError(f"beam_width must be at least 1, got {beam_width}.")
    if sum(getattr(params, name) is not None for name in _CONSTRAINT_PARAMS) > 1:
        raise RequestValueError("Only one of json_schema, regex, ebnf, or structural_tag can be set.")


def _verify_sampler(params: SamplingParams) -> None:
    if not math.isfinite(params.temperature) or params.temperature < 0.0:
        raise RequestValueError(f"temperature must be a non-negative finite number, got {params.temperature}.")
    if not 0.0 < params.top_p <= 1.0:
        raise RequestValueError(f"top_p must be in (0, 1], got {params.top_p}.")
    if not 0.0 <= params.min_p <= 1.0:
        raise RequestValueError(f"min_p must be in [0, 1], got {params.min_p}.")
    if params.top_k < 1 or params.top_k == -1:
        raise RequestValueError(f"top_k must be -1 (disable) or at least 1, got {params.top_k}.")
    if not -2.0 <= params.frequency_penalty <= 2.0:
        raise RequestValueError(f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}.")
    if not -2.0 <= params.presence_penalty <= 2.0:
        raise RequestValueError(f"presence_penalty must be in [-2, 2], got {params.presence_penalty}.")
    if not 0.0 < params.repetition_penalty <= 2.0:
        raise RequestValueError(
            f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {params.repetition_penalty}."
        )


def _verify_lengths(params: SamplingParams) -> None:
    if not 0 <= params.min_new_tokens:
        raise RequestValueError(f"min_new_tokens must be in [0, max_new_tokens], got {params.min_new_tokens}.")
    if params.max_new_tokens is None:
        return
    if params.max_new_tokens < 0:
        raise RequestValueError(f"max_new_tokens must be at least 0, got {params.max_new_tokens}.")
    if not params.min_new_tokens <= params.max_new_tokens:
        raise RequestValueError(
            f"min_new_tokens must be in [0, max_new_tokens({params.max_new_tokens})], got {params.min_new_tokens}."
        )


# --- batch normalization ------------------------------------------------------------------


def normalize_generate(body: dict[str, Any]) -> GenerateRequest:
    """Split a ``/generate`` body into items (batch, ``n`` fan-out, rids); raises :class:`RequestValueError`."""
    if body.get("input_embeds") is not None:
        raise RequestValueError("input_embeds is not supported by the SGLang simulator; send text or input_ids.")
    prompts, is_single = _prompts(body)
    params_list = _sampling_params_list(body.get("sampling_params"), len(prompts))
    fan_out = max((_or_default(params, "n", 1) for params in params_list), default=1)
    if fan_out > 1:
        prompts = [prompt for prompt in prompts for _ in range(fan_out)]
        params_list = [params for params in params_list for _ in range(fan_out)]
        is_single = False
    rids = _rids(body.get("rid"), len(prompts), is_single)
    items = [
        GenerateItem(index=i, rid=rid, text=text, input_ids=ids, sampling_params=params)
        for i, ((text, ids), params, rid) in enumerate(zip(prompts, params_list, rids, strict=True))
    ]
    return GenerateRequest(items=items, is_single=is_single, stream=bool(body.get("stream")))


def _prompts(body: dict[str, Any]) -> tuple[list[tuple[str | None, list[int] | None]], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is None and input_ids is None:
        raise RequestValueError("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        if isinstance(text, str):
            return [(text, None)], True
        if not text:
            raise RequestValueError("text cannot be an empty list.")
        return [(item, None) for item in text], False
    if len(input_ids) == 0:
        raise RequestValueError("input_ids cannot be empty.")
    if isinstance(input_ids[0], int):
        return [(None, list(input_ids))], True
    if any(len(ids) == 0 for ids in input_ids):
        raise RequestValueError("input_ids cannot be empty.")
    return [(None, list(ids)) for ids in input_ids], False


def _sampling_params_list(raw: dict[str, Any] | list[dict[str, Any]] | None, count: int) -> list[dict[str, Any]]:
    if raw is None:
        return [{} for _ in range(count)]
    if isinstance(raw, dict):
        return [raw for _ in range(count)]
    if len(raw) != count:
        raise RequestValueError(
            f"The length of sampling_params ({len(raw)}) does not match the batch size ({count})."
        )
    return list(raw)


def _rids(raw: str | list[str] | None, count: int, is_single: bool) -> list[str]:
    if raw is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(raw, str):
        return [raw] if is_single else [f"{raw}_{i}" for i in range(count)]
    if len(raw) != count:
        raise RequestValueError(f"The rid should be a list of length {count}, got {len(raw)}.")
    duplicates = [rid for rid, seen in Counter(raw).items() if seen > 1]
    if duplicates:
        raise RequestValueError(f"Duplicate request IDs detected within the request: {duplicates}")
    return list(raw)
