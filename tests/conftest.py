"""Shared fixtures. Data paths point into the repo (a fresh clone has no ../shared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN_DIR = REPO / "tests" / "data" / "toolbench-train-example"
TRAJECTORIES = REPO / "shared" / "data" / "raw_data_stage_2.json"


def load_trajectories() -> list[dict[str, Any]]:
    """The α-UMi example trajectories (raw_data_stage_2.json)."""
    return json.loads(TRAJECTORIES.read_text())
