"""EBNF (GBNF / xgrammar dialect) grammars for the SGLang **simulator**'s ``ebnf`` constraint.

A real SGLang server masks tokens so the output stays inside the grammar; the
simulator replays recorded text instead, so it only needs to *check* text
against the grammar and, for synthetic answers, to *produce* some text the
grammar accepts. :func:`compile_ebnf` parses the dialect that
:mod:`shared.constraints` writes (``name ::= ...``, double-quoted literals with
``\\n \\" \\\\ \\xHH \\uHHHH`` escapes, character classes such as
``[^"\\\\\\x00-\\x1F]``, ``.``, groups, ``|``, ``*``, ``+``, ``?``, ``{m,n}``, ``#``
comments; ``root`` is the start rule) into an :class:`EbnfGrammar`, which
recognises text with a Lark Earley parser and derives a shortest accepted string.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import lark

__all__ = ["EbnfGrammar", "GrammarSyntaxError", "compile_ebnf"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "f": "\f", "v": "\v", "b": "\b", "a": "\a", "e": "\x1b"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_REPRESENTATIVE_CHARS = "a0 A_x-.,:"


class GrammarSyntaxError(ValueError):
    """The EBNF text is not a valid grammar (SGLang: ``Failed to compile ebnf grammar: ...``)."""


# --- AST -------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class CharSet:
    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def contains(self, char: str) -> bool:
        inside = any(lo <= ord(char) <= hi for lo, hi in self.ranges)
        return inside != self.negated


@dataclass(frozen=True)
class RuleRef:
    name: str


@dataclass(frozen=True)
class Sequence:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Choice:
    options: tuple[Expr, ...]


@dataclass(frozen=True)
class Repeat:
    item: Expr
    min: int
    max: int | None


Expr = Literal | CharSet | RuleRef | Sequence | Choice | Repeat


# --- parser ------------------------------------------------------------------------


class _Parser:
    """Recursive-descent parser for the GBNF dialect."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> GrammarSyntaxError:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        return GrammarSyntaxError(f"EBNF parse error at line {line}, column {column}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end == -1 else end
            elif char.isspace():
                self.pos += 1
            else:
                return

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse_grammar(self) -> dict[str, Expr]:
        rules: dict[str, Expr] = {}
        while self.peek():
            name = self.parse_name()
            self.skip_space()
            if not self.text.startswith("::=", self.pos):
                raise self.error(f'expected "::=" after rule name "{name}"')
            self.pos += 3
            if name in rules:
                raise self.error(f'rule "{name}" is defined more than once')
            rules[name] = self.parse_choice()
        return rules

    def parse_name(self) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _NAME_CHARS:
            self.pos += 1
        if start == self.pos:
            raise self.error(f"expected a rule name, found {self.text[self.pos : self.pos + 10]!r}")
        return self.text[start : self.pos]

    def at_rule_start(self) -> bool:
        """Whether the upcoming text is ``name ::=`` (the end of the current rule)."""
        saved = self.pos
        try:
            self.parse_name()
            self.skip_space()
            return self.text.startswith("::=", self.pos)
        except GrammarSyntaxError:
            return False
        finally:
            self.pos = saved

    def parse_choice(self) -> Expr:
        options = [self.parse_sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.parse_sequence())
        return options[0] if len(options) == 1 else Choice(tuple(options))

    def parse_sequence(self) -> Expr:
        items: list[Expr] = []
        while (char := self.peek()) and char not in "|)" and not self.at_rule_start():
            items.append(self.parse_quantified())
        return items[0] if len(items) == 1 else Sequence(tuple(items))

    def parse_quantified(self) -> Expr:
        item = self.parse_primary()
        while self.pos < len(self.text) and self.text[self.pos] in "*+?{":
            item = self.parse_quantifier(item)
        return item

    def parse_quantifier(self, item: Expr) -> Expr:
        char = self.text[self.pos]
        self.pos += 1
        if char == "*":
            return Repeat(item, 0, None)
        if char == "+":
            return Repeat(item, 1, None)
        if char == "?":
            return Repeat(item, 0, 1)
        end = self.text.find("}", self.pos)
        if end == -1:
            raise self.error('unterminated "{" repetition')
        body, self.pos = self.text[self.pos : end], end + 1
        low, _, high = body.partition(",")
        try:
            minimum = int(low.strip())
            maximum = minimum if "," not in body else (int(high.strip()) if high.strip() else None)
        except ValueError as exc:
            raise self.error(f"bad repetition {{{body}}}") from exc
        if maximum is not None and maximum < minimum:
            raise self.error(f"bad repetition {{{body}}}")
        return Repeat(item, minimum, maximum)

    def parse_primary(self) -> Expr:
        char = self.peek()
        if char == '"':
            return Literal(self.parse_string())
        if char == "[":
            return self.parse_char_class()
        if char == "(":
            self.pos += 1
            inner = self.parse_choice()
            if self.peek() != ")":
                raise self.error('expected ")"')
            self.pos += 1
            return inner
        if char == ".":
            self.pos += 1
            return CharSet((), negated=True)
        if char in _NAME_CHARS:
            return RuleRef(self.parse_name())
        raise self.error(f"unexpected character {char!r}")

    def parse_string(self) -> str:
        self.pos += 1  # opening quote
        chars = []
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated string literal")
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(chars)
            chars.append(self.parse_char())

    def parse_char_class(self) -> CharSet:
        self.pos += 1  # [
        negated = self.text.startswith("^", self.pos)
        self.pos += negated
        ranges = []
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated character class")
            if self.text[self.pos] == "]":
                self.pos += 1
                return CharSet(tuple(ranges), negated)
            low = ord(self.parse_char())
            high = low
            if self.text.startswith("-", self.pos) and not self.text.startswith("-]", self.pos):
                self.pos += 1
                high = ord(self.parse_char())
                if high < low:
                    raise self.error("character range is out of order")
            ranges.append((low, high))

    def parse_char(self) -> str:
        """One (possibly escaped) character inside a literal or class."""
        char = self.text[self.pos]
        self.pos += 1
        if char != "\\":
            return char
        if self.pos >= len(self.text):
            raise self.error("dangling backslash")
        esc = self.text[self.pos]
        self.pos += 1
        if esc in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[esc]
        if esc in _HEX_ESCAPES:
            digits = self.text[self.pos : self.pos + _HEX_ESCAPES[esc]]
            try:
                code = int(digits, 16)
                self.pos += len(digits)
                if len(digits) != _HEX_ESCAPES[esc]:
                    raise ValueError
                return chr(code)
            except ValueError as exc:
                raise self.error(f"bad \\{esc} escape") from exc
        return esc


