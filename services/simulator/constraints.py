"""Structured-output constraints (``regex``, ``ebnf``, ``json_schema``) in the SGLang **simulator**.

A real server compiles the constraint with its grammar backend and masks tokens with
it. The simulator compiles it with the same engine, **llguidance**, exactly as SGLang
does when started with ``--grammar-backend llguidance`` (``sglang/srt/constrained/
llguidance_backend.py``: ``grammar_from("regex" | "ebnf", …)``, ``LLMatcher.
grammar_from_json_schema(…, whitespace_flexible)``), so a constraint SGLang refuses is
refused here with SGLang's ``Failed to compile <kind> grammar: <detail>`` and one it
accepts is enforced byte for byte. The simulator then checks replayed text against the
compiled grammar and, for synthetic answers, walks the grammar for a short accepted
string. Compiled constraints are cached by source, as SGLang's grammar backend caches
them; each check runs on a copy of the cached matcher, so threads never share state.

The matcher runs over a byte-level vocabulary (one token per byte, plus an end token):
the simulator has no real tokenizer, and a byte vocabulary accepts exactly the texts a
grammar allows, whatever a model's tokenizer would have split them into.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper, grammar_from

__all__ = ["Constraint", "ConstraintCompileError", "compile_constraint", "constraint_accepts"]

#: SGLang's names for the grammar kinds, as used in its error messages.
KIND_BY_PARAM = {"json_schema": "json", "regex": "regex", "ebnf": "ebnf", "structural_tag": "structural_tag"}
#: Longest synthetic example the grammar walk builds (bytes).
EXAMPLE_LIMIT = 512
_EOS = 256
# Bytes a synthetic example prefers, most first: closers end structures soonest, and
# whitespace comes last (a grammar that allows it almost anywhere would never move on).
_PREFERRED = [*b'}]")0a', *(b for b in range(0x21, 0x7F) if b not in b'}]")0a'), *b" \n\t"]


class ConstraintCompileError(ValueError):
    """The constraint does not compile; the message is SGLang's ``Failed to compile ...``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"Failed to compile {kind} grammar: {detail}")
        self.kind = kind


class _ByteVocabulary:
    """What llguidance's ``TokenizerWrapper`` needs: token *i* is byte *i*, then one end token."""

    eos_token_id = _EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]
    special_token_ids = [_EOS]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


@functools.cache
def _tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_ByteVocabulary()))


class Constraint:
    """A compiled constraint: checks whole outputs and finds an example it accepts."""

    def __init__(self, kind: str, matcher: LLMatcher) -> None:
        self.kind = kind
        self._matcher = matcher  # pristine; only copies consume bytes

    def accepts(self, text: str) -> bool:
        """Whether the whole ``text`` satisfies the constraint (the output may end after it)."""
        matcher = self._matcher.deep_copy()
        return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()

    def example(self) -> str | None:
        """A short text the constraint accepts, or None when the walk finds none within :data:`EXAMPLE_LIMIT`.

        Forced bytes are taken as they come; otherwise the first allowed byte of a fixed
        preference (closers first), stopping as soon as the grammar may end.
        """
        matcher = self._matcher.deep_copy()
        out = bytearray()
        while len(out) < EXAMPLE_LIMIT and not matcher.is_error():
            if matcher.is_accepting():
                return out.decode("utf-8", errors="replace")
            forced = matcher.compute_ff_bytes()
            if forced:
                matcher.consume_tokens(list(forced))
                out += forced
                continue
            byte = next((b for b in _PREFERRED if matcher.try_consume_tokens([b]) == 1), None)
            if byte is None:
                return None
            out.append(byte)
        return None


def _serialized_grammar(param: str, source: str) -> str:
    """The llguidance grammar for the constraint, as SGLang's llguidance backend builds it."""
    if param == "json_schema":
        return LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": True})
    if param == "regex":
        return grammar_from("regex", source)
    if param == "ebnf":
        return grammar_from("ebnf", source)
    raise ValueError("structural_tag is not supported by the SGLang simulator")


def _contains_nul(param: str, source: str) -> bool:
    """SGLang refuses a NUL anywhere in a grammar, or in any string of a JSON schema."""
    if "\x00" in source:
        return True
    if param != "json_schema":
        return False
    try:
        stack: list[Any] = [json.loads(source)]
    except ValueError:
        return False
    while stack:
        node = stack.pop()
        if isinstance(node, str) and "\x00" in node:
            return True
        if isinstance(node, dict):
            stack.extend([*node.keys(), *node.values()])
        elif isinstance(node, list):
            stack.extend(node)
    return False


@functools.lru_cache(maxsize=512)
def compile_constraint(param: str, source: str) -> Constraint:
    """Compile the constraint named by the sampling parameter ``param`` (``regex``, ``ebnf``, ``json_schema``)."""
    kind = KIND_BY_PARAM[param]
    if _contains_nul(param, source):
        raise ConstraintCompileError(kind, f"Invalid {kind}: NUL bytes (\\u0000) are not allowed")
    try:
        matcher = LLMatcher(_tokenizer(), _serialized_grammar(param, source), log_level=0)
    except (ValueError, TypeError) as exc:  # SGLang turns any compile failure into this error
        raise ConstraintCompileError(kind, str(exc)) from exc
    if matcher.is_error():
        raise ConstraintCompileError(kind, matcher.get_error())
    return Constraint(kind, matcher)


@functools.lru_cache(maxsize=4096)
def constraint_accepts(param: str, source: str, text: str) -> bool:
    """Whether ``text`` satisfies the (compiled, cached) constraint; verdicts are cached too.

    Replayed continuations are checked against the same constraints again and again
    under load.
    """
    return compile_constraint(param, source).accepts(text)
