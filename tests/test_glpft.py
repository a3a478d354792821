"""GLPFT export: the shipped α-UMi training files are rebuilt from raw_data_stage_2.json, plus the exclusion rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from evaluation.glpft import (
    GLPFT_FILES,
    GLPFTDataset,
    Trajectory,
    build_glpft,
    read_glpft,
    render_backbone_prompt,
    write_glpft,
)
from shared.prompts import Speaker, ToolDoc, Turn, render_caller_prompt, render_history, render_summarizer_prompt
from tests.conftest import TRAIN_DIR, load_trajectories

GIVE_UP_TARGET_END = "\nconclusion: give up."
DATASET = build_glpft(load_trajectories())


def _shipped(role: str) -> list[dict[str, Any]]:
    return json.loads((TRAIN_DIR / GLPFT_FILES[role]).read_text())


def _dumped(dataset: GLPFTDataset, role: str) -> list[dict[str, Any]]:
    return [record.model_dump() for record in getattr(dataset, role)]


# --- the shipped example files ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["planner", "caller", "summarizer"])
def test_role_files_are_reproduced_exactly(role: str) -> None:
    assert _dumped(DATASET, role) == _shipped(role)


def test_backbone_caller_and_conclusion_records_are_reproduced_exactly() -> None:
    mine, shipped = _dumped(DATASET, "backbone"), _shipped("backbone")
    assert len(mine) == len(shipped)
    compared = 0
    for index, (ours, theirs) in enumerate(zip(mine, shipped, strict=True)):
        if not theirs["target"].endswith(GIVE_UP_TARGET_END):
            assert ours == theirs, f"backbone record {index} differs"
            compared += 1
    assert compared == 59 + 14  # every caller step and every conclusion step


def _history_section(prompt: str) -> tuple[str, str, str]:
    """A backbone prompt split into (text before, history, text after)."""
    head, rest = prompt.split("The conversation history is:\n", 1)
    history, tail = rest.rsplit("\nYou should answer the action of next step", 1)
    return head, history, tail


def test_backbone_give_up_records_use_their_own_prompt_not_the_previous_steps() -> None:
    mine, shipped = _dumped(DATASET, "backbone"), _shipped("backbone")
    give_ups = [i for i, record in enumerate(shipped) if record["target"].endswith(GIVE_UP_TARGET_END)]
    assert len(give_ups) == 6
    for index in give_ups:
        ours, theirs, previous = mine[index], shipped[index], shipped[index - 1]
        assert (ours["tools"], ours["history"], ours["target"]) == (theirs["tools"], theirs["history"], theirs["target"])
        # The reference bug: the shipped give-up prompt is the previous step's prompt, verbatim.
        assert theirs["input"] == previous["input"]
        assert ours["input"] != theirs["input"]
        # Ours is the previous prompt with the history carried forward to the give-up step: the previous
        # folded step, then the user turns and observations that came after its caller turn.
        head, history, tail = _history_section(ours["input"])
        prev_head, prev_history, prev_tail = _history_section(previous["input"])
        assert (head, tail) == (prev_head, prev_tail)
        later = [Turn.model_validate(t) for t in theirs["history"][len(previous["history"]) + 2 :]]
        assert all(turn.speaker in (Speaker.USER, Speaker.OBSERVATION) for turn in later)
        assert history == prev_history + f"assistant: {previous['target']}</s>" + render_history(later)


def test_written_role_files_match_the_shipped_bytes_and_read_back(tmp_path: Path) -> None:
    paths = write_glpft(DATASET, tmp_path / "out")
    assert {path.name for path in paths.values()} == set(GLPFT_FILES.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(GLPFT_FILES.values())  # no temp files left
    for role in ("planner", "caller", "summarizer"):
        assert paths[role].read_bytes() == (TRAIN_DIR / GLPFT_FILES[role]).read_bytes()
    assert read_glpft(tmp_path / "out") == DATASET


def test_reading_the_shipped_files_gives_the_same_layout() -> None:
    shipped = read_glpft(TRAIN_DIR)
    assert shipped.planner == DATASET.planner
    assert len(shipped.backbone) == len(DATASET.backbone)


def test_trajectory_models_and_dicts_give_the_same_dataset() -> None:
    raw = load_trajectories()[:3]
    assert build_glpft(Trajectory.model_validate(item) for item in raw) == build_glpft(raw)


def test_unknown_speakers_are_rejected() -> None:
    with pytest.raises(ValidationError):
        build_glpft([{"tools": [], "instruction": "q", "conversations": [{"from": "system", "value": "x"}]}])


# --- exclusion rules on small synthetic trajectories -----------------------------------------

TOOLS = [{"Name": "search_for_x", "function": "Search x.", "input": {"q": "string, "}}]
TOOL_DOCS = [ToolDoc.model_validate(tool) for tool in TOOLS]
GOOD_CALL = 'Action: search_for_x\nAction Input: {"q": "a"}'


def _trajectory(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"tools": TOOLS, "instruction": turns[0][1], "conversations": [{"from": f, "value": v} for f, v in turns]}


def _turns(*turns: tuple[str, str]) -> list[Turn]:
    return [Turn.model_validate({"from": f, "value": v}) for f, v in turns]


def _targets(dataset: GLPFTDataset) -> dict[str, list[str]]:
    return {role: [record.target for record in records] for role, records in dataset.by_role().items()}


@pytest.mark.parametrize(
    "bad_call",
    ["Action: made_up_tool\nAction Input: {}", "Action: invalid_hallucination_function_name\nAction Input: {}"],
)
def test_a_call_naming_a_missing_tool_is_excluded_with_its_planner_step(bad_call: str) -> None:
    turns = (
        ("user", "q"),
        ("assistant", "Search. Next: caller."),
        ("caller", bad_call),
        ("observation", "no such tool"),
        ("assistant", "Retry. Next: caller."),
        ("caller", GOOD_CALL),
        ("observation", "found"),
        ("assistant", "Done. Next: conclusion."),
        ("conclusion", "A"),
    )
    dataset = build_glpft([_trajectory(*turns)])
    assert _targets(dataset) == {
        "planner": ["Retry. Next: caller.", "Done. Next: conclusion."],
        "caller": [GOOD_CALL],
        "summarizer": ["A"],
        # the reference backbone does not exclude hallucinated calls
        "backbone": ["Search.\n" + bad_call, "Retry.\n" + GOOD_CALL, "Done.\nconclusion: A"],
    }
    (caller,) = dataset.caller
    # The caller prompt leaves the hallucinated call out; the record's raw history keeps every turn.
    assert caller.input == render_caller_prompt(TOOL_DOCS, _turns(*turns[:2], *turns[3:5]))
    assert caller.history == _trajectory(*turns)["conversations"][:5]
    # Planner and summarizer histories keep it.
    assert f"caller: {bad_call}</s>" in dataset.planner[0].input
    assert f"caller: {bad_call}</s>" in dataset.summarizer[0].input


def test_a_given_up_trajectory_is_kept_and_its_give_up_prompt_is_its_own() -> None:
    turns = (
        ("user", "q"),
        ("assistant", "Search. Next: caller."),
        ("caller", GOOD_CALL),
        ("observation", "error"),
        ("assistant", "Cannot do it. Next: give up."),
    )
    dataset = build_glpft([_trajectory(*turns)])
    assert _targets(dataset) == {
        "planner": ["Search. Next: caller.", "Cannot do it. Next: give up."],
        "caller": [GOOD_CALL],
        "summarizer": [],
        "backbone": ["Search.\n" + GOOD_CALL, "Cannot do it.\nconclusion: give up."],
    }
    folded = _turns(("user", "q"), ("assistant", "Search.\n" + GOOD_CALL), ("observation", "error"))
    assert dataset.backbone[1].input == render_backbone_prompt(TOOL_DOCS, folded)
    assert dataset.backbone[1].input != dataset.backbone[0].input
    assert "observation: error\nYou should answer the action of next step" in dataset.backbone[1].input


def test_a_give_up_as_the_first_decision_is_prompted_with_its_own_trajectory() -> None:
    other = _trajectory(("user", "other"), ("assistant", "Search. Next: caller."), ("caller", GOOD_CALL))
    dataset = build_glpft([other, _trajectory(("user", "q"), ("assistant", "No tool fits. Next: give up."))])
    assert dataset.backbone[-1].input == render_backbone_prompt(TOOL_DOCS, _turns(("user", "q")))
    assert dataset.backbone[-1].target == "No tool fits.\nconclusion: give up."


def test_a_conclusion_without_final_answer_gets_no_summarizer_record() -> None:
    turns = (
        ("user", "q"),
        ("assistant", "First. Next: conclusion."),
        ("conclusion", "none"),
        ("user", "This is not the first time you try this task, all previous trails failed."),
        ("assistant", "Second. Next: conclusion."),
        ("conclusion", "Answer"),
    )
    dataset = build_glpft([_trajectory(*turns)])
    assert _targets(dataset) == {
        "planner": ["First. Next: conclusion.", "Second. Next: conclusion."],
        "caller": [],
        "summarizer": ["Answer"],
        "backbone": ["First.\nconclusion: none", "Second.\nconclusion: Answer"],
    }
    kept = _turns(*turns[:2], *turns[3:5])
    assert dataset.summarizer[0].input == render_summarizer_prompt(kept)
    assert "conclusion: none</s>" in dataset.planner[1].input


def test_plain_planner_thoughts_are_history_only() -> None:
    turns = (
        ("user", "q"),
        ("assistant", "Let me think."),
        ("user", "This is not the first time you try this task, all previous trails failed."),
        ("assistant", "Search. Next: caller."),
        ("caller", GOOD_CALL),
        ("observation", "found"),
        ("assistant", "Done. Next: conclusion."),
        ("conclusion", "A"),
    )
    dataset = build_glpft([_trajectory(*turns)])
    assert _targets(dataset)["planner"] == ["Search. Next: caller.", "Done. Next: conclusion."]
    assert len(dataset.backbone) == 2
    assert "assistant: Let me think.</s>" in dataset.planner[0].input
    assert "assistant: Let me think.</s>" in dataset.backbone[0].input


def test_malformed_turns_yield_no_records() -> None:
    dangling_thought = _trajectory(("user", "q"), ("assistant", "Hmm"))
    orphan_call = _trajectory(("user", "q"), ("caller", GOOD_CALL), ("observation", "x"), ("conclusion", "A"))
    assert _targets(build_glpft([dangling_thought, orphan_call])) == {
        "backbone": [],
        "planner": [],
        "caller": [],
        "summarizer": [],
    }