def parse_ebnf(text: str) -> dict[str, Expr]:
    """The grammar's rules by name; raises :class:`GrammarSyntaxError`."""
    rules = _Parser(text).parse_grammar()
    if "root" not in rules:
        raise GrammarSyntaxError('The root rule with name "root" is not found.')
    for name, expr in rules.items():
        for ref in _references(expr):
            if ref not in rules:
                raise GrammarSyntaxError(f'Rule "{ref}" is not defined (used in rule "{name}").')
    return rules


def _references(expr: Expr) -> list[str]:
    if isinstance(expr, RuleRef):
        return [expr.name]
    if isinstance(expr, Sequence):
        return [name for item in expr.items for name in _references(item)]
    if isinstance(expr, Choice):
        return [name for option in expr.options for name in _references(option)]
    if isinstance(expr, Repeat):
        return _references(expr.item)
    return []


# --- Lark translation ---------------------------------------------------------------


def _escape_code(code: int) -> str:
    """One character, written so that it survives Lark's escape evaluation as a literal in a regex."""
    char = chr(code)
    if char.isascii() and (char.isalnum() or char == " "):
        return char
    if 0x21 <= code <= 0x7E:
        return "\\" + char  # Lark keeps "\\<punct>", and re reads it as that punctuation
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


class _LarkWriter:
    def __init__(self, rules: dict[str, Expr]) -> None:
        self.names = {name: ("start" if name == "root" else f"r{index}") for index, name in enumerate(rules)}

    def expr(self, expr: Expr) -> str:
        if isinstance(expr, Literal):
            return f"/{''.join(_escape_code(ord(c)) for c in expr.text)}/" if expr.text else ""
        if isinstance(expr, CharSet):
            if not expr.ranges:
                return "/[\\s\\S]/" if expr.negated else "/(?!)x/"
            body = "".join(_escape_code(lo) + (f"-{_escape_code(hi)}" if hi != lo else "") for lo, hi in expr.ranges)
            return f"/[{'^' if expr.negated else ''}{body}]/"
        if isinstance(expr, RuleRef):
            return self.names[expr.name]
        if isinstance(expr, Sequence):
            return " ".join(part for item in expr.items if (part := self.expr(item)))
        if isinstance(expr, Choice):
            return "(" + " | ".join(self.expr(option) for option in expr.options) + ")"
        return self.repeat(expr)

    def repeat(self, expr: Repeat) -> str:
        inner = self.expr(expr.item)
        if not inner:
            return ""
        inner = f"({inner})"
        if expr.max is None:
            if expr.min <= 1:
                return inner + ("*" if expr.min == 0 else "+")
            return f"{inner} ~ {expr.min} {inner}*"
        if (expr.min, expr.max) == (0, 1):
            return inner + "?"
        if expr.max == 0:
            return ""
        return f"{inner} ~ {expr.min}..{expr.max}" if expr.min != expr.max else f"{inner} ~ {expr.min}"

    def grammar(self, rules: dict[str, Expr]) -> str:
        return "\n".join(f"{self.names[name]}: {self.expr(expr)}" for name, expr in rules.items()) + "\n"


