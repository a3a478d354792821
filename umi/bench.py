"""``umi bench``: the product's own cost, measured against what the broker and the models allow.

Runs recorded α-UMi trajectories through the real stack — a throwaway RabbitMQ vhost and
PostgreSQL database on the local servers, the four role workers as separate ``umi worker``
processes, the gateway, and the SGLang **simulator** (one replica per role) — and, in the
same invocation, two references:

* the **bare Celery hop** (:mod:`umi.bench_hop`): a Celery app with the product's delivery
  settings whose task only publishes its successor — the broker's floor under one step;
* the **ideal in-process loop** (:func:`ideal_loop`): asyncio + ``httpx.AsyncClient`` sending
  the same prompts (``shared/prompts.py``) to the same simulators and answering tool calls from
  the same mirror, with the same concurrency, no broker and no database — what the models allow.

Figures (``docs/benchmarks.md`` explains them):

a. added latency per stored step (a *hop*: step *i* stored → step *i+1* stored, minus step
   *i+1*'s model or tool time ``latency_s``) at one task in flight ÷ one bare hop;
b. throughput (steps/s) ÷ the ideal loop's at the same concurrency and latency profile;
c. throughput with zero-latency simulators (the orchestration ceiling) ÷ the bare hop rate
   with as many chains in flight.

The load generator follows tasks through the database (one query for all tasks in flight per
interval), never per task. ``--load`` is the load test: 2,000 realistic tasks, per-role and
end-to-end percentiles, errors and dead letters, worker memory before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psutil
from kombu import Connection, Consumer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlmodel import Session, col, select

from services.simulator import LatencyProfile
from services.tools import ToolExecutor, build_executor
from shared.db import get_engine
from shared.example_data import load_trajectories, single_chain_indices
from shared.lifecycle import TERMINAL_STATUSES, TaskStatus
from shared.llm import build_role_request
from shared.models import Step, Task
from shared.prompts import (
    NextRole,
    Speaker,
    ToolDoc,
    Turn,
    normalize_output,
    parse_caller_output,
    parse_planner_output,
    render_caller_prompt,
    render_planner_prompt,
    render_summarizer_prompt,
)
from shared.replicas import rendezvous_order, replica_label
from shared.roles import LLMRole, StepRole
from shared.settings import Settings
from umi.bench_hop import BROKER_URL_VARIABLE, DONE_QUEUE, HOP_QUEUE, create_hop_app, done_queue
from umi.deployment import Deployment, scratch_backends

__all__ = [
    "BenchOptions",
    "BenchReport",
    "Percentiles",
    "ideal_loop",
    "percentiles",
    "run_bench",
    "format_report",
    "plot_report",
]

#: The ideal loop's bound on steps per task (the recorded trajectories end well before it).
IDEAL_MAX_STEPS = 64
ROLES = (StepRole.PLANNER, StepRole.CALLER, StepRole.TOOLS, StepRole.SUMMARIZER)


# --- options and results ---------------------------------------------------------------
class BenchOptions(BaseModel):
    """What one ``umi bench`` invocation runs."""

    tasks: int = Field(default=100, ge=1, description="tasks of the throughput run (and the load test)")
    concurrency: int = Field(default=16, ge=1, description="tasks in flight")
    latency: str = Field(default="none", description="simulator latency profile: none or realistic")
    worker_threads: int | None = Field(default=None, description="threads per role worker (default: max(8, concurrency))")
    one_tasks: int = Field(default=10, ge=1, description="tasks run one at a time for the per-hop latency")
    bare_hops: int = Field(default=200, ge=2, description="hops per bare Celery chain")
    compare: bool = Field(default=True, description="run the references (bare hop, ideal loop, zero-latency ceiling)")
    poll_s: float = Field(default=0.01, gt=0, description="interval of the one query that follows the tasks in flight")
    replicas: int = Field(default=1, ge=1, description="simulator replicas per LLM role (tasks routed by rendezvous hashing)")

    @property
    def threads(self) -> int:
        return self.worker_threads or max(8, self.concurrency)


class Percentiles(BaseModel):
    """A distribution in seconds (nearest-rank percentiles)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


def percentiles(values: Sequence[float]) -> Percentiles:
    if not values:
        return Percentiles()
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return Percentiles(count=len(ordered), mean=sum(ordered) / len(ordered), p50=pick(0.5), p95=pick(0.95), p99=pick(0.99), max=ordered[-1])


