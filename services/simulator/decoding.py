"""How the SGLang **simulator** turns a continuation into SGLang's output for one request.

The simulated model emits the continuation's pseudo-tokens and then Llama-2's
EOS. The finish checks follow SGLang's order for the step in which they fire —
stop string / ``stop_regex`` first, then a stop token (``stop_token_ids`` or
EOS) — and any finish later than ``max_new_tokens`` becomes a length finish:

* stop string: ``{"type": "stop", "matched": "<the string>"}``; the text is cut
  before it unless ``no_stop_trim`` (then it runs to the end of the token that
  completed the match);
* stop token / EOS: ``{"type": "stop", "matched": <id>}`` (EOS is 2); the id is
  the last output id and its text is not part of the output;
* ``max_new_tokens``: ``{"type": "length", "length": N}`` after N tokens.

``ignore_eos`` makes the model run on to ``max_new_tokens``, emitting EOS ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from services.simulator.tokenizer import EOS_TOKEN_ID, PseudoTokenizer

__all__ = ["Completion", "DecodeOptions", "decode_continuation"]

_STRING_STOP, _TOKEN_STOP = 0, 1  # SGLang checks stop strings before stop tokens within a step


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
        """Generated tokens, a final stop token included (as SGLang counts them)."""
        return len(self.output_ids)

    def prefix(self, tokens: int) -> tuple[str, list[int]]:
        """Cumulative text and ids after ``tokens`` tokens (for streaming); never shows trimmed text."""
        if tokens >= len(self.output_ids):
            return self.text, list(self.output_ids)
        return PseudoTokenizer.text_through(self.text, tokens), self.output_ids[:tokens]


@dataclass(frozen=True)
class _Stop:
    tokens: int  # tokens generated when the stop fires
    kind: int
    start: int  # character offset where the matched text starts
    completion: Completion


def decode_continuation(continuation: str, options: DecodeOptions, tokenizer: PseudoTokenizer) -> Completion:
    """The output a request with ``options`` gets when the model's answer is ``continuation``."""
    content_ids = tokenizer.encode(continuation)
    stops = [*_string_stops(continuation, content_ids, options), *_token_stops(continuation, content_ids, options)]
    first = min(stops, key=lambda stop: (stop.tokens, stop.kind, stop.start), default=None)
    if first is not None and first.tokens <= options.max_new_tokens:
        return first.completion
    return _length_finish(continuation, content_ids, options)


def _length_finish(continuation: str, content_ids: list[int], options: DecodeOptions) -> Completion:
    limit = options.max_new_tokens
    ids = content_ids[:limit]
    if options.ignore_eos:
        ids += [EOS_TOKEN_ID] * (limit - len(ids))
    return Completion(PseudoTokenizer.text_through(continuation, limit), ids, {"type": "length", "length": limit})


def _string_stops(continuation: str, content_ids: list[int], options: DecodeOptions) -> list[_Stop]:
    matches: list[tuple[int, int, str]] = []
    for stop in options.stop:
        if stop and (pos := continuation.find(stop)) != -1:
            matches.append((pos, pos + len(stop), stop))
    for pattern in options.stop_regex:
        if (match := re.search(pattern, continuation)) is not None and match.end() > 0:
            matches.append((match.start(), match.end(), pattern))
    stops = []
    for start, end, matched in matches:
        tokens = PseudoTokenizer.tokens_through(continuation, end)
        text = PseudoTokenizer.text_through(continuation, tokens) if options.no_stop_trim else continuation[:start]
        completion = Completion(text, content_ids[:tokens], {"type": "stop", "matched": matched})
        stops.append(_Stop(tokens, _STRING_STOP, start, completion))
    return stops


def _token_stops(continuation: str, content_ids: list[int], options: DecodeOptions) -> list[_Stop]:
    if options.ignore_eos:
        return []
    if not options.stop_token_ids.isdisjoint(content_ids):  # a set test in C first: usually none occurs
        for index, token_id in enumerate(content_ids):
            if token_id in options.stop_token_ids:
                text = PseudoTokenizer.text_through(continuation, index)
                completion = Completion(text, content_ids[: index + 1], {"type": "stop", "matched": token_id})
                return [_Stop(index + 1, _TOKEN_STOP, len(text), completion)]
    completion = Completion(continuation, [*content_ids, EOS_TOKEN_ID], {"type": "stop", "matched": EOS_TOKEN_ID})
    return [_Stop(len(content_ids) + 1, _TOKEN_STOP, len(continuation), completion)]
