"""The α-UMi wire format: prompt rendering and output parsing, byte-exact.

The released checkpoints only work on the exact text they were trained on, typos
included, so the templates below are the GLPFT training templates verbatim
(``toolbench_planner``, ``toolbench_caller``, ``toolbench_summarizer``). Tests
rebuild every ``input`` of the shipped training files from the raw trajectories.

Usage::

    history = [Turn(speaker=Speaker.USER, value="What's the weather in Paris?")]
    prompt = render_planner_prompt(tools, history)
    decision = parse_planner_output(generated_text)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.roles import LLMRole, StepRole

__all__ = [
    "PLANNER_TEMPLATE",
    "CALLER_TEMPLATE",
    "SUMMARIZER_TEMPLATE",
    "CallerAction",
    "ModelCall",
    "model_calls",
    "NextRole",
    "PlannerDecision",
    "Speaker",
    "ToolDoc",
    "Turn",
    "parse_caller_output",
    "parse_planner_output",
    "normalize_output",
    "normalize_static_output",
    "is_blank_planner_output",
    "BLANK_PLANNER_OUTPUTS",
    "MARKER_PRIORITY",
    "NONE_OUTPUT",
    "PLANNER_MAX_GENERATIONS",
    "render_caller_prompt",
    "render_history",
    "render_planner_prompt",
    "render_summarizer_prompt",
    "render_tool_docs",
    "truncate_observation",
    "MAX_OBSERVATION_CHARS",
    "STOP_SEQUENCE",
]

PLANNER_TEMPLATE = (
    "You have assess to the following apis:\n{doc}\nThe conversation history is:\n{history}\n"
    "You are the assistant to plan what to do next and whether is caller's or conclusion's turn to answer.\n"
    "Answer with a following format:\nThe thought of the next step, followed by Next: caller or conclusion or give up."
)
CALLER_TEMPLATE = (
    "You have assess to the following apis:\n{doc}\nThe conversation history is:\n{history}\n"
    "The thought of this step is:\n{thought}\n"
    "Base on the thought make an api call in the following format:\n"
    "Action: the name of api that should be called in this step, should be exactly in [{tool_names}],\n"
    "Action Input: the api call request."
)
SUMMARIZER_TEMPLATE = "Make a conclusion based on the conversation history:\n{history}"

PLANNER_SUFFIX = " assistant: "
CALLER_SUFFIX = " caller: "
SUMMARIZER_SUFFIX = " conclusion: "

#: Every α-UMi turn ends with the Llama-2 end-of-sequence text; generation stops there.
STOP_SEQUENCE = "</s>"
MAX_OBSERVATION_CHARS = 1024


class Speaker(StrEnum):
    """The ``from`` field of an α-UMi conversation turn."""

    USER = "user"
    ASSISTANT = "assistant"  # the planner
    CALLER = "caller"
    OBSERVATION = "observation"
    CONCLUSION = "conclusion"  # the summarizer

    @classmethod
    def for_step(cls, role: StepRole) -> Speaker:
        """The conversation speaker that a stored step of ``role`` renders as."""
        return _SPEAKER_BY_ROLE[role]

    @property
    def step_role(self) -> StepRole:
        """The role of the stored step this speaker's turn becomes."""
        return _ROLE_BY_SPEAKER[self]


_SPEAKER_BY_ROLE = {
    StepRole.USER: Speaker.USER,
    StepRole.PLANNER: Speaker.ASSISTANT,
    StepRole.CALLER: Speaker.CALLER,
    StepRole.TOOLS: Speaker.OBSERVATION,
    StepRole.SUMMARIZER: Speaker.CONCLUSION,
}
_ROLE_BY_SPEAKER = {speaker: role for role, speaker in _SPEAKER_BY_ROLE.items()}


