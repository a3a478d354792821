"""The bundled α-UMi example trajectories (``shared/data/``): where they are and how to read them.

The simulator replays them, the mirror tools answer from them, and the demo,
benchmark and tests drive tasks from their queries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_TRAJECTORIES", "load_trajectories", "single_chain_indices"]

#: α-UMi GLPFT example data (``raw_data_stage_2.json``); provenance in ``shared/data/README.md``.
BUNDLED_TRAJECTORIES = Path(__file__).resolve().parent / "data" / "raw_data_stage_2.json"


def load_trajectories(path: Path = BUNDLED_TRAJECTORIES) -> list[dict[str, Any]]:
    """The trajectories of an α-UMi trajectory file, as stored (JSON records)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of trajectories")
    return records


def single_chain_indices(records: list[dict[str, Any]] | None = None) -> list[int]:
    """Indices of trajectories with one user turn: a straight planner→caller→tools→…→end chain."""
    records = load_trajectories() if records is None else records
    return [
        i
        for i, record in enumerate(records)
        if sum(turn["from"] == "user" for turn in record["conversations"]) == 1
    ]
