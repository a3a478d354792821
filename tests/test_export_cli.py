"""`umi export glpft`: from a trajectory file, and from the trajectories the system stored."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from evaluation.glpft import GLPFT_FILES, build_glpft
from evaluation.trajectories import stored_trajectories
from shared.db import get_engine
from shared.pipeline import Runtime
from tests.conftest import TRAIN_DIR, TRAJECTORIES, UMI, load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, create_task, run_to_end, sqlite_settings


def _clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("UMI_")}, **extra}


def test_export_from_a_file_writes_the_shipped_training_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(UMI), "export", "glpft", "--out", str(tmp_path), "--data", str(TRAJECTORIES)],
        env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for role in ("planner", "caller", "summarizer"):
        assert (tmp_path / GLPFT_FILES[role]).read_bytes() == (TRAIN_DIR / GLPFT_FILES[role]).read_bytes()
    assert (tmp_path / GLPFT_FILES["backbone"]).is_file()
    assert "planner 79" in result.stdout


def test_export_from_the_database_equals_export_from_the_recorded_trajectories(tmp_path: Path, simulator_url: str) -> None:
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=sqlite_settings(tmp_path, simulator_url), dispatcher=dispatcher)
    records = load_trajectories()
    replayed = [records[2], records[14]]
    for record in replayed:
        run_to_end(rt, dispatcher, create_task(rt, record))
    stored = stored_trajectories(get_engine(rt.settings.database_url))
    assert [t["conversations"] for t in stored] == [r["conversations"] for r in replayed]
    assert build_glpft(stored) == build_glpft(replayed)

    out = tmp_path / "out"
    result = subprocess.run(
        [str(UMI), "export", "glpft", "--out", str(out), "--from-db"],
        env=_clean_env(UMI_DATABASE_URL=rt.settings.database_url), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "from 2 trajectories" in result.stdout