class ToolDoc(BaseModel):
    """A compact ToolBench tool doc as α-UMi shows it to the models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    Name: str = Field(min_length=1, max_length=256)
    function: str
    input: dict[str, Any] = Field(default_factory=dict)

    @field_validator("Name")
    @classmethod
    def _name_is_one_line(cls, value: str) -> str:
        if value != value.strip() or "\n" in value or "," in value:
            raise ValueError("tool Name must not contain commas, newlines or surrounding spaces")
        return value

    def rendered(self) -> str:
        """``json.dumps`` with Python's defaults, as the training data was built."""
        return json.dumps({"Name": self.Name, "function": self.function, "input": self.input})


class Turn(BaseModel):
    """One turn of an α-UMi conversation (``{"from", "value"}`` in the data files)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    speaker: Speaker = Field(alias="from")
    value: str


def render_tool_docs(tools: Sequence[ToolDoc]) -> str:
    """The ``{doc}`` block: one JSON line per tool, each followed by a newline."""
    return "".join(tool.rendered() + "\n" for tool in tools)


def render_history(turns: Iterable[Turn]) -> str:
    """The ``{history}`` block: ``role: value</s>`` per turn, observations without ``</s>``."""
    parts = []
    for turn in turns:
        if turn.speaker is Speaker.OBSERVATION:
            parts.append(f"observation: {turn.value}")
        else:
            parts.append(f"{turn.speaker.value}: {turn.value}{STOP_SEQUENCE}")
    return "".join(parts)


def _fill(template: str, *, tools: Sequence[ToolDoc], history: Sequence[Turn], thought: str | None = None) -> str:
    # Plain replacement in this order (doc, tool_names, history, thought), exactly as
    # the reference code does; the order matters when a value contains braces.
    text = template.replace("{doc}", render_tool_docs(tools))
    text = text.replace("{tool_names}", ", ".join(tool.Name for tool in tools))
    text = text.replace("{history}", render_history(history))
    if thought is not None:
        text = text.replace("{thought}", thought)
    return text


def render_planner_prompt(tools: Sequence[ToolDoc], history: Sequence[Turn]) -> str:
    """The planner's model input for the next step after ``history``."""
    return _fill(PLANNER_TEMPLATE, tools=tools, history=history) + PLANNER_SUFFIX


def render_caller_prompt(tools: Sequence[ToolDoc], history: Sequence[Turn]) -> str:
    """The caller's model input; ``history`` ends with the planner turn whose thought it acts on."""
    thought = _last_planner_thought(history)
    return _fill(CALLER_TEMPLATE, tools=tools, history=history, thought=thought) + CALLER_SUFFIX


def render_summarizer_prompt(history: Sequence[Turn]) -> str:
    """The summarizer's model input; ``history`` ends with the planner's conclusion turn."""
    _last_planner_thought(history)
    return _fill(SUMMARIZER_TEMPLATE, tools=(), history=history) + SUMMARIZER_SUFFIX


def _last_planner_thought(history: Sequence[Turn]) -> str:
    if not history or history[-1].speaker is not Speaker.ASSISTANT:
        raise ValueError("the caller and summarizer history must end with the planner (assistant) turn")
    return history[-1].value


class NextRole(StrEnum):
    """Who acts after a planner step."""

    CALLER = "caller"
    CONCLUSION = "conclusion"
    GIVE_UP = "give up"

    @property
    def marker(self) -> str:
        return f"Next: {self.value}."


class PlannerDecision(BaseModel):
    """A parsed planner output: the text kept in the history and who acts next."""

    text: str
    next: NextRole
    marker_found: bool


#: The reference checks the markers in this order, not by position: an output holding
#: ``Next: caller.`` and later ``Next: give up.`` gives up (``collab_agent_model.py``).
MARKER_PRIORITY = (NextRole.GIVE_UP, NextRole.CONCLUSION, NextRole.CALLER)
#: Planner outputs the reference generates again (after normalising): empty, ``.`` or ``,``.
BLANK_PLANNER_OUTPUTS = frozenset({"", ".", ","})
#: How many planner generations the reference makes before it settles for :data:`NONE_OUTPUT`.
PLANNER_MAX_GENERATIONS = 5
#: What the reference keeps when every generation was blank.
NONE_OUTPUT = "none"


