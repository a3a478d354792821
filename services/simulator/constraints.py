"""Structured-output constraints (``regex``, ``ebnf``, ``json_schema``) in the SGLang **simulator**.

A real server compiles the constraint and masks tokens with it; the simulator
compiles it the same way (a bad one fails with SGLang's ``Failed to compile
<kind> grammar: <detail>``), then checks replayed text against it and, for
synthetic answers, asks it for an example it accepts. Compiled constraints are
cached by source, as SGLang's grammar backend caches them.
"""

from __future__ import annotations

import functools
import re
import re._constants as sre_c
import re._parser as sre_parse
from typing import Any, Protocol

from services.simulator.grammar import GrammarSyntaxError, compile_ebnf
from services.simulator.json_schema import JsonSchema, JsonSchemaError

__all__ = [
    "Constraint",
    "ConstraintCompileError",
    "RegexConstraint",
    "compile_constraint",
    "constraint_accepts",
    "regex_example",
]

#: SGLang's names for the grammar kinds, as used in its error messages.
KIND_BY_PARAM = {"json_schema": "json", "regex": "regex", "ebnf": "ebnf", "structural_tag": "structural_tag"}

_CANDIDATE_CHARS = "a0 A_x-.,:\n" + "".join(chr(c) for c in range(0x21, 0x7F)) + "é\u00a0"
_CATEGORY_CHECKS = {
    sre_c.CATEGORY_DIGIT: str.isdigit,
    sre_c.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre_c.CATEGORY_SPACE: str.isspace,
    sre_c.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre_c.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre_c.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}


class ConstraintCompileError(ValueError):
    """The constraint does not compile; the message is SGLang's ``Failed to compile ...``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"Failed to compile {kind} grammar: {detail}")
        self.kind = kind


class Constraint(Protocol):
    """What the simulator needs from a compiled constraint."""

    kind: str

    def accepts(self, text: str) -> bool:
        """Whether the whole ``text`` satisfies the constraint."""
        ...

    def example(self) -> str | None:
        """Some text that satisfies the constraint, or None if none was found."""
        ...


class RegexConstraint:
    """``regex``: the output must ``re.fullmatch`` the pattern."""

    kind = "regex"

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def accepts(self, text: str) -> bool:
        """Whether ``text`` fully matches the pattern."""
        return self.pattern.fullmatch(text) is not None

    def example(self) -> str | None:
        """A short string the pattern fully matches."""
        text = regex_example(self.pattern.pattern)
        return text if text is not None and self.accepts(text) else None


class _EbnfConstraint:
    kind = "ebnf"

    def __init__(self, source: str) -> None:
        self.grammar = compile_ebnf(source)

    def accepts(self, text: str) -> bool:
        return self.grammar.accepts(text)

    def example(self) -> str | None:
        return self.grammar.example()


class _JsonConstraint:
    kind = "json"

    def __init__(self, source: str) -> None:
        self.schema = JsonSchema(source)

    def accepts(self, text: str) -> bool:
        return self.schema.accepts(text)

    def example(self) -> str | None:
        return self.schema.example()


@functools.lru_cache(maxsize=512)
def compile_constraint(param: str, source: str) -> Constraint:
    """Compile the constraint named by the sampling parameter ``param`` (``regex``, ``ebnf``, ``json_schema``)."""
    kind = KIND_BY_PARAM[param]
    try:
        if param == "regex":
            return RegexConstraint(source)
        if param == "ebnf":
            return _EbnfConstraint(source)
        if param == "json_schema":
            return _JsonConstraint(source)
    except re.error as exc:
        raise ConstraintCompileError(kind, str(exc)) from exc
    except (GrammarSyntaxError, JsonSchemaError) as exc:
        raise ConstraintCompileError(kind, str(exc)) from exc
    raise ConstraintCompileError(kind, "structural_tag is not supported by the SGLang simulator")


@functools.lru_cache(maxsize=4096)
def constraint_accepts(param: str, source: str, text: str) -> bool:
    """Whether ``text`` satisfies the (compiled, cached) constraint; verdicts are cached too.

    Replayed continuations are checked against the same constraints again and
    again under load, and an Earley parse of a long tool call is not free.
    """
    return compile_constraint(param, source).accepts(text)


# --- regex example -------------------------------------------------------------------


def regex_example(pattern: str) -> str | None:
    """A short string built from the pattern's structure (not guaranteed to match lookarounds)."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return None
    return _Sampler().sequence(parsed)


class _Sampler:
    def __init__(self) -> None:
        self.groups: dict[int, str] = {}

    def sequence(self, items: Any) -> str | None:
        parts = []
        for op, arg in items:
            part = self.item(op, arg)
            if part is None:
                return None
            parts.append(part)
        return "".join(parts)

    def item(self, op: Any, arg: Any) -> str | None:
        if op is sre_c.LITERAL:
            return chr(arg)
        if op is sre_c.NOT_LITERAL:
            return next(c for c in _CANDIDATE_CHARS if ord(c) != arg)
        if op is sre_c.ANY:
            return "a"
        if op is sre_c.IN:
            return _class_member(arg)
        if op is sre_c.BRANCH:
            options = [text for branch in arg[1] if (text := self.sequence(branch)) is not None]
            return min(options, key=len) if options else None
        if op is sre_c.SUBPATTERN:
            text = self.sequence(arg[-1])
            if text is not None and arg[0] is not None:
                self.groups[arg[0]] = text
            return text
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            low, _, body = arg
            text = self.sequence(body) if low else ""
            return None if text is None else text * low
        if op is sre_c.ATOMIC_GROUP:
            return self.sequence(arg)
        if op is sre_c.GROUPREF:
            return self.groups.get(arg, "")
        if op is sre_c.GROUPREF_EXISTS:
            group, yes, no = arg
            return self.sequence(yes if group in self.groups else (no or []))
        return ""  # AT, ASSERT, ASSERT_NOT: zero width here; the caller re-checks the result


def _class_member(items: Any) -> str | None:
    negated = bool(items) and items[0][0] is sre_c.NEGATE
    body = items[1:] if negated else items
    for char in _CANDIDATE_CHARS:
        if _in_class(char, body) != negated:
            return char
    if not negated:
        for op, arg in body:
            if op is sre_c.LITERAL:
                return chr(arg)
            if op is sre_c.RANGE:
                return chr(arg[0])
    return None


def _in_class(char: str, items: Any) -> bool:
    code = ord(char)
    for op, arg in items:
        if op is sre_c.LITERAL and code == arg:
            return True
        if op is sre_c.RANGE and arg[0] <= code <= arg[1]:
            return True
        if op is sre_c.CATEGORY and _CATEGORY_CHECKS.get(arg, lambda _c: False)(char):
            return True
    return False
