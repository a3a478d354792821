"""Recorded answers for the SGLang **simulator**: exact prompt -> recorded continuation.

Two record shapes are indexed (a JSON list, or JSON Lines, of either):

* α-UMi trajectories ``{"tools": [...], "conversations": [{"from", "value"}, ...]}``
  (``raw_data_stage_*.json``, the static test sets). Every decision point is
  rendered with :mod:`shared.prompts` — exactly the text the product sends — so
  for each planner turn at index ``i``: the planner prompt for ``turns[:i]``
  answers ``turns[i]``; a following caller turn answers the caller prompt for
  ``turns[:i+1]``; a following conclusion turn answers the summarizer prompt.
* GLPFT training records ``{"input", "target"}`` (``train_*.json``): the prompt
  is ``input``, the continuation ``target``.

The role of a prompt is read from its suffix (``" assistant: "`` planner,
``" caller: "`` caller, ``" conclusion: "`` summarizer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.prompts import (
    CALLER_SUFFIX,
    PLANNER_SUFFIX,
    SUMMARIZER_SUFFIX,
    ToolDoc,
    Turn,
    model_calls,
)
from shared.roles import LLMRole

__all__ = ["Recording", "ReplayIndex", "detect_role", "load_records", "trajectory_decision_points"]

log = logging.getLogger(__name__)

_SUFFIXES = (
    (PLANNER_SUFFIX, LLMRole.PLANNER),
    (CALLER_SUFFIX, LLMRole.CALLER),
    (SUMMARIZER_SUFFIX, LLMRole.SUMMARIZER),
)


@dataclass(frozen=True)
class Recording:
    """A recorded continuation and where it came from."""

    continuation: str
    role: LLMRole | None
    source: str


def detect_role(prompt: str) -> LLMRole | None:
    """The α-UMi role a prompt is addressed to, from its suffix (None if it is not an α-UMi prompt)."""
    for suffix, role in _SUFFIXES:
        if prompt.endswith(suffix):
            return role
    return None


def trajectory_decision_points(record: dict[str, Any]) -> Iterator[tuple[LLMRole, str, str]]:
    """``(role, prompt, continuation)`` for every model call in one α-UMi trajectory."""
    tools = [ToolDoc.model_validate(tool) for tool in record.get("tools", [])]
    turns = [Turn.model_validate(turn) for turn in record["conversations"]]
    for call in model_calls(tools, turns):
        yield call.role, call.prompt, call.continuation


def load_records(path: Path) -> list[Any]:
    """The records of a JSON-list or JSON-Lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list (or JSON Lines) of objects")
    return data  # a record that is no object is reported by ReplayIndex.from_files


def _record_points(record: Any) -> Iterable[tuple[LLMRole | None, str, str]]:
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a JSON object, not {type(record).__name__}")
    if "conversations" in record:
        return trajectory_decision_points(record)
    if "input" in record and "target" in record:
        return [(detect_role(record["input"]), record["input"], record["target"])]
    raise ValueError("record is neither an α-UMi trajectory nor an {input, target} training record")


class ReplayIndex:
    """Exact-prompt lookup of recorded continuations (the first recording of a prompt wins)."""

    def __init__(self) -> None:
        self._by_prompt: dict[str, Recording] = {}
        self.conflicts = 0

    @classmethod
    def from_files(cls, paths: Iterable[Path], role: LLMRole | None = None) -> ReplayIndex:
        """Index every decision point in ``paths``, keeping only ``role``'s prompts when given."""
        index = cls()
        unusable: list[str] = []
        for path in paths:
            for number, record in enumerate(load_records(Path(path))):
                source = f"{Path(path).name}#{number}"
                try:
                    points = list(_record_points(record))
                except (KeyError, TypeError, ValueError) as exc:
                    # One malformed record of a public test file must not take the simulator down.
                    unusable.append(f"{source}: {exc!r}"[:300])
                    continue
                for point_role, prompt, continuation in points:
                    if role is None or point_role is role:
                        index.add(prompt, Recording(continuation, point_role, source))
        if unusable:
            log.warning("simulator: %d records could not be replayed, e.g. %s", len(unusable), unusable[0])
        if index.conflicts:
            log.warning("simulator: %d prompts were recorded twice, differently; kept the first", index.conflicts)
        return index

    def add(self, prompt: str, recording: Recording) -> None:
        """Record ``prompt``'s continuation unless the prompt is already recorded."""
        existing = self._by_prompt.get(prompt)
        if existing is None:
            self._by_prompt[prompt] = recording
        elif existing.continuation != recording.continuation:
            self.conflicts += 1

    def lookup(self, prompt: str) -> Recording | None:
        """The recording for exactly this prompt, if any."""
        return self._by_prompt.get(prompt)

    def count_by_role(self) -> dict[str, int]:
        """How many prompts are recorded per role (``"other"`` for unrecognised prompts)."""
        counts: dict[str, int] = {}
        for recording in self._by_prompt.values():
            key = recording.role.value if recording.role else "other"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._by_prompt)