# --- shortest derivation ---------------------------------------------------------------


def _representative(chars: CharSet) -> str | None:
    for char in _REPRESENTATIVE_CHARS:
        if chars.contains(char):
            return char
    if not chars.negated:
        return chr(chars.ranges[0][0]) if chars.ranges else None
    return next((chr(code) for code in range(0x20, 0x10000) if chars.contains(chr(code))), None)


def _shortest(expr: Expr, known: dict[str, str | None]) -> str | None:
    if isinstance(expr, Literal):
        return expr.text
    if isinstance(expr, CharSet):
        return _representative(expr)
    if isinstance(expr, RuleRef):
        return known[expr.name]
    if isinstance(expr, Sequence):
        parts = [_shortest(item, known) for item in expr.items]
        return None if any(part is None for part in parts) else "".join(parts)  # type: ignore[arg-type]
    if isinstance(expr, Choice):
        found = [text for option in expr.options if (text := _shortest(option, known)) is not None]
        return min(found, key=len) if found else None
    if expr.min == 0:
        return ""
    item = _shortest(expr.item, known)
    return None if item is None else item * expr.min


def shortest_strings(rules: dict[str, Expr]) -> dict[str, str | None]:
    """For each rule, a shortest string it derives (None if it derives none), by fixpoint iteration."""
    known: dict[str, str | None] = dict.fromkeys(rules)
    changed = True
    while changed:
        changed = False
        for name, expr in rules.items():
            text = _shortest(expr, known)
            if text is not None and (known[name] is None or len(text) < len(known[name] or "")):
                known[name] = text
                changed = True
    return known


# --- public ------------------------------------------------------------------------------


class EbnfGrammar:
    """A compiled EBNF grammar: :meth:`accepts` full strings, :meth:`example` gives one it accepts."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.rules = parse_ebnf(source)
        lark_text = _LarkWriter(self.rules).grammar(self.rules)
        try:
            self._parser = lark.Lark(lark_text, start="start", parser="earley", lexer="dynamic", ambiguity="resolve")
        except lark.exceptions.LarkError as exc:  # pragma: no cover - the translation is meant to be valid
            raise GrammarSyntaxError(f"grammar could not be built: {exc}") from exc
        self._example = shortest_strings(self.rules)["root"]

    def accepts(self, text: str) -> bool:
        """Whether the whole of ``text`` is derived by ``root``."""
        try:
            self._parser.parse(text)
        except lark.exceptions.LarkError:
            return False
        return True

    def example(self) -> str | None:
        """A shortest string the grammar accepts, or None if it accepts none."""
        return self._example


@functools.lru_cache(maxsize=256)
def compile_ebnf(source: str) -> EbnfGrammar:
    """Compile (and cache) an EBNF grammar; raises :class:`GrammarSyntaxError`."""
    return EbnfGrammar(source)