def normalize_output(role: LLMRole, generated: str) -> str:
    """A model output as the real-API reference keeps it (``collab_agent_model.py``).

    Every role's output is stripped of surrounding whitespace (SGLang decodes the first
    output token together with the prompt's last ones, so real checkpoints answer with a
    leading space); a planner output then loses a leading ``": "``.
    """
    text = generated.strip()
    if role is LLMRole.PLANNER and text.startswith(": "):
        text = text[2:]
    return text


def is_blank_planner_output(normalized: str) -> bool:
    """Whether the reference would ask the planner again for this (normalised) output."""
    return normalized.strip() in BLANK_PLANNER_OUTPUTS


def normalize_static_output(generated: str) -> str:
    """A model output as the static evaluation keeps it (GLPFT ``infer_pipeline.py``).

    No stripping there: a leading ``": "`` is dropped and a blank output becomes ``none``.
    """
    text = generated[2:] if generated.startswith(": ") else generated
    return NONE_OUTPUT if text.strip() in BLANK_PLANNER_OUTPUTS else text


def parse_planner_output(generated: str) -> PlannerDecision:
    """Cut after the planner's ``Next:`` marker; without one, α-UMi defaults to the caller.

    As the reference: the markers are looked for in :data:`MARKER_PRIORITY` order and the
    text is cut after the first occurrence of the one found; with none, ``" Next: caller."``
    is appended.
    """
    for role in MARKER_PRIORITY:
        pos = generated.find(role.marker)
        if pos != -1:
            return PlannerDecision(text=generated[: pos + len(role.marker)], next=role, marker_found=True)
    return PlannerDecision(text=generated + " " + NextRole.CALLER.marker, next=NextRole.CALLER, marker_found=False)


class CallerAction(BaseModel):
    """A parsed caller output."""

    action: str
    action_input: str


def parse_caller_output(generated: str) -> CallerAction:
    """Action: text after the last ``Action:`` up to ``Action Input:``; input after the last ``Action Input:``."""
    input_pos = generated.rfind("Action Input:")
    action_input = generated[input_pos + len("Action Input:") :].strip() if input_pos != -1 else "{}"
    head = generated[:input_pos] if input_pos != -1 else generated
    action_pos = head.rfind("Action:")
    action = head[action_pos + len("Action:") :].strip() if action_pos != -1 else ""
    return CallerAction(action=action, action_input=action_input or "{}")


def truncate_observation(observation: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """ToolBench's ``truncate`` compression: the first ``limit`` characters plus ``...``."""
    if len(observation) > limit:
        return observation[:limit] + "..."
    return observation


class ModelCall(BaseModel):
    """One model call of a recorded trajectory: the exact prompt and the recorded continuation."""

    role: LLMRole
    prompt: str
    continuation: str


def model_calls(tools: Sequence[ToolDoc], turns: Sequence[Turn]) -> Iterator[ModelCall]:
    """Every planner, caller and summarizer call a trajectory implies, in order.

    Each assistant turn is a planner call on the history before it; a following
    caller (conclusion) turn is a caller (summarizer) call on the history that
    ends with that assistant turn — exactly how GLPFT builds its training inputs.
    """
    for i, turn in enumerate(turns):
        if turn.speaker is not Speaker.ASSISTANT:
            continue
        yield ModelCall(role=LLMRole.PLANNER, prompt=render_planner_prompt(tools, turns[:i]), continuation=turn.value)
        following = turns[i + 1] if i + 1 < len(turns) else None
        if following is not None and following.speaker is Speaker.CALLER and tools:
            prompt = render_caller_prompt(tools, turns[: i + 1])
            yield ModelCall(role=LLMRole.CALLER, prompt=prompt, continuation=following.value)
        elif following is not None and following.speaker is Speaker.CONCLUSION:
            prompt = render_summarizer_prompt(turns[: i + 1])
            yield ModelCall(role=LLMRole.SUMMARIZER, prompt=prompt, continuation=following.value)