class Machine(BaseModel):
    """Where the run happened, read at run time."""

    cores: int
    memory_gib: float
    rabbitmq: str
    postgresql: str
    python: str
    celery: str
    platform: str
    when: str


class RssSample(BaseModel):
    """Each worker process's RSS (MiB, by ``role:pid``) ``elapsed_s`` into a run."""

    elapsed_s: float
    mib: dict[str, float]


class PhaseCost(BaseModel):
    """One phase of handling a job (``shared.metrics.StepPhase``), mean per job of the run."""

    jobs: int
    wall_ms: float
    cpu_ms: float


class ProductRun(BaseModel):
    """Tasks through the product: throughput and the stored steps' timings."""

    latency: str
    concurrency: int
    worker_threads: int
    tasks: int
    statuses: dict[str, int]
    steps: int  # stored steps after the query step (model and tool steps)
    wall_s: float
    steps_per_s: float
    tasks_per_s: float
    #: step i stored → step i+1 stored, minus step i+1's latency_s
    hop: Percentiles
    #: step i stored → step i+1's work starts: step i's commit, the confirmed publish, the queue,
    #: the pick-up, the task read and prompt rendering (``created_at`` is set when the row is built,
    #: before its INSERT and commit, so those fall in the *next* hop)
    hop_before_work: Percentiles
    #: step i+1's work ends → its row is built (output parsing)
    hop_after_work: Percentiles
    #: publish → worker start, from the workers' umi_queue_wait_seconds (mean per role, this run only)
    queue_wait_mean_s: dict[str, float]
    #: per role and phase (read, prepare, store, publish): mean wall and CPU per job, from the
    #: workers' umi_step_phase_seconds and umi_step_phase_cpu_seconds_total (this run only)
    phases: dict[str, dict[str, PhaseCost]] = Field(default_factory=dict)
    #: per role: latency_s (model or tool time) and stored-to-stored step time
    work_by_role: dict[str, Percentiles]
    step_by_role: dict[str, Percentiles]
    end_to_end: Percentiles
    #: CPU seconds used during the run, per worker process (``role:pid``) and by this process
    #: (``bench``: gateway, simulators and the load generator); in ms per step of the worker's
    #: role (``bench``: per stored step)
    cpu_s: dict[str, float] = Field(default_factory=dict)
    cpu_ms_per_step: dict[str, float] = Field(default_factory=dict)
    #: each worker's RSS every 10 s of the run
    rss_samples: list[RssSample] = Field(default_factory=list)


class HopRun(BaseModel):
    """Bare Celery hops: ``chains`` chains in flight at once."""

    chains: int
    hops: int
    per_hop: Percentiles
    hops_per_s: float


class IdealRun(BaseModel):
    """The in-process asyncio loop against the same simulators."""

    latency: str
    concurrency: int
    tasks: int
    statuses: dict[str, int]
    steps: int
    wall_s: float
    steps_per_s: float


class Memory(BaseModel):
    """RSS of each worker process (MiB): at start, after warm-up (every thread has served) and at the end."""

    start_mib: dict[str, float]
    before_mib: dict[str, float]
    #: halfway through the loaded run (the 10 s sample nearest its middle; empty for short runs)
    mid_mib: dict[str, float] = Field(default_factory=dict)
    after_mib: dict[str, float]

    @property
    def growth(self) -> dict[str, float]:
        return {name: self.after_mib[name] / self.before_mib[name] - 1 for name in self.before_mib if name in self.after_mib}


class BenchReport(BaseModel):
    machine: Machine
    options: BenchOptions
    simulator_replicas: int = 1
    one_in_flight: ProductRun
    loaded: ProductRun
    bare_one: HopRun | None = None
    bare_loaded: HopRun | None = None
    ideal: IdealRun | None = None
    ceiling: ProductRun | None = None
    dead_letters: int
    memory: Memory
    ratios: dict[str, float | None]

    @property
    def not_succeeded(self) -> int:
        """Tasks of the product runs (one in flight and loaded) that did not succeed."""
        runs = (self.one_in_flight, self.loaded)
        return sum(n for run in runs for status, n in run.statuses.items() if status != TaskStatus.SUCCEEDED.value)


