"""GLPFT training-data export: α-UMi trajectories → ``train_{backbone,planner,caller,summarizer}.json``.

α-UMi fine-tunes its models with GLPFT on four files derived from the same trajectories
(``{"tools", "instruction", "conversations": [{"from", "value"}]}``). Each file is a JSON list of
``{"tools", "history", "input", "target"}`` records: ``tools`` are the trajectory's compact tool docs,
``history`` the raw conversation turns before the record's turn, ``input`` the exact model prompt
and ``target`` the text the model learns to produce. This module rebuilds them with the same rules
as the α-UMi preprocessing (``GLPFT/process_data/toolbench/prepro_{backbone,planner,caller,summarizer}.py``
of X-PLUG/Multi-LLM-Agent); the planner, caller and summarizer prompts come from
:mod:`shared.prompts`, so they are the byte-exact wire format the served models see.

Usage::

    dataset = build_glpft(json.loads(Path("raw_data_stage_2.json").read_text()))
    write_glpft(dataset, Path("out"))

Records per role (one per turn, in conversation order, trajectories in input order):

- **planner** — one per planner (``assistant``) turn that is a decision point: its value contains
  ``Next: give up.`` or the next turn is a ``caller`` or ``conclusion`` turn. Input: planner prompt on
  all turns before it; target: the planner turn verbatim. Plain planner turns (followed by a user,
  an observation or nothing, without a give-up) are history only.
- **caller** — one per ``caller`` turn that follows a planner turn. Input: caller prompt whose history
  ends with that planner turn (its value is the ``{thought}``); target: the caller turn verbatim.
- **summarizer** — one per ``conclusion`` turn that follows a planner turn. Input: summarizer prompt
  on the turns before it; target: the final answer.
- **backbone** (the single-LLM baseline, template ``toolbench_backbone``) — one per decision point.
  Caller and conclusion turns are folded into the planner turn they follow, with its marker removed:
  target ``<thought>\\n<caller value>``, ``<thought>\\nconclusion: <answer>`` or
  ``<thought>\\nconclusion: give up.``; the backbone history is built from these folded turns plus the
  user turns and observations.

Exclusions (all as in the α-UMi preprocessing unless marked):

- *Hallucinated calls* (``prepro_caller.py``, ``prepro_planner.py``): a caller turn that names no
  existing tool gets no caller record, **and** the planner turn right before it gets no planner
  record; the caller prompts of later turns leave that caller turn out of their history (the planner
  and summarizer histories keep it). The reference recognises such a turn by ToolBench's placeholder
  ``invalid_hallucination_function_name``; this module also treats a caller turn as hallucinated
  when its parsed action (:func:`shared.prompts.parse_caller_output`) is not one of the trajectory's
  tool ``Name``\\ s (*generalisation*: trajectories recorded by this product keep the name the model
  produced). Neither occurs in the shipped example data. ``prepro_backbone.py`` does not exclude
  them, and neither does this module.
- *Missing final answers* (``prepro_summarizer.py``): a conclusion whose value is ``none`` (what
  ``prepro_raw_stage_2.py`` writes when the ToolBench ``Finish`` call had no ``final_answer``) gets
  no summarizer record and is left out of later summarizer histories. The planner, caller and
  backbone files keep it.
- *Failed (given-up) trajectories are not excluded*: the only trajectory-level filter of the α-UMi
  pipeline is upstream (``prepro_raw_stage_1.py`` keeps ToolBench answers that have
  ``train_messages`` and are not test queries). A give-up planner turn is a planner (and backbone)
  training sample, so the models learn when to give up.
- *Malformed turns* (deviation, never in the shipped data): a caller or conclusion turn that does not
  follow a planner turn yields no record (the reference would take the previous turn, whatever it
  is, as the thought); a final planner turn without a marker is history only (the reference crashes).

Deliberate difference from the reference — backbone give-up prompts: ``prepro_backbone.py`` fills a
give-up record's ``input`` from a variable left over from the previous caller/conclusion step, so
the shipped give-up records carry the *previous* step's prompt (or another trajectory's, for a
give-up that is a trajectory's first decision). This module renders the give-up prompt from the
history at the give-up step itself; ``history`` and ``target`` are as in the reference. All other
backbone records are identical to the reference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.prompts import (
    NextRole,
    Speaker,
    ToolDoc,
    Turn,
    parse_caller_output,
    render_caller_prompt,
    render_history,
    render_planner_prompt,
    render_summarizer_prompt,
    render_tool_docs,
)

__all__ = [
    "BACKBONE_TEMPLATE",
    "GLPFT_FILES",
    "HALLUCINATION_MARKER",
    "NO_FINAL_ANSWER",
    "GLPFTDataset",
    "TrainingRecord",
    "Trajectory",
    "backbone_records",
    "build_glpft",
    "caller_records",
    "is_hallucinated_call",
    "planner_records",
    "read_glpft",
    "render_backbone_prompt",
    "summarizer_records",
    "write_glpft",
]

#: GLPFT's ``toolbench_backbone`` prompt (the single-LLM baseline), verbatim, trailing newline included.
BACKBONE_TEMPLATE = (
    "You have assess to the following apis:\n{doc}\nThe conversation history is:\n{history}\n"
    "You should answer the action of next step in the following format:\n"
    "The thought to solve the question,\n"
    "Action: the name of api that should be called in this step, should be exactly in [{tool_names}],\n"
    "Action Input: the api call request.\n"
    "Once you think the question is finished, output conclusion: the final answer of the question "
    "or give up if you think you cannot answer this question.\n"
)
BACKBONE_SUFFIX = " assistant: "

#: ToolBench's stand-in for a function name the model made up.
HALLUCINATION_MARKER = "invalid_hallucination_function_name"
#: The conclusion value ``prepro_raw_stage_2.py`` writes when no final answer could be extracted.
NO_FINAL_ANSWER = "none"

#: Output file name per role, as GLPFT's ``prepro_toolbench.sh`` names them.
GLPFT_FILES: dict[str, str] = {
    "backbone": "train_backbone.json",
    "planner": "train_planner.json",
    "caller": "train_caller.json",
    "summarizer": "train_summarizer.json",
}


class Trajectory(BaseModel):
    """One α-UMi trajectory, the layout of ``raw_data_stage_2.json``."""

    model_config = ConfigDict(frozen=True)

    tools: list[ToolDoc]
    instruction: str = ""
    conversations: list[Turn] = Field(min_length=1)

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tool docs as the plain dicts a training record carries."""
        return [tool.model_dump() for tool in self.tools]

    def history_dicts(self, end: int) -> list[dict[str, str]]:
        """The raw turns before index ``end`` as ``{"from", "value"}`` dicts."""
        return [turn.model_dump(mode="json", by_alias=True) for turn in self.conversations[:end]]


