"""`umi bench` at a tiny size: the command runs on the real stack and reports every figure.

Not a timed test: it checks the report's structure and sanity, never speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROLES = {"planner", "caller", "tools", "summarizer"}


def test_umi_bench_reports_every_figure(tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, "-m", "umi", "bench", "--tasks", "3", "--concurrency", "2", "--one-tasks", "1",
         "--replicas", "2", "--latency", "none", "--json", str(report_path), "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "simulator" in run.stdout and "2 replica(s) per role" in run.stdout
    for line in ("a. hop at one task in flight", "b. throughput ÷ ideal", "c. zero-latency ceiling", "dead letters: 0"):
        assert line in run.stdout

    report = json.loads(report_path.read_text())
    assert report["simulator_replicas"] == 2 and report["ideal"]["statuses"] == {"succeeded": 3}
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0
    assert machine["rabbitmq"][0].isdigit() and machine["postgresql"][0].isdigit() and machine["python"].startswith("3.")

    one, loaded = report["one_in_flight"], report["loaded"]
    assert one["statuses"] == {"succeeded": 1} and loaded["statuses"] == {"succeeded": 3}
    for run_ in (one, loaded):
        assert run_["steps"] > run_["tasks"] and run_["steps_per_s"] > 0
        assert run_["hop"]["count"] == run_["steps"]  # one hand-over per stored step after the query
        assert 0 < run_["hop"]["p50"] <= run_["hop"]["p99"] < 30
        assert set(run_["step_by_role"]) == ROLES and set(run_["work_by_role"]) == ROLES
        assert set(run_["queue_wait_mean_s"]) == ROLES
        # Each job's phases, from the workers' metrics: every role reads and stores, LLM roles prepare,
        # and every step but a task's last publishes its follow-up.
        phases = run_["phases"]
        assert set(phases) == ROLES
        steps_of = {role: run_["step_by_role"][role]["count"] for role in ROLES}
        for role in ROLES:
            assert phases[role]["read"]["jobs"] == phases[role]["store"]["jobs"] == steps_of[role]
            assert all(cost["wall_ms"] > 0 and cost["cpu_ms"] >= 0 for cost in phases[role].values())
        assert {role for role in ROLES if "prepare" in phases[role]} == ROLES - {"tools"}
        assert "publish" not in phases["summarizer"] and phases["planner"]["publish"]["jobs"] == steps_of["planner"]
        assert run_["end_to_end"]["count"] == run_["tasks"]
        assert {name.split(":")[0] for name in run_["cpu_ms_per_step"]} == ROLES | {"bench"}
        assert all(value > 0 for value in run_["cpu_ms_per_step"].values())

    # The references ran in the same invocation, over the same trajectories.
    assert report["bare_one"]["chains"] == 1 and report["bare_one"]["per_hop"]["p50"] > 0
    assert report["bare_loaded"]["chains"] == 2 and report["bare_loaded"]["hops_per_s"] > 0
    assert report["ideal"]["statuses"] == {"succeeded": 3} and report["ideal"]["steps"] == loaded["steps"]
    assert report["ceiling"]["steps_per_s"] == loaded["steps_per_s"]  # zero latency: the loaded run is the ceiling
    assert all(value is not None and value > 0 for value in report["ratios"].values()), report["ratios"]

    assert report["dead_letters"] == 0
    memory = report["memory"]
    assert {name.split(":")[0] for name in memory["before_mib"]} == ROLES
    assert all(memory["after_mib"][name] > 0 for name in memory["before_mib"])

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
