"""Synthetic answers of the SGLang **simulator** for prompts it has no recording of.

The answers are deterministic, valid for the α-UMi role the prompt addresses,
and plainly simulated:

* planner: a short thought naming the first tool and ``Next: caller.`` while the
  history has no observation yet, then ``Next: conclusion.``;
* caller: ``Action: <first tool of the prompt's list>`` with ``Action Input: {}``;
* summarizer: an answer saying it was simulated, quoting the last observation.

When the request carries a constraint the default answer does not satisfy, the
constraint's own example is used instead (see :func:`synthesize`).
"""

from __future__ import annotations

import json

from services.simulator.constraints import Constraint
from services.simulator.replay import detect_role
from shared.prompts import Speaker
from shared.roles import LLMRole

__all__ = ["SyntheticUnavailable", "default_answer", "synthesize"]

_DOC_START = "You have assess to the following apis:\n"
_HISTORY_START = "The conversation history is:\n"
_PLANNER_HISTORY_END = "\nYou are the assistant to plan what to do next"
_CALLER_HISTORY_END = "\nThe thought of this step is:\n"
_TOOL_LIST_START = "should be exactly in ["
_TOOL_LIST_END = "],\nAction Input:"
_OBSERVATION = f"{Speaker.OBSERVATION.value}: "
_TURN_STARTS = tuple(f"{speaker.value}: " for speaker in Speaker if speaker is not Speaker.OBSERVATION)
_QUOTE_CHARS = 200
_SIMULATED_PREFIX = "This answer was simulated by the SGLang simulator (no model was run)"


class SyntheticUnavailable(ValueError):
    """No synthetic answer satisfies the request's constraint."""


def synthesize(prompt: str, constraint: Constraint | None) -> str:
    """The synthetic answer for ``prompt``, made to satisfy ``constraint`` when there is one."""
    answer = default_answer(prompt)
    if constraint is None or constraint.accepts(answer):
        return answer
    example = constraint.example()
    if example is None or not constraint.accepts(example):
        raise SyntheticUnavailable(
            f"the SGLang simulator has no recording for this prompt and could not synthesize "
            f"an answer satisfying the {constraint.kind} constraint"
        )
    return example


def default_answer(prompt: str) -> str:
    """The role-appropriate synthetic answer, before any constraint is applied."""
    role = detect_role(prompt)
    if role is LLMRole.PLANNER:
        return _planner_answer(prompt)
    if role is LLMRole.CALLER:
        return _caller_answer(prompt)
    if role is LLMRole.SUMMARIZER:
        return _summarizer_answer(prompt)
    return "This is a synthetic continuation from the SGLang simulator; no model was run."


def _planner_answer(prompt: str) -> str:
    tools = _documented_tool_names(prompt)
    history = _between(prompt, _HISTORY_START, _PLANNER_HISTORY_END)
    if _OBSERVATION in history or not tools:
        return "I have what I need from the tools to answer the user now.\n Next: conclusion."
    return f'To handle the request I will call the "{tools[0]}" function.\n Next: caller.'


def _caller_answer(prompt: str) -> str:
    listed = _between(prompt, _TOOL_LIST_START, _TOOL_LIST_END, last=True)
    names = [name for name in listed.split(", ") if name] or _documented_tool_names(prompt)
    name = names[0] if names else "unknown_tool"
    return f"Action: {name}\nAction Input: {{}}"


def _summarizer_answer(prompt: str) -> str:
    observation = _last_observation(prompt)
    if observation is None:
        return f"{_SIMULATED_PREFIX}; no tool observation was available."
    if len(observation) > _QUOTE_CHARS:
        observation = observation[:_QUOTE_CHARS] + "..."
    return f"{_SIMULATED_PREFIX}. The last observation was: {observation}"


def _documented_tool_names(prompt: str) -> list[str]:
    """``Name``s of the tool docs in the prompt's ``{doc}`` block (one JSON object per line)."""
    block = _between(prompt, _DOC_START, "\n" + _HISTORY_START)
    names = []
    for line in block.splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("Name"), str):
            names.append(doc["Name"])
    return names


def _last_observation(prompt: str) -> str | None:
    start = prompt.rfind(_OBSERVATION)
    if start == -1:
        return None
    start += len(_OBSERVATION)
    ends = [pos for marker in _TURN_STARTS if (pos := prompt.find(marker, start)) != -1]
    return prompt[start : min(ends) if ends else len(prompt)].strip()


def _between(text: str, start_marker: str, end_marker: str, *, last: bool = False) -> str:
    start = text.rfind(start_marker) if last else text.find(start_marker)
    if start == -1:
        return ""
    start += len(start_marker)
    end = text.find(end_marker, start)
    return text[start : end if end != -1 else len(text)]