class TrainingRecord(BaseModel):
    """One GLPFT training sample (``{"tools", "history", "input", "target"}``)."""

    tools: list[dict[str, Any]]
    history: list[dict[str, str]]
    input: str
    target: str


class GLPFTDataset(BaseModel):
    """The four GLPFT training sets derived from the same trajectories."""

    backbone: list[TrainingRecord] = Field(default_factory=list)
    planner: list[TrainingRecord] = Field(default_factory=list)
    caller: list[TrainingRecord] = Field(default_factory=list)
    summarizer: list[TrainingRecord] = Field(default_factory=list)

    def by_role(self) -> dict[str, list[TrainingRecord]]:
        """The record lists keyed by role, in :data:`GLPFT_FILES` order."""
        return {role: getattr(self, role) for role in GLPFT_FILES}


TrajectoryLike = Trajectory | Mapping[str, Any]


def build_glpft(trajectories: Iterable[TrajectoryLike]) -> GLPFTDataset:
    """All four training sets, records in trajectory order then conversation order."""
    dataset = GLPFTDataset()
    for item in trajectories:
        trajectory = item if isinstance(item, Trajectory) else Trajectory.model_validate(item)
        dataset.backbone.extend(backbone_records(trajectory))
        dataset.planner.extend(planner_records(trajectory))
        dataset.caller.extend(caller_records(trajectory))
        dataset.summarizer.extend(summarizer_records(trajectory))
    return dataset