# --- the stack ---------------------------------------------------------------------------
@contextlib.contextmanager
def deployment(broker_url: str, postgres_url: str, *, latency: str, threads: int, replicas: int = 1) -> Iterator[Deployment]:
    """The product on the throwaway backends: simulators, gateway, the four workers."""
    system = Deployment(
        rabbitmq_url=broker_url,
        postgres_url=postgres_url,
        log_dir=Path(tempfile.mkdtemp(prefix="umi-bench-")),
        simulator=LatencyProfile.preset(_profile(latency)).model_dump(),
        replicas=replicas,
        # No API keys: auth costs one key lookup per submit at the gateway, nothing per step.
        settings={"auth": False},
    )
    try:
        for role in ROLES:
            system.start_worker(role, concurrency=threads)
        yield system
    finally:
        system.close()


def _profile(latency: str) -> str:
    """``realistic`` is the simulator's Llama-2 7B profile; ``none`` its instant one."""
    return {"realistic": "llama2-7b-1gpu"}.get(latency, latency)


def machine_info(broker_url: str, postgres_url: str) -> Machine:
    with Connection(broker_url) as connection:
        connection.connect()
        server = connection.connection.server_properties
    rabbitmq = server.get("version", "?")
    with get_engine(postgres_url).connect() as db:
        postgresql = str(db.execute(text("SHOW server_version")).scalar())
    return Machine(
        cores=os.cpu_count() or 0,
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        rabbitmq=rabbitmq.decode() if isinstance(rabbitmq, bytes) else str(rabbitmq),
        postgresql=postgresql,
        python=platform.python_version(),
        celery=version("celery"),
        platform=platform.platform(),
        when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _records() -> list[dict[str, Any]]:
    records = load_trajectories()
    return [records[i] for i in single_chain_indices(records)]


# --- the product ---------------------------------------------------------------------------
def drive_product(
    system: Deployment,
    records: list[dict[str, Any]],
    *,
    tasks: int,
    concurrency: int,
    poll_s: float,
    on_interval: Callable[[float], None] | None = None,
    interval_s: float = 10.0,
) -> tuple[list[uuid.UUID], float]:
    """Submit ``tasks`` tasks keeping ``concurrency`` in flight; their ids and the wall time.

    Tasks in flight are followed with one query per ``poll_s`` for all of them;
    ``on_interval(elapsed_s)`` is called every ``interval_s`` (memory samples).
    """
    next_call = interval_s
    engine = get_engine(system.settings.database_url)
    pending: set[uuid.UUID] = set()
    done: list[uuid.UUID] = []
    submitted = 0
    terminal = [status.value for status in TERMINAL_STATUSES]
    started = time.monotonic()
    while len(done) < tasks:
        while submitted < tasks and len(pending) < concurrency:
            record = records[submitted % len(records)]
            pending.add(uuid.UUID(system.submit(record["conversations"][0]["value"], record["tools"])))
            submitted += 1
        time.sleep(poll_s)
        with Session(engine) as session:
            finished = session.exec(select(Task.id).where(col(Task.id).in_(pending), col(Task.status).in_(terminal))).all()
        pending.difference_update(finished)
        done.extend(finished)
        if on_interval is not None and time.monotonic() - started >= next_call:
            on_interval(time.monotonic() - started)
            next_call += interval_s
    return done, time.monotonic() - started


def product_figures(
    system: Deployment, ids: list[uuid.UUID], wall_s: float, *, latency: str, concurrency: int, threads: int, queue_wait: dict[str, float]
) -> ProductRun:
    """The run's figures from the stored tasks and steps."""
    with Session(get_engine(system.settings.database_url)) as session:
        tasks = session.exec(select(Task).where(col(Task.id).in_(ids))).all()
        steps = session.exec(select(Step).where(col(Step.task_id).in_(ids)).order_by(col(Step.task_id), col(Step.index))).all()
    by_task: dict[uuid.UUID, list[Step]] = {}
    for step in steps:
        by_task.setdefault(step.task_id, []).append(step)
    hops, before_work, after_work = [], [], []
    work: dict[str, list[float]] = {}
    stepwise: dict[str, list[float]] = {}
    for task_steps in by_task.values():
        for before, after in zip(task_steps, task_steps[1:], strict=False):
            gap = (after.created_at - before.created_at).total_seconds()
            latency_s = after.latency_s or 0.0
            hops.append(gap - latency_s)
            role = StepRole(after.role).value
            work.setdefault(role, []).append(latency_s)
            stepwise.setdefault(role, []).append(gap)
            if after.started_at is not None:
                before_work.append((after.started_at - before.created_at).total_seconds())
                after_work.append((after.created_at - after.started_at).total_seconds() - latency_s)
    statuses: dict[str, int] = {}
    for task in tasks:
        statuses[str(task.status)] = statuses.get(str(task.status), 0) + 1
    stored = len(steps) - len(tasks)
    return ProductRun(
        latency=latency,
        concurrency=concurrency,
        worker_threads=threads,
        tasks=len(tasks),
        statuses=statuses,
        steps=stored,
        wall_s=wall_s,
        steps_per_s=stored / wall_s,
        tasks_per_s=len(tasks) / wall_s,
        hop=percentiles(hops),
        hop_before_work=percentiles(before_work),
        hop_after_work=percentiles(after_work),
        queue_wait_mean_s=queue_wait,
        work_by_role={role: percentiles(values) for role, values in work.items()},
        step_by_role={role: percentiles(values) for role, values in stepwise.items()},
        end_to_end=percentiles([(t.finished_at - t.created_at).total_seconds() for t in tasks if t.finished_at]),
    )


#: (role, sample name, phase label or "") → value summed over a role's worker processes.
WorkerSamples = dict[tuple[str, str, str], float]
_WORKER_FAMILIES = frozenset({"umi_queue_wait_seconds", "umi_step_phase_seconds", "umi_step_phase_cpu_seconds"})


def worker_samples(system: Deployment) -> WorkerSamples:
    """The queue-wait and step-phase samples (sums, counts, CPU totals) of every worker process."""
    totals: WorkerSamples = {}
    for role, urls in system.metrics_urls().items():
        for url in urls if role != "gateway" else []:
            for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
                if family.name not in _WORKER_FAMILIES:
                    continue
                for sample in family.samples:
                    if sample.name.endswith(("_sum", "_count", "_total")):
                        key = (role, sample.name, sample.labels.get("phase", ""))
                        totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def waits_and_phases(before: WorkerSamples, after: WorkerSamples) -> tuple[dict[str, float], dict[str, dict[str, PhaseCost]]]:
    """Mean queue wait per role, and mean wall and CPU per job of each phase, between two scrapes."""

    def moved(role: str, name: str, phase: str = "") -> float:
        return after.get((role, name, phase), 0.0) - before.get((role, name, phase), 0.0)

    waits: dict[str, float] = {}
    phases: dict[str, dict[str, PhaseCost]] = {}
    for role, name, phase in after:
        if name == "umi_queue_wait_seconds_count" and (count := moved(role, name)) > 0:
            waits[role] = moved(role, "umi_queue_wait_seconds_sum") / count
        elif name == "umi_step_phase_seconds_count" and (count := moved(role, name, phase)) > 0:
            phases.setdefault(role, {})[phase] = PhaseCost(
                jobs=round(count),
                wall_ms=1000 * moved(role, "umi_step_phase_seconds_sum", phase) / count,
                cpu_ms=1000 * moved(role, "umi_step_phase_cpu_seconds_total", phase) / count,
            )
    return waits, phases


def run_product(system: Deployment, records: list[dict[str, Any]], *, tasks: int, concurrency: int, latency: str, options: BenchOptions) -> ProductRun:
    samples_before = worker_samples(system)
    cpu = cpu_seconds(system)
    samples: list[RssSample] = []
    ids, wall = drive_product(
        system, records, tasks=tasks, concurrency=concurrency, poll_s=options.poll_s,
        on_interval=lambda elapsed: samples.append(RssSample(elapsed_s=elapsed, mib=worker_rss_mib(system))),
    )
    cpu_after = cpu_seconds(system)
    waits, phases = waits_and_phases(samples_before, worker_samples(system))
    run = product_figures(system, ids, wall, latency=latency, concurrency=concurrency, threads=options.threads, queue_wait=waits)
    run.phases = phases
    run.rss_samples = samples
    run.cpu_s = {name: cpu_after[name] - cpu.get(name, 0.0) for name in cpu_after}
    # A worker's CPU per step of its own role; this process's per stored step of any role.
    steps = {name: run.step_by_role[name.split(":")[0]].count if name.split(":")[0] in run.step_by_role else run.steps for name in run.cpu_s}
    run.cpu_ms_per_step = {name: 1000 * used / max(1, steps[name]) for name, used in run.cpu_s.items()}
    return run


def cpu_seconds(system: Deployment) -> dict[str, float]:
    """User + system CPU seconds so far of each live worker process and of this process."""
    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    seconds = {f"{service}:{p.pid}": used(psutil.Process(p.pid)) for p, (service, _port) in system.metrics_ports.items() if p.poll() is None}
    seconds["bench"] = used(psutil.Process())
    return seconds


def worker_rss_mib(system: Deployment) -> dict[str, float]:
    """RSS of each live worker process, by ``role:pid``."""
    rss = {}
    for process, (service, _port) in system.metrics_ports.items():
        if process.poll() is None:
            rss[f"{service}:{process.pid}"] = psutil.Process(process.pid).memory_info().rss / 2**20
    return rss


def dead_letter_count(system: Deployment) -> int:
    with Connection(system.settings.broker_url) as connection:
        return int(connection.default_channel.queue_declare(system.topology.dead_letter_queue_name, passive=True).message_count)


# --- the ideal loop --------------------------------------------------------------------------
async def ideal_loop(
    urls: dict[LLMRole, list[str]], records: list[dict[str, Any]], *, tasks: int, concurrency: int, settings: Settings, executor: ToolExecutor
) -> tuple[dict[str, int], int, float]:
    """Run the α-UMi loop in process: statuses, steps and wall time.

    The same prompts (``shared/prompts.py``), requests (``build_role_request``) and tool mirror
    as the product, ``concurrency`` tasks at a time, nothing stored and nothing queued. With several
    replicas per role, each task keeps to its home replica as the product routes it (rendezvous hashing).
    """
    statuses: dict[str, int] = {}
    steps = 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5), limits=limits) as client:

        async def generate(role: LLMRole, prompt: str, tools: list[ToolDoc], key: str) -> str:
            request = build_role_request(role, prompt, tools=tools, settings=settings, constrained=True)
            home = rendezvous_order(key, [replica_label(url) for url in urls[role]])[0]
            url = next(url for url in urls[role] if replica_label(url) == home)
            response = await client.post(f"{url}/generate", json=request.to_body())
            response.raise_for_status()
            return normalize_output(role, str(response.json()["text"]))

        async def one_task(record: dict[str, Any]) -> tuple[str, int]:
            tools = [ToolDoc.model_validate(tool) for tool in record["tools"]]
            turns = [Turn(speaker=Speaker.USER, value=record["conversations"][0]["value"])]
            key = uuid.uuid4().hex
            count = 0
            while count < IDEAL_MAX_STEPS:
                decision = parse_planner_output(await generate(LLMRole.PLANNER, render_planner_prompt(tools, turns), tools, key))
                turns.append(Turn(speaker=Speaker.ASSISTANT, value=decision.text))
                count += 1
                if decision.next is NextRole.GIVE_UP:
                    return TaskStatus.GAVE_UP.value, count
                if decision.next is NextRole.CONCLUSION:
                    answer = await generate(LLMRole.SUMMARIZER, render_summarizer_prompt(turns), tools, key)
                    turns.append(Turn(speaker=Speaker.CONCLUSION, value=answer))
                    return TaskStatus.SUCCEEDED.value, count + 1
                call = await generate(LLMRole.CALLER, render_caller_prompt(tools, turns), tools, key)
                turns.append(Turn(speaker=Speaker.CALLER, value=call))
                action = parse_caller_output(call)
                outcome = executor.execute(action.action, action.action_input, tools, history=turns)
                turns.append(Turn(speaker=Speaker.OBSERVATION, value=outcome.observation))
                count += 2
            return TaskStatus.FAILED.value, count

        async def lane() -> None:
            nonlocal next_index, steps
            while next_index < tasks:
                record = records[next_index % len(records)]
                next_index += 1
                status, count = await one_task(record)
                statuses[status] = statuses.get(status, 0) + 1
                steps += count

        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return statuses, steps, time.monotonic() - started


