"""Per-hop overhead of the queue system, measured on the real stack (not a test).

Starts a throwaway RabbitMQ vhost and PostgreSQL database on the local servers, the
four role workers as separate processes, the gateway, and the SGLang simulator
(zero model latency by default, so what is measured is the system itself), then
submits recorded trajectories and reads the stored steps back.

A *hop* is one step handing over to the next: the time from step i being stored
to step i+1 being stored, minus the model or tool time of step i+1. That is the
queue system's own cost per step — publish with confirm, broker delivery,
worker pick-up, database reads and the commit.

    .venv/bin/python scripts/benchmark.py --tasks 200 --concurrency 32
    .venv/bin/python scripts/benchmark.py --tasks 100 --latency realistic
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlmodel import Session, col, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.simulator import LatencyProfile  # noqa: E402
from shared.db import get_engine, upgrade_schema  # noqa: E402
from shared.example_data import load_trajectories, single_chain_indices  # noqa: E402
from shared.lifecycle import TERMINAL_STATUSES  # noqa: E402
from shared.models import Step, Task  # noqa: E402
from shared.roles import StepRole  # noqa: E402
from umi.deployment import Deployment  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:7.1f} ms   p90 {pick(0.9) * 1000:7.1f} ms   p99 {pick(0.99) * 1000:7.1f} ms"


def _hops(steps: list[Step]) -> list[float]:
    return [
        (after.created_at - before.created_at).total_seconds() - (after.latency_s or 0.0)
        for before, after in zip(steps, steps[1:], strict=False)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in flight at once")
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument("--latency", choices=["none", "realistic"], default="none")
    args = parser.parse_args()

    vhost = f"umi-bench-{uuid.uuid4().hex[:6]}"
    database = f"umi_bench_{uuid.uuid4().hex[:6]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True)
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    postgres_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    upgrade_schema(postgres_url)
    system = Deployment(
        rabbitmq_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        postgres_url=postgres_url,
        log_dir=Path(tempfile.mkdtemp(prefix="umi-bench-")),
        simulator=LatencyProfile.preset(args.latency).model_dump(),
    )
    try:
        for role in (StepRole.PLANNER, StepRole.CALLER, StepRole.TOOLS, StepRole.SUMMARIZER):
            system.start_worker(role, concurrency=args.worker_threads)
        records = [load_trajectories()[i] for i in single_chain_indices()]
        started = time.monotonic()
        pending: list[str] = []
        done: list[str] = []
        submitted = 0
        while len(done) < args.tasks:
            while submitted < args.tasks and len(pending) < args.concurrency:
                record = records[submitted % len(records)]
                pending.append(system.submit(record["conversations"][0]["value"], record["tools"]))
                submitted += 1
            for task_id in list(pending):
                if system.get(task_id)["status"] in TERMINAL_STATUSES:
                    pending.remove(task_id)
                    done.append(task_id)
            time.sleep(0.01)
        wall = time.monotonic() - started
        _report(system, done, wall, args)
    finally:
        system.close()
        get_engine(postgres_url).dispose()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)
    return 0


def _report(system: Deployment, task_ids: list[str], wall: float, args: argparse.Namespace) -> None:
    ids = [uuid.UUID(t) for t in task_ids]
    with Session(get_engine(system.settings.database_url)) as session:
        tasks = session.exec(select(Task).where(col(Task.id).in_(ids))).all()
        steps = session.exec(select(Step).where(col(Step.task_id).in_(ids)).order_by(col(Step.task_id), col(Step.index))).all()
    by_task: dict[uuid.UUID, list[Step]] = {}
    for step in steps:
        by_task.setdefault(step.task_id, []).append(step)
    hops = [hop for task_steps in by_task.values() for hop in _hops(task_steps)]
    model_or_tool = [step.latency_s for step in steps if step.latency_s is not None]
    e2e = [(t.finished_at - t.created_at).total_seconds() for t in tasks if t.finished_at]
    statuses = statistics.multimode([t.status for t in tasks])
    print(f"tasks {len(tasks)} ({', '.join(statuses)}), {len(steps) - len(tasks)} steps, {len(hops)} hops, "
          f"concurrency {args.concurrency}, worker threads {args.worker_threads}, simulator latency {args.latency}")
    print(f"throughput      {len(tasks) / wall:7.1f} tasks/s   {len(hops) / wall:7.1f} steps/s   (wall {wall:.1f} s)")
    print(f"per-hop overhead {_percentiles(hops)}")
    print(f"model/tool time  {_percentiles(model_or_tool)}")
    print(f"task end-to-end  {_percentiles(e2e)}")


if __name__ == "__main__":
    sys.exit(main())