def write_glpft(dataset: GLPFTDataset, out_dir: Path) -> dict[str, Path]:
    """Write the four ``train_*.json`` files (``indent=2``, ASCII-escaped, as GLPFT writes them).

    Each file is written to a temporary name and renamed into place. Returns the paths by role.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for role, records in dataset.by_role().items():
        path = out_dir / GLPFT_FILES[role]
        _write_atomically(path, json.dumps([record.model_dump() for record in records], indent=2))
        paths[role] = path
    return paths


def read_glpft(directory: Path) -> GLPFTDataset:
    """Load the four ``train_*.json`` files written by :func:`write_glpft` (or by GLPFT itself)."""
    lists = {role: json.loads((directory / name).read_text(encoding="utf-8")) for role, name in GLPFT_FILES.items()}
    return GLPFTDataset.model_validate(lists)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_hallucinated_call(value: str, tool_names: Iterable[str]) -> bool:
    """Whether a caller turn names no existing tool (ToolBench's placeholder or an unknown name)."""
    return HALLUCINATION_MARKER in value or parse_caller_output(value).action not in set(tool_names)


def _following(turns: Sequence[Turn], index: int) -> Turn | None:
    return turns[index + 1] if index + 1 < len(turns) else None


def _follows_planner(turns: Sequence[Turn], index: int) -> bool:
    return index > 0 and turns[index - 1].speaker is Speaker.ASSISTANT


def _record(trajectory: Trajectory, index: int, prompt: str, target: str) -> TrainingRecord:
    return TrainingRecord(
        tools=trajectory.tool_dicts(), history=trajectory.history_dicts(index), input=prompt, target=target
    )


def planner_records(trajectory: Trajectory) -> list[TrainingRecord]:
    """Planner samples: each decision point, unless the call it leads to is hallucinated."""
    turns, names = trajectory.conversations, [tool.Name for tool in trajectory.tools]
    records: list[TrainingRecord] = []
    for i, turn in enumerate(turns):
        if turn.speaker is not Speaker.ASSISTANT:
            continue
        following = _following(turns, i)
        next_speaker = following.speaker if following is not None else None
        if following is not None and next_speaker is Speaker.CALLER and is_hallucinated_call(following.value, names):
            continue
        if NextRole.GIVE_UP.marker in turn.value or next_speaker in (Speaker.CALLER, Speaker.CONCLUSION):
            records.append(_record(trajectory, i, render_planner_prompt(trajectory.tools, turns[:i]), turn.value))
    return records


def caller_records(trajectory: Trajectory) -> list[TrainingRecord]:
    """Caller samples; hallucinated calls get none and vanish from later caller histories."""
    turns, names = trajectory.conversations, [tool.Name for tool in trajectory.tools]
    records: list[TrainingRecord] = []
    kept: list[Turn] = []
    for i, turn in enumerate(turns):
        if turn.speaker is Speaker.CALLER:
            if is_hallucinated_call(turn.value, names):
                continue
            if _follows_planner(turns, i):
                records.append(_record(trajectory, i, render_caller_prompt(trajectory.tools, kept), turn.value))
        kept.append(turn)
    return records


def summarizer_records(trajectory: Trajectory) -> list[TrainingRecord]:
    """Summarizer samples; conclusions without a final answer get none and vanish from later histories."""
    turns = trajectory.conversations
    records: list[TrainingRecord] = []
    kept: list[Turn] = []
    for i, turn in enumerate(turns):
        if turn.speaker is Speaker.CONCLUSION:
            if turn.value == NO_FINAL_ANSWER:
                continue
            if _follows_planner(turns, i):
                records.append(_record(trajectory, i, render_summarizer_prompt(kept), turn.value))
        kept.append(turn)
    return records


def render_backbone_prompt(tools: Sequence[ToolDoc], history: Sequence[Turn]) -> str:
    """The backbone model input; ``history`` holds folded planner turns, user turns and observations."""
    text = BACKBONE_TEMPLATE.replace("{doc}", render_tool_docs(tools))
    text = text.replace("{tool_names}", ", ".join(tool.Name for tool in tools))
    text = text.replace("{history}", render_history(history))
    return text + BACKBONE_SUFFIX


def _backbone_target(turn: Turn, following: Turn | None) -> str | None:
    """The folded backbone step for a planner turn, or ``None`` when it is no decision point."""
    value = turn.value
    if NextRole.GIVE_UP.marker in value:
        return value.replace(NextRole.GIVE_UP.marker, "").strip() + "\nconclusion: give up."
    if following is not None and following.speaker is Speaker.CALLER:
        return value.replace(NextRole.CALLER.marker, "").strip() + "\n" + following.value
    if following is not None and following.speaker is Speaker.CONCLUSION:
        return value.replace(NextRole.CONCLUSION.marker, "").strip() + "\nconclusion: " + following.value
    return None


def backbone_records(trajectory: Trajectory) -> list[TrainingRecord]:
    """Single-LLM samples: one per decision point, give-ups prompted with their own history."""
    turns = trajectory.conversations
    records: list[TrainingRecord] = []
    history: list[Turn] = []
    for i, turn in enumerate(turns):
        if turn.speaker in (Speaker.USER, Speaker.OBSERVATION):
            history.append(turn)
        elif turn.speaker is Speaker.ASSISTANT:
            target = _backbone_target(turn, _following(turns, i))
            if target is None:
                history.append(turn)
                continue
            records.append(_record(trajectory, i, render_backbone_prompt(trajectory.tools, history), target))
            history.append(Turn(speaker=Speaker.ASSISTANT, value=target))
        # caller and conclusion turns are already folded into the planner turn before them
    return records
