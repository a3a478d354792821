"""The mirror backend: replay observations from recorded α-UMi trajectories.

Every caller turn immediately followed by an observation turn is one recording, keyed by
``(tool Name, canonical JSON of the Action Input)`` — so key order and whitespace do not
matter — and the observation is returned byte for byte (some begin with `` "``; they stay
that way). A tool Name that appears in no recording is not served by the mirror; a known
tool called with unrecorded arguments gets an error observation.

Trajectories sometimes make the same call twice with different results. With the task's
history (``CallContext``) the mirror returns the recording of the same trajectory (same
query, then same tool set) for the same occurrence: the n-th identical call gets the n-th
recorded observation. Without a history it returns the first recording.

Usage::

    mirror = MirrorBackend.from_file(Path("shared/data/raw_data_stage_2.json"))
    mirror.lookup("list_for_flowers", {})
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.tools.base import ToolBackend
from services.tools.errors import MirrorMissError, ToolInputError, ToolSetupError
from services.tools.models import CallContext, canonical_arguments, parse_action_input
from shared.prompts import Speaker, ToolDoc, Turn, parse_caller_output

__all__ = ["MirrorBackend", "MirrorRecord", "Recording", "recordings_of"]


class MirrorRecord(BaseModel):
    """One trajectory of an α-UMi data file (only the fields the mirror needs)."""

    model_config = ConfigDict(extra="ignore")

    tools: list[dict[str, Any]] = Field(default_factory=list)
    instruction: str = ""
    conversations: list[Turn]

    def query(self) -> str:
        """The task's query: ``instruction``, else the first user turn."""
        if self.instruction:
            return self.instruction
        return next((t.value for t in self.conversations if t.speaker is Speaker.USER), "")


class Recording(BaseModel):
    """One recorded call and its observation."""

    model_config = ConfigDict(frozen=True)

    tool: str
    arguments_key: str
    observation: str
    query: str
    tool_names: frozenset[str]
    #: 0 for the first identical call in its trajectory, 1 for the second, …
    occurrence: int


_RECORDS = TypeAdapter(list[MirrorRecord])


def recordings_of(record: MirrorRecord) -> list[Recording]:
    """The recordings of one trajectory, in conversation order."""
    names = frozenset(str(tool.get("Name", "")) for tool in record.tools)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    found = []
    turns = record.conversations
    for turn, following in zip(turns, turns[1:], strict=False):
        if turn.speaker is not Speaker.CALLER or following.speaker is not Speaker.OBSERVATION:
            continue
        call = parse_caller_output(turn.value)
        try:
            key = canonical_arguments(parse_action_input(call.action_input))
        except ToolInputError:
            continue  # no valid call can ever ask for it
        occurrence = seen[(call.action, key)]
        seen[(call.action, key)] += 1
        found.append(
            Recording(
                tool=call.action,
                arguments_key=key,
                observation=following.value,
                query=record.query(),
                tool_names=names,
                occurrence=occurrence,
            )
        )
    return found


class MirrorBackend(ToolBackend):
    """Answers from recordings; serves only the tool Names that were recorded."""

    name = "mirror"

    def __init__(self, recordings: Iterable[Recording]) -> None:
        self._by_call: dict[tuple[str, str], list[Recording]] = defaultdict(list)
        for recording in recordings:
            self._by_call[(recording.tool, recording.arguments_key)].append(recording)
        self._tools = frozenset(tool for tool, _ in self._by_call)

    @classmethod
    def from_records(cls, records: Iterable[MirrorRecord]) -> MirrorBackend:
        return cls(recording for record in records for recording in recordings_of(record))

    @classmethod
    def from_file(cls, path: Path) -> MirrorBackend:
        """Load an α-UMi data file (a JSON list of trajectories)."""
        try:
            records = _RECORDS.validate_json(path.read_bytes())
        except OSError as exc:
            raise ToolSetupError(f"UMI_TOOLS_MIRROR: cannot read {path}: {exc}") from None
        except ValidationError as exc:
            raise ToolSetupError(f"UMI_TOOLS_MIRROR: {path} is not an α-UMi trajectory list: {exc}") from None
        return cls.from_records(records)

    @property
    def tool_names(self) -> frozenset[str]:
        return self._tools

    def __len__(self) -> int:
        return sum(len(group) for group in self._by_call.values())

    def can_serve(self, tool_name: str) -> bool:
        return tool_name in self._tools

    def call(self, tool: ToolDoc, arguments: dict[str, Any], timeout_s: float, context: CallContext | None = None) -> str:
        return self.lookup(tool.Name, arguments, context)

    def lookup(self, tool_name: str, arguments: dict[str, Any], context: CallContext | None = None) -> str:
        """The recorded observation of this call; :class:`MirrorMissError` if none."""
        key = canonical_arguments(arguments)
        candidates = self._by_call.get((tool_name, key))
        if not candidates:
            raise MirrorMissError(tool_name)
        if context is None:
            return candidates[0].observation
        return _select(candidates, context, context.prior_calls(tool_name, key)).observation


def _select(candidates: Sequence[Recording], context: CallContext, occurrence: int) -> Recording:
    """Same trajectory first (query, then tool set), then the same occurrence."""
    query, names = context.instruction, context.tool_names
    preferences: list[Callable[[Recording], bool]] = [
        lambda r: r.query == query,
        lambda r: bool(names) and r.tool_names == names,
    ]
    pool = list(candidates)
    for prefer in preferences:
        pool = [r for r in pool if prefer(r)] or pool
    exact = [r for r in pool if r.occurrence == occurrence]
    if exact:
        return exact[0]
    # Called more often than recorded: the last recorded answer is the best guess.
    return max(pool, key=lambda r: r.occurrence) if occurrence > 0 else pool[0]
