"""`umi eval static` through the live system: with the simulator replaying the data's own references, every metric is 1.0."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from evaluation.metrics import is_decision_point
from tests.conftest import TRAJECTORIES, UMI, load_trajectories


def _clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("UMI_")}, **extra}


def _expected_points() -> int:
    return sum(
        1
        for record in load_trajectories()
        for turn in record["conversations"]
        if turn["from"] == "assistant" and is_decision_point(turn["value"])
    )


def _check_perfect(out: Path, n: int) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == metrics["n"] == n
    assert all(p["predictions"] == p["reference"] for p in predictions)
    assert {p["status"] for p in predictions} == {"succeeded", "gave_up"}
    for key in ("plan_acc", "action_em", "arg_f1", "easy_f1", "hard_f1"):
        assert metrics[key] == 1.0, key
    assert metrics["rouge_l"] == pytest.approx(1.0, abs=1e-6)  # the rouge package's F of identical texts
    assert metrics["hallu_rate"] == 0.0  # the references' own rate: every recorded call names a listed tool
    assert {"tools", "reference", "predictions", "task_id", "history"} <= set(predictions[0])


@pytest.mark.parametrize("flags", [["--greedy"], ["--constrained"]], ids=["greedy", "constrained"])
def test_embedded_static_eval_of_the_recorded_data_scores_perfectly(tmp_path: Path, flags: list[str]) -> None:
    result = subprocess.run(
        [str(UMI), "eval", "static", "--data", str(TRAJECTORIES), "--out", str(tmp_path), "--concurrency", "8", *flags],
        env=_clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    _check_perfect(tmp_path, _expected_points())
    assert "79/79 decision points" in result.stderr  # progress
    assert "Plan ACC  100.00" in result.stdout  # the table


def test_eval_score_recomputes_the_same_metrics_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(
        [str(UMI), "eval", "static", "--data", str(TRAJECTORIES), "--out", str(run), "--limit", "12", "--greedy"],
        env=_clean_env(), capture_output=True, text=True, timeout=120, check=True,
    )
    result = subprocess.run(
        [str(UMI), "eval", "score", "--predictions", str(run / "predictions.json"), "--out", str(tmp_path / "m.json"),
         "--compare", "alpha-umi-7b/out-of-domain"],
        env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((run / "metrics.json").read_text())
    assert "89.72" in result.stdout  # the paper's Plan ACC beside ours


def test_eval_with_a_file_that_is_not_alpha_umi_data_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": "no conversations here"}]))
    result = subprocess.run(
        [str(UMI), "eval", "static", "--data", str(bad), "--out", str(tmp_path / "o")],
        env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "is not an α-UMi test file" in result.stderr


def _public_test_file_shapes() -> tuple[list[object], int, list[tuple[int, int | None]]]:
    """Records shaped like the public ToolBench test files, built from the bundled data.

    Returns the records, how many decision points must be scored, and the
    ``(record_index, turn_index)`` of what must be reported as skipped.
    """
    records = load_trajectories()
    chain = next(r for r in records if sum(t["from"] == "user" for t in r["conversations"]) == 1 and any(t["from"] == "conclusion" for t in r["conversations"]))
    turns = chain["conversations"]
    # Two tools share a Name: rendered as given.
    duplicated = {**chain, "tools": [chain["tools"][0], *chain["tools"]]}
    # A conclusion followed by an empty observation, then more planning (the chain again).
    after_conclusion = {**chain, "conversations": [*turns, {"from": "observation", "value": ""}, *turns[1:]]}
    # A conclusion followed directly by planning.
    straight_on = {**chain, "conversations": [*turns, *turns[1:]]}
    caller_turn = next(i for i, t in enumerate(turns) if t["from"] == "caller")
    # A decision point whose history ends with a caller turn (no observation): nothing can act on it.
    cut_short = {**chain, "conversations": [*turns[: caller_turn + 1], *turns[caller_turn + 2 :]]}
    broken = [{"tools": chain["tools"]}, "not a record", {"tools": [{"function": "no name"}], "conversations": turns}]
    shaped = [duplicated, after_conclusion, straight_on, cut_short, *broken]

    def points(record: dict) -> int:
        return sum(1 for t in record["conversations"] if t["from"] == "assistant" and is_decision_point(t["value"]))

    skipped_point = next(
        i for i in range(caller_turn + 1, len(cut_short["conversations"]))
        if cut_short["conversations"][i]["from"] == "assistant" and cut_short["conversations"][i - 1]["from"] == "caller"
    )
    expected = points(duplicated) + points(after_conclusion) + points(straight_on) + points(cut_short) - 1
    return shaped, expected, [(3, skipped_point), (4, None), (5, None), (6, None)]


def test_every_usable_decision_point_of_a_public_shaped_test_file_is_scored(tmp_path: Path) -> None:
    records, expected, skipped = _public_test_file_shapes()
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    result = subprocess.run(
        [str(UMI), "eval", "static", "--data", str(data), "--out", str(out), "--concurrency", "8", "--greedy"],
        env=_clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == expected
    assert {p["record_index"] for p in predictions} == {0, 1, 2, 3}
    assert all(p["predictions"] == p["reference"] for p in predictions), [p for p in predictions if p["predictions"] != p["reference"]][:1]
    reported = json.loads((out / "skipped.json").read_text())
    assert [(s["record_index"], s["turn_index"]) for s in reported] == skipped
    assert all(s["reason"] for s in reported)
    assert "skipped record 4: missing field 'conversations'" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["plan_acc"] == 1.0