def run_ideal(system: Deployment, records: list[dict[str, Any]], *, tasks: int, concurrency: int, latency: str) -> IdealRun:
    urls = {role: [server.url for server in servers] for role, servers in system.replicas.items()}
    executor = build_executor(system.settings)
    statuses, steps, wall = asyncio.run(
        ideal_loop(urls, records, tasks=tasks, concurrency=concurrency, settings=system.settings, executor=executor)
    )
    return IdealRun(latency=latency, concurrency=concurrency, tasks=tasks, statuses=statuses, steps=steps, wall_s=wall, steps_per_s=steps / wall)


# --- the bare Celery hop ----------------------------------------------------------------------
@contextlib.contextmanager
def bare_hop_worker(broker_url: str, *, threads: int, log_dir: Path) -> Iterator[None]:
    """The bare hop's worker as its own process (``celery -A umi.bench_hop worker``), like a role worker."""
    log = open(log_dir / "bench-hop-worker.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "umi.bench_hop", "worker", "--pool", "threads", "--concurrency", str(threads),
         "--queues", HOP_QUEUE, "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env={**os.environ, BROKER_URL_VARIABLE: broker_url},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bare hop worker exited with {process.returncode}; see {log.name}")
            with contextlib.suppress(Exception), Connection(broker_url) as connection:
                if connection.default_channel.queue_declare(HOP_QUEUE, passive=True).consumer_count > 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare hop worker did not consume within 60 s; see {log.name}")
            time.sleep(0.2)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def run_bare_hops(broker_url: str, *, chains: int, hops_per_chain: int) -> HopRun:
    """``chains`` chains of ``hops_per_chain`` hops at once; the gaps between consecutive task starts."""
    app = create_hop_app(broker_url)
    hop = app.tasks["bench.hop"]
    reports: list[list[float]] = []
    with Connection(broker_url) as connection:
        queue = done_queue()(connection.default_channel)
        queue.declare()
        queue.purge()
        with Consumer(connection, queues=[queue], callbacks=[lambda body, message: (reports.append(body["stamps"]), message.ack())], accept=["json"]):
            for chain in range(chains):
                hop.apply_async((chain, hops_per_chain - 1, []))
            deadline = time.monotonic() + 300
            while len(reports) < chains:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bare hops: {len(reports)} of {chains} chains reported to {DONE_QUEUE}")
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=1)
    gaps = [after - before for stamps in reports for before, after in zip(stamps, stamps[1:], strict=False)]
    span = max(s[-1] for s in reports) - min(s[0] for s in reports)
    return HopRun(chains=chains, hops=len(gaps), per_hop=percentiles(gaps), hops_per_s=len(gaps) / span if span > 0 else 0.0)


