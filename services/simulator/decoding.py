"""How the SGLang **simulator** turns a continuation into SGLang's output for one request.

The simulated model emits the continuation's pseudo-tokens and then Llama-2's
EOS. The finish checks run in SGLang's order after each token — stop string /
``stop_regex`` first, then a stop token (``stop_token_ids`` or EOS), then
``max_new_tokens`` — and every finish is capped at ``max_new_tokens``:

* stop string: ``{"type": "stop", "matched": "<the string>"}``; the text is cut
  before it unless ``no_stop_trim`` (then it runs to the end of the token that
  completed the match);
* EOS: ``{"type": "stop", "matched": 2}``; the EOS id is the last output id and
  is not part of the text (special tokens are skipped);
* ``max_new_tokens``: ``{"type": "length", "length": N}`` after N tokens.

``ignore_eos`` makes the model run on to ``max_new_tokens`` emitting EOS ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.simulator.tokenizer import EOS_TOKEN_ID, PseudoTokenizer

__all__ = ["Completion", "DecodeOptions", "decode_continuation"]


@dataclass(frozen=True)
class DecodeOptions:
    """The sampling parameters that shape the output."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    stop_regex: tuple[str, ...] = ()
    no_stop_trim: bool = False
    ignore_eos: bool = False


@dataclass(frozen=True)
class Completion:
    """The finished output: text, ids and SGLang's ``finish_reason``."""

    text: str
    output_ids: list[int]
    finish_reason: dict[str, Any]

    @property
    def completion_tokens(self) -> int:
        """Generated tokens, EOS included (as SGLang counts them)."""
        return len(self.output_ids)

    def prefix(self, tokens: int) -> tuple[str, list[int]]:
        """Cumulative text and ids after ``tokens`` tokens (for streaming); never leaks trimmed text."""
        ids = self.output_ids[:tokens]
        if tokens >= len(self.output_ids):
            return self.text, ids
        return self.text[: _chars_for(tokens, self.output_ids)], ids


def _chars_for(tokens: int, ids: Sequence[int]) -> int:
    from services.simulator.tokenizer import CHARS_PER_TOKEN

    return sum(CHARS_PER_TOKEN for token_id in ids[:tokens] if token_id != EOS_TOKEN_ID)


@dataclass(frozen=True)
class _StopHit:
    tokens: int  # tokens generated when the stop fires
    start: int  # character offset of the matched text
    end: int
    matched: str | int


def decode_continuation(continuation: str, options: DecodeOptions, tokenizer: PseudoTokenizer) -> Completion:
    """The output a request with ``options`` gets when the model's answer is ``continuation``."""
    content_ids = tokenizer.encode(continuation)
    limit = options.max_new_tokens
    hit = _first_string_stop(continuation, options) or _first_token_stop(content_ids, options)
    if hit is not None and hit.tokens <= limit:
        return _stopped(continuation, content_ids, hit, options)
    if options.ignore_eos and len(content_ids) < limit:
        ids = content_ids + [EOS_TOKEN_ID] * (limit - len(content_ids))
        return Completion(continuation, ids, {"type": "length", "length": limit})
    ids = content_ids[:limit]
    return Completion(tokenizer.decode(ids) if len(ids) < len(content_ids) else continuation, ids,
                      {"type": "length", "length": limit})


def _stopped(continuation: str, content_ids: list[int], hit: _StopHit, options: DecodeOptions) -> Completion:
    if isinstance(hit.matched, int):  # EOS or a stop token id
        ids = content_ids[: hit.tokens - 1] + [hit.matched] if hit.tokens > len(content_ids) else content_ids[: hit.tokens]
        text = continuation[: hit.start]
    else:
        ids = content_ids[: hit.tokens]
        cut = hit.end if options.no_stop_trim else hit.start
        text = continuation[: max(cut, 0)]
        if options.no_stop_trim:
            text = continuation[: sum(len(p) for p in PseudoTokenizer.split(continuation)[: hit.tokens])]
    return Completion(text, ids, {"type": "stop", "matched": hit.matched})


def _first_string_stop(continuation: str, options: DecodeOptions) -> _StopHit | None:
    hits = []
    for stop in options.stop:
        if stop and (pos := continuation.find(stop)) != -1:
            end = pos + len(stop)
            hits.append(_StopHit(PseudoTokenizer.tokens_through(end), pos, end, stop))
    for pattern in options.stop_regex:
        if (match := re.search(pattern, continuation)) is not None:
            hits.append(_StopHit(PseudoTokenizer.tokens_through(max(match.end(), 1)), match.start(), match.end(), pattern))
    return min(hits, key=lambda hit: (hit.tokens, hit.start)) if hits else None


def _first_token_stop(content_ids: list[int], options: DecodeOptions) -> _StopHit | None:
    if options.ignore_eos:
        return None
    chars = 0
    for index, token_id in enumerate(content_ids):
        if token_id in options.stop_token_ids:
            return _StopHit(index + 1, chars, chars, token_id)
        chars += 4
    return _StopHit(len(content_ids) + 1, chars, chars, EOS_TOKEN_ID)
