"""OpenAI-compatible ``/v1/completions`` shapes for the SGLang **simulator**.

SGLang's ``/v1/completions`` turns an OpenAI request into a native generate
request (``max_tokens`` -> ``max_new_tokens``, default 16; SGLang extras such as
``regex``, ``ebnf``, ``json_schema``, ``top_k``, ``no_stop_trim`` pass through)
and its outputs back into OpenAI's ``text_completion`` objects. The simulator
does the same on top of its ``/generate`` engine.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["CompletionRequest", "completion_chunk", "completion_response", "to_generate_body"]

_PASS_THROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "n",
    "json_schema",
    "regex",
    "ebnf",
    "ignore_eos",
    "no_stop_trim",
    "skip_special_tokens",
)


class CompletionRequest(BaseModel):
    """The fields of an OpenAI completion request the simulator understands (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    rid: str | list[str] | None = None


def to_generate_body(request: CompletionRequest) -> dict[str, Any]:
    """The native ``/generate`` body SGLang builds for this completion request."""
    params: dict[str, Any] = {"max_new_tokens": request.max_tokens}
    if request.min_tokens is not None:
        params["min_new_tokens"] = request.min_tokens
    for name in _PASS_THROUGH:
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    prompt = request.prompt
    is_ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
    body: dict[str, Any] = {"sampling_params": params, "stream": request.stream}
    body["input_ids" if is_ids else "text"] = prompt
    body["rid"] = request.rid if request.rid is not None else _default_rids(prompt, request.n)
    return body


def _default_rids(prompt: Any, n: int) -> str | list[str]:
    single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
    count = (1 if single else len(prompt)) * n
    if count == 1:
        return f"cmpl-{uuid.uuid4().hex}"
    return [f"cmpl-{uuid.uuid4().hex}" for _ in range(count)]


def _finish(payload: dict[str, Any]) -> tuple[str | None, str | int | None]:
    reason = payload["meta_info"]["finish_reason"]
    if reason is None:
        return None, None
    return reason["type"], reason.get("matched")


def completion_response(request: CompletionRequest, payloads: list[dict[str, Any]], created: int) -> dict[str, Any]:
    """The ``text_completion`` object for finished ``/generate`` outputs."""
    choices = []
    for index, payload in enumerate(payloads):
        finish_reason, matched = _finish(payload)
        choices.append(
            {"index": index, "text": payload["text"], "logprobs": None, "finish_reason": finish_reason,
             "matched_stop": matched}
        )
    prompt_tokens = sum(payload["meta_info"]["prompt_tokens"] for payload in payloads)
    completion_tokens = sum(payload["meta_info"]["completion_tokens"] for payload in payloads)
    return {
        "id": payloads[0]["meta_info"]["id"],
        "object": "text_completion",
        "created": created,
        "model": request.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "reasoning_tokens": 0,
        },
    }


def completion_chunk(
    request: CompletionRequest, payload: dict[str, Any], index: int, sent_chars: int, created: int
) -> dict[str, Any]:
    """A streamed ``text_completion`` chunk carrying the text added since ``sent_chars``."""
    finish_reason, matched = _finish(payload)
    return {
        "id": payload["meta_info"]["id"],
        "object": "text_completion",
        "created": created,
        "model": request.model,
        "choices": [
            {"index": index, "text": payload["text"][sent_chars:], "logprobs": None, "finish_reason": finish_reason,
             "matched_stop": matched}
        ],
    }
