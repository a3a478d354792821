"""`umi up` runs the whole system in one process; `umi submit --wait` prints the trajectory as it happens."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared.asgi import free_port
from shared.settings import load_settings
from tests.conftest import REPO, UMI, load_trajectories
from umi.embedded import EmbeddedSystem


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("UMI_")}


def test_umi_up_and_submit_reproduce_a_recorded_trajectory(tmp_path: Path) -> None:
    port = free_port()
    up = subprocess.Popen(
        [str(UMI), "up", "--port", str(port)], cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "umi up did not start"
            time.sleep(0.2)
        record = load_trajectories()[14]
        result = subprocess.run(
            [str(UMI), "submit", record["conversations"][0]["value"], "--tools", str(REPO / "examples" / "email_validator.tools.json"),
             "--wait", "--gateway", f"http://127.0.0.1:{port}"],
            env=_clean_env(), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        role = {"assistant": "planner", "caller": "caller", "observation": "tools", "conclusion": "summarizer"}
        expected = "".join(
            f"[{i}] {role[turn['from']]}: {turn['value']}\n" for i, turn in enumerate(record["conversations"]) if i > 0
        )
        assert expected in result.stdout
        assert result.stdout.rstrip().endswith("answer: " + record["conversations"][-1]["value"])
        assert "status: succeeded (answered)" in result.stdout
        assert (tmp_path / ".umi" / "umi.db").is_file()  # SQLite by default
        # The gateway's /metrics includes the embedded workers: they share its process.
        metrics = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            for sample in family.samples
        }
        assert metrics[("umi_tasks_total", (("status", "succeeded"),))] == 1
        for speaker, step_role in role.items():
            stored = sum(1 for turn in record["conversations"] if turn["from"] == speaker)
            steps = sum(v for (name, labels), v in metrics.items() if name == "umi_step_duration_seconds_count" and ("role", step_role) in labels)
            assert steps == stored, step_role
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=30)
    assert "SGLang SIMULATOR" in output
    assert up.returncode == 0


def test_umi_up_shows_broker_and_database_urls_without_their_passwords() -> None:
    settings = load_settings(broker_url="amqps://umi:br0ker-pw@mq.example:5671/prod", database_url="postgresql://umi:db-pw@db.example/umi")
    lines = "\n".join(EmbeddedSystem(settings=settings).describe())
    assert "br0ker-pw" not in lines and "db-pw" not in lines
    assert "amqps://umi:**@mq.example:5671/prod" in lines
    assert "postgresql+psycopg://umi:***@db.example/umi" in lines
