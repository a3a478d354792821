"""The α-UMi wire format, checked against the shipped GLPFT training files byte for byte."""

from __future__ import annotations

import json

import pytest

from shared.prompts import (
    NextRole,
    Speaker,
    ToolDoc,
    Turn,
    model_calls,
    parse_caller_output,
    parse_planner_output,
    render_caller_prompt,
    render_history,
    render_planner_prompt,
    truncate_observation,
)
from tests.conftest import TRAIN_DIR, load_trajectories


def _rebuilt_inputs() -> dict[str, list[str]]:
    """Every planner/caller/summarizer input derivable from raw_data_stage_2.json."""
    inputs: dict[str, list[str]] = {"planner": [], "caller": [], "summarizer": []}
    for record in load_trajectories():
        tools = [ToolDoc.model_validate(t) for t in record["tools"]]
        turns = [Turn.model_validate(c) for c in record["conversations"]]
        for call in model_calls(tools, turns):
            inputs[call.role.value].append(call.prompt)
    return inputs


REBUILT = _rebuilt_inputs()


@pytest.mark.parametrize("role", ["planner", "caller", "summarizer"])
def test_every_training_input_is_rebuilt_byte_for_byte(role: str) -> None:
    shipped = [r["input"] for r in json.loads((TRAIN_DIR / f"train_{role}.json").read_text())]
    assert len(REBUILT[role]) == len(shipped)
    for index, (mine, theirs) in enumerate(zip(REBUILT[role], shipped, strict=True)):
        assert mine == theirs, f"{role} record {index} differs"


def test_history_renders_observations_without_end_of_sequence() -> None:
    turns = [
        Turn(speaker=Speaker.USER, value="q"),
        Turn(speaker=Speaker.ASSISTANT, value="t Next: caller."),
        Turn(speaker=Speaker.CALLER, value="Action: a\nAction Input: {}"),
        Turn(speaker=Speaker.OBSERVATION, value="obs"),
    ]
    assert render_history(turns) == (
        "user: q</s>assistant: t Next: caller.</s>caller: Action: a\nAction Input: {}</s>observation: obs"
    )


def test_placeholders_are_filled_in_order_so_braces_in_values_survive() -> None:
    tools = [ToolDoc(Name="t", function="uses {history} literally", input={})]
    prompt = render_planner_prompt(tools, [Turn(speaker=Speaker.USER, value="say {doc}")])
    # {doc} is replaced first, so the tool doc's literal "{history}" is then filled with the history.
    assert '"function": "uses user: say {doc}</s> literally"' in prompt
    assert prompt.endswith("or give up. assistant: ")


def test_tool_docs_use_python_json_defaults_with_ascii_escaping() -> None:
    tool = ToolDoc(Name="café_for_x", function="naïve", input={"q": "string, "})
    assert tool.rendered() == '{"Name": "caf\\u00e9_for_x", "function": "na\\u00efve", "input": {"q": "string, "}}'


@pytest.mark.parametrize(
    ("generated", "text", "next_role"),
    [
        ("Look it up.\n Next: caller.", "Look it up.\n Next: caller.", NextRole.CALLER),
        ("Done. Next: conclusion. trailing junk Next: caller.", "Done. Next: conclusion.", NextRole.CONCLUSION),
        (" Next: give up.", " Next: give up.", NextRole.GIVE_UP),
        ("no marker at all", "no marker at all Next: caller.", NextRole.CALLER),
    ],
)
def test_planner_output_is_cut_after_the_first_marker(generated: str, text: str, next_role: NextRole) -> None:
    decision = parse_planner_output(generated)
    assert (decision.text, decision.next) == (text, next_role)


def test_caller_output_takes_the_last_action_and_input() -> None:
    parsed = parse_caller_output('Action: a\nAction: b_for_x\nAction Input: {\n  "q": 1\n}')
    assert parsed.action == "b_for_x"
    assert json.loads(parsed.action_input) == {"q": 1}
    assert parse_caller_output("Action: only_name").action_input == "{}"


def test_observations_are_truncated_to_1024_characters_plus_ellipsis() -> None:
    assert truncate_observation("x" * 1024) == "x" * 1024
    assert truncate_observation("x" * 1025) == "x" * 1024 + "..."


def test_caller_prompt_requires_the_planner_turn_last() -> None:
    with pytest.raises(ValueError, match="must end with the planner"):
        render_caller_prompt([ToolDoc(Name="t", function="f")], [Turn(speaker=Speaker.USER, value="q")])
