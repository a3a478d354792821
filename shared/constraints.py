"""Constrained-generation grammars for the planner and the caller (docs/architecture.md, "Constrained generation").

SGLang accepts exactly one of ``regex``, ``ebnf``, ``json_schema`` or
``structural_tag`` per request. The planner gets a ``regex`` that forces its
output to end with one of the three ``Next:`` markers; the caller gets an
``ebnf`` grammar (xgrammar/GBNF syntax) that forces ``Action: <one of the task's
tools>`` and a JSON-object ``Action Input``. Neither changes the prompt text, so
the models see exactly what they were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.prompts import NextRole, ToolDoc

__all__ = ["caller_ebnf", "planner_regex", "ebnf_string_literal"]


def planner_regex() -> str:
    """Any thought, ending with ``Next: caller.``, ``Next: conclusion.`` or ``Next: give up.``."""
    markers = "|".join(role.value for role in NextRole)
    return r"[\s\S]*Next: (" + markers + r")\."


def ebnf_string_literal(text: str) -> str:
    """``text`` as a double-quoted GBNF string literal."""
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    return f'"{escaped}"'


# JSON per RFC 8259, written in the GBNF dialect that xgrammar and llguidance accept.
_JSON_RULES = r"""
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ws ":" ws value ws
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws ::= [ \t\n\r]*
""".strip()


def caller_ebnf(tools: Sequence[ToolDoc]) -> str:
    """``Action: <tool>\\nAction Input: <JSON object>`` with ``<tool>`` one of ``tools``."""
    if not tools:
        raise ValueError("the caller grammar needs at least one tool")
    names = " | ".join(ebnf_string_literal(tool.Name) for tool in tools)
    return (
        'root ::= "Action: " tool "\\nAction Input: " object\n'
        f"tool ::= {names}\n"
        f"{_JSON_RULES}\n"
    )