# --- the whole benchmark ----------------------------------------------------------------------
def run_bench(options: BenchOptions, *, log: Any = print) -> BenchReport:
    """Everything ``umi bench`` measures, in one invocation."""
    records = _records()
    with scratch_backends("umi-bench") as (broker_url, postgres_url):
        machine = machine_info(broker_url, postgres_url)
        log(f"machine: {machine.cores} cores, {machine.memory_gib} GiB, RabbitMQ {machine.rabbitmq}, PostgreSQL {machine.postgresql}, Python {machine.python}")
        with deployment(broker_url, postgres_url, latency=options.latency, threads=options.threads, replicas=options.replicas) as system:
            memory_start = worker_rss_mib(system)
            log(f"one task in flight: {options.one_tasks} tasks ({options.latency} latency)")
            one = run_product(system, records, tasks=options.one_tasks, concurrency=1, latency=options.latency, options=options)
            warm_up = min(options.tasks, 2 * options.concurrency)
            log(f"warm-up: {warm_up} tasks, {options.concurrency} in flight")
            drive_product(system, records, tasks=warm_up, concurrency=options.concurrency, poll_s=options.poll_s)
            memory_before = worker_rss_mib(system)  # after the warm-up: the worker threads have all served
            log(f"{options.tasks} tasks, {options.concurrency} in flight ({options.latency} latency)")
            loaded = run_product(system, records, tasks=options.tasks, concurrency=options.concurrency, latency=options.latency, options=options)
            middle = min(loaded.rss_samples, key=lambda sample: abs(sample.elapsed_s - loaded.wall_s / 2), default=None)
            memory = Memory(start_mib=memory_start, before_mib=memory_before, mid_mib=middle.mib if middle else {}, after_mib=worker_rss_mib(system))
            dead_letters = dead_letter_count(system)
            ideal = bare_one = bare_loaded = ceiling = None
            if options.compare:
                log(f"ideal in-process loop: {options.tasks} tasks, {options.concurrency} in flight")
                ideal = run_ideal(system, records, tasks=options.tasks, concurrency=options.concurrency, latency=options.latency)
                log("bare Celery hops")
                with bare_hop_worker(broker_url, threads=options.threads, log_dir=system.log_dir):
                    bare_one = run_bare_hops(broker_url, chains=1, hops_per_chain=options.bare_hops)
                    bare_loaded = run_bare_hops(broker_url, chains=options.concurrency, hops_per_chain=max(20, options.bare_hops // 4))
                if options.latency == "none":
                    ceiling = loaded
        if options.compare and ceiling is None:
            log(f"zero-latency ceiling: {options.tasks} tasks, {options.concurrency} in flight")
            with scratch_backends("umi-bench") as (broker_url2, postgres_url2):
                with deployment(broker_url2, postgres_url2, latency="none", threads=options.threads, replicas=options.replicas) as system2:
                    run_product(system2, records, tasks=min(options.tasks, options.concurrency), concurrency=options.concurrency, latency="none", options=options)
                    ceiling = run_product(system2, records, tasks=options.tasks, concurrency=options.concurrency, latency="none", options=options)
    return BenchReport(
        simulator_replicas=options.replicas,
        machine=machine,
        options=options,
        one_in_flight=one,
        loaded=loaded,
        bare_one=bare_one,
        bare_loaded=bare_loaded,
        ideal=ideal,
        ceiling=ceiling,
        dead_letters=dead_letters,
        memory=memory,
        ratios=_ratios(one, loaded, bare_one, bare_loaded, ideal, ceiling),
    )


def _ratios(
    one: ProductRun, loaded: ProductRun, bare_one: HopRun | None, bare_loaded: HopRun | None, ideal: IdealRun | None, ceiling: ProductRun | None
) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "hop_over_bare_hop_p50": ratio(one.hop.p50, bare_one.per_hop.p50 if bare_one else None),
        "hop_over_bare_hop_mean": ratio(one.hop.mean, bare_one.per_hop.mean if bare_one else None),
        "throughput_over_ideal": ratio(loaded.steps_per_s, ideal.steps_per_s if ideal else None),
        "ceiling_over_bare_hop_rate": ratio(ceiling.steps_per_s if ceiling else None, bare_loaded.hops_per_s if bare_loaded else None),
    }


# --- output ------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value * 1000:7.1f}"


def _dist(p: Percentiles) -> str:
    return f"p50 {_ms(p.p50)}  p95 {_ms(p.p95)}  p99 {_ms(p.p99)}  mean {_ms(p.mean)} ms  (n={p.count})"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ×"


def format_report(report: BenchReport) -> str:
    """The human-readable report."""
    m, o = report.machine, report.options
    lines = [
        f"umi bench — {m.when} — simulator (not GPUs), {report.simulator_replicas} replica(s) per role",
        f"machine   {m.cores} cores, {m.memory_gib} GiB; RabbitMQ {m.rabbitmq}, PostgreSQL {m.postgresql}, Python {m.python}, Celery {m.celery}",
        f"options   --tasks {o.tasks} --concurrency {o.concurrency} --latency {o.latency} --worker-threads {o.threads} --one-tasks {o.one_tasks}",
        "",
    ]
    for title, run in (("one task in flight", report.one_in_flight), (f"{o.concurrency} tasks in flight", report.loaded)):
        lines += [
            f"[{title}, {run.latency} latency] {run.tasks} tasks {run.statuses}, {run.steps} steps in {run.wall_s:.1f} s: "
            f"{run.steps_per_s:.1f} steps/s, {run.tasks_per_s:.2f} tasks/s",
            f"  hop (added per stored step)   {_dist(run.hop)}",
            f"    stored → next work starts   {_dist(run.hop_before_work)}",
            f"    work ends → row built       {_dist(run.hop_after_work)}",
            "    queue wait (metric, mean)   " + "  ".join(f"{role} {_ms(v)} ms" for role, v in sorted(run.queue_wait_mean_s.items())),
            "    phases, mean wall / CPU ms per job (metrics):",
            *(
                f"      {role:<10} " + "  ".join(f"{phase} {cost.wall_ms:.2f} / {cost.cpu_ms:.2f}" for phase, cost in sorted(costs.items()))
                for role, costs in sorted(run.phases.items())
            ),
        ]
        for role in (r.value for r in ROLES):
            if role in run.step_by_role:
                lines.append(f"  {role:<10} step  {_dist(run.step_by_role[role])}")
                lines.append(f"  {role:<10} work  {_dist(run.work_by_role[role])}")
        lines += [
            f"  task end-to-end   {_dist(run.end_to_end)}",
            "  CPU ms per step (a worker: per step of its role; bench: per step)   " + ", ".join(f"{name.split(':')[0]} {value:.1f}" for name, value in run.cpu_ms_per_step.items())
            + f"  (these processes kept {sum(run.cpu_s.values()) / run.wall_s:.2f} of {os.cpu_count()} cores busy)",
            "",
        ]
    if report.bare_one and report.bare_loaded:
        lines.append(f"[bare Celery hop, 1 chain]  {_dist(report.bare_one.per_hop)}  {report.bare_one.hops_per_s:.0f} hops/s")
        lines.append(f"[bare Celery hop, {report.bare_loaded.chains} chains] {_dist(report.bare_loaded.per_hop)}  {report.bare_loaded.hops_per_s:.0f} hops/s")
    if report.ideal:
        i = report.ideal
        lines.append(f"[ideal in-process loop, {i.latency} latency] {i.tasks} tasks {i.statuses}, {i.steps} steps in {i.wall_s:.1f} s: {i.steps_per_s:.1f} steps/s")
    if report.ceiling:
        lines.append(f"[zero-latency ceiling, {report.ceiling.concurrency} in flight] {report.ceiling.steps_per_s:.1f} steps/s")
    r = report.ratios
    growth = report.memory.growth
    lines += [
        "",
        "ratios (same invocation)",
        f"  a. hop at one task in flight ÷ bare Celery hop:   p50 {_ratio(r['hop_over_bare_hop_p50'])}   mean {_ratio(r['hop_over_bare_hop_mean'])}",
        f"  b. throughput ÷ ideal in-process loop:            {_ratio(r['throughput_over_ideal'])}",
        f"  c. zero-latency ceiling ÷ bare Celery hop rate:   {_ratio(r['ceiling_over_bare_hop_rate'])}",
        "",
        f"errors    tasks not succeeded: {report.not_succeeded}; dead letters: {report.dead_letters}",
        "memory    worker RSS MiB at start / after warm-up → halfway → end (growth warm-up → end):",
        *(
            f"  {name:<18} {report.memory.start_mib.get(name, 0):.0f} / {report.memory.before_mib[name]:.0f}"
            f" → {report.memory.mid_mib.get(name, 0):.0f} → {report.memory.after_mib.get(name, 0):.0f} ({growth.get(name, 0):+.1%})"
            for name in report.memory.before_mib
        ),
    ]
    return "\n".join(lines)


def plot_report(report: BenchReport, path: Path) -> None:
    """Per-role step time and the hop's parts (p50/p95/p99), and throughput against the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    run = report.loaded
    rows = [(f"{role} step", run.step_by_role[role]) for role in (r.value for r in ROLES) if role in run.step_by_role]
    rows += [("hop (1 in flight)", report.one_in_flight.hop), (f"hop ({run.concurrency} in flight)", run.hop), ("task end-to-end", run.end_to_end)]
    if report.bare_one:
        rows.append(("bare Celery hop", report.bare_one.per_hop))
    names = [name for name, _ in rows]
    for offset, (q, colour) in enumerate((("p50", "tab:blue"), ("p95", "tab:orange"), ("p99", "tab:red"))):
        values = [(getattr(p, q) or 0) * 1000 for _, p in rows]
        left.barh([i + offset * 0.27 for i in range(len(rows))], values, height=0.27, label=q, color=colour)
    left.set_yticks([i + 0.27 for i in range(len(rows))], names)
    left.set_xscale("log")
    left.set_xlabel("ms (log)")
    left.set_title(f"latencies, {run.latency} simulator latency, {run.concurrency} tasks in flight")
    left.legend(loc="center right")  # the hop rows leave that corner empty
    bars = [(f"product ({run.latency})", run.steps_per_s)]
    if report.ideal:
        bars.append((f"ideal loop ({report.ideal.latency})", report.ideal.steps_per_s))
    if report.ceiling:
        bars.append(("product, zero latency", report.ceiling.steps_per_s))
    if report.bare_loaded:
        bars.append((f"bare hops ({report.bare_loaded.chains} chains)", report.bare_loaded.hops_per_s))
    drawn = right.bar([name for name, _ in bars], [value for _, value in bars], color="tab:green")
    right.bar_label(drawn, fmt="%.1f")
    right.set_yscale("log")
    right.set_ylabel("steps/s (hops/s), log")
    right.set_title(f"throughput, {run.concurrency} in flight")
    right.tick_params(axis="x", labelrotation=15)
    m = report.machine
    fig.suptitle(f"umi bench (SGLang simulator) — {m.cores} cores, RabbitMQ {m.rabbitmq}, PostgreSQL {m.postgresql}, {m.when}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
