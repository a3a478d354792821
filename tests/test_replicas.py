"""Several SGLang replicas per role: task-affine routing, prefix-cache reuse, failover, router mode.

The replicas are real simulator servers (``services.simulator``, over HTTP, each with its
own radix prefix cache); tasks run through the real role handlers (``tests.pipeline_helpers``)
on SQLite, and the cache figures come from the ``cached_tokens`` / ``prompt_tokens`` the
simulated servers reported, as stored per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.simulator import SimulatorConfig, create_app
from shared import crud
from shared.asgi import ServerThread
from shared.db import get_engine, upgrade_schema
from shared.llm import fit_to_context, replicas_for_role
from shared.pipeline import Runtime
from shared.replicas import ROUTING_KEY_HEADER, rendezvous_order, replica_label
from shared.roles import LLMRole, StepRole
from shared.settings import ConfigurationError, Settings, load_settings
from shared.sglang_client import GenerateRequest, SamplingParams
from tests.conftest import REPO, TRAIN_FILES, TRAJECTORIES, load_trajectories, single_chain_indices
from tests.pipeline_helpers import CollectingDispatcher, create_task, run_to_end, stored_steps
from umi.deployment import Deployment

REPLICAS = 4
#: Recorded tasks with several steps per LLM role (planner, caller; summarizer once).
TASKS = 10


def start_replicas(count: int) -> dict[LLMRole, list[ServerThread]]:
    """``count`` simulator replicas per LLM role, each with its own prefix cache."""
    return {role: [ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES))).start() for _ in range(count)] for role in LLMRole}


@pytest.fixture
def replicas() -> Iterator[dict[LLMRole, list[ServerThread]]]:
    servers = start_replicas(REPLICAS)
    yield servers
    for role_servers in servers.values():
        for server in role_servers:
            server.stop()


def replica_settings(tmp_path: Path, servers: dict[LLMRole, list[ServerThread]], **overrides: Any) -> Settings:
    """Migrated SQLite, every role's ``UMI_<ROLE>_LLM_URL`` listing its replicas."""
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/umi.db",
        tools_mirror=TRAJECTORIES,
        llm_backoff_s=0.01,
        **{f"{role.value}_llm_url": ",".join(server.url for server in role_servers) for role, role_servers in servers.items()},
        **overrides,
    )
    upgrade_schema(settings.database_url)
    return settings


def cache_ratio_after_first_step(rt: Runtime, task_ids: list[uuid.UUID]) -> dict[str, float]:
    """Per LLM role: cached / prompt tokens over every step after the task's first of that role."""
    return ratio_of_steps([stored_steps(rt, task_id) for task_id in task_ids])


def ratio_of_steps(tasks: list[list[Any]]) -> dict[str, float]:
    """Per LLM role: cached / prompt tokens of each task's stored steps after its first of that role."""
    cached: dict[str, int] = {}
    prompt: dict[str, int] = {}
    for steps in tasks:
        seen: set[StepRole] = set()
        for step in steps:
            if step.role not in {StepRole.PLANNER, StepRole.CALLER, StepRole.SUMMARIZER}:
                continue
            if step.role in seen:
                cached[step.role.value] = cached.get(step.role.value, 0) + (step.cached_tokens or 0)
                prompt[step.role.value] = prompt.get(step.role.value, 0) + (step.prompt_tokens or 0)
            seen.add(step.role)
    return {role: cached[role] / prompt[role] for role in prompt}


def run_tasks(settings: Settings, count: int) -> tuple[Runtime, list[uuid.UUID]]:
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=settings, dispatcher=dispatcher)
    records = load_trajectories()
    task_ids = []
    for record in [records[index] for index in single_chain_indices(records)[:count]]:
        task_id = create_task(rt, record)
        run_to_end(rt, dispatcher, task_id)
        assert [s.output for s in stored_steps(rt, task_id)] == [t["value"] for t in record["conversations"]]
        task_ids.append(task_id)
    return rt, task_ids


# --------------------------------------------------------------------------- settings


def test_llm_urls_are_comma_separated_lists_and_errors_name_the_variable() -> None:
    settings = load_settings(caller_llm_url=" http://10.0.0.1:30002/ , http://10.0.0.2:30002")
    assert settings.llm_urls(LLMRole.CALLER) == ["http://10.0.0.1:30002", "http://10.0.0.2:30002"]
    assert settings.llm_urls(LLMRole.PLANNER) == ["http://127.0.0.1:30001"]
    for bad in ("http://a:1,", "http://a:1,http://a:1/", "http://a:1,a:2"):
        with pytest.raises(ConfigurationError, match="UMI_CALLER_LLM_URL"):
            load_settings(caller_llm_url=bad)
    with pytest.raises(ConfigurationError, match="UMI_CALLER_LLM_URL.*one router URL"):
        load_settings(caller_llm_url="http://a:1,http://b:1", llm_router=True)


# --------------------------------------------------------------------------- hashing


def test_a_task_id_picks_the_same_replica_in_another_process() -> None:
    labels = [f"10.0.0.{n}:30001" for n in range(1, 5)]
    keys = [uuid.UUID(int=n * 7919).hex for n in range(200)]
    here = [rendezvous_order(key, labels) for key in keys]
    script = (
        "import json, sys; from shared.replicas import rendezvous_order; "
        "keys, labels = json.load(sys.stdin); print(json.dumps([rendezvous_order(k, labels) for k in keys]))"
    )
    # A fresh interpreter has its own hash() salt: the choice must not depend on it.
    there = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps([keys, labels]), capture_output=True, text=True, check=True, cwd=REPO,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(there.stdout) == here
    homes = [order[0] for order in here]
    assert all(30 <= homes.count(label) <= 70 for label in labels), "tasks spread evenly over the replicas"
    # Losing one replica moves only its tasks, each to its second choice.
    without = [rendezvous_order(key, labels[1:])[0] for key in keys]
    for order, home in zip(here, without, strict=True):
        assert home == (order[1] if order[0] == labels[0] else order[0])


# --------------------------------------------------------------------------- prefix-cache reuse


def flush_caches(servers: dict[LLMRole, list[ServerThread]]) -> None:
    for role_servers in servers.values():
        for server in role_servers:
            httpx.post(server.url + "/flush_cache", timeout=5).raise_for_status()


def measured_ratio(settings: Settings) -> dict[str, float]:
    rt, task_ids = run_tasks(settings, TASKS)
    try:
        return cache_ratio_after_first_step(rt, task_ids)
    finally:
        rt.close()


def test_task_affine_routing_keeps_the_prefix_cache_of_one_server_and_round_robin_does_not(
    tmp_path: Path, replicas: dict[LLMRole, list[ServerThread]]
) -> None:
    # The bound: one server per role sees every step of every task, so it reuses all that the
    # α-UMi prompts allow (each step's prompt drops the previous one's closing instruction).
    single = measured_ratio(replica_settings(tmp_path / "one", {role: servers[:1] for role, servers in replicas.items()}))
    flush_caches(replicas)
    affine = measured_ratio(replica_settings(tmp_path / "task", replicas))
    flush_caches(replicas)
    round_robin = measured_ratio(replica_settings(tmp_path / "rr", replicas, llm_routing="round_robin"))
    print(f"\ncached/prompt tokens after each task's first step of a role, {TASKS} tasks (simulator):")
    print(f"  1 replica per role:              {single}")
    print(f"  {REPLICAS} replicas, task-affine:       {affine}")
    print(f"  {REPLICAS} replicas, round robin:       {round_robin}")
    assert set(affine) == {"planner", "caller"}  # the summarizer speaks once per task
    for role in affine:
        assert affine[role] >= 0.97 * single[role], (role, affine, single)
        assert round_robin[role] <= 0.6 * affine[role], (role, round_robin, affine)


def test_worker_processes_of_one_role_send_a_task_to_the_same_replica(
    rabbitmq_url: str, postgres_url: str, tmp_path: Path, replicas: dict[LLMRole, list[ServerThread]]
) -> None:
    """Real RabbitMQ, PostgreSQL and worker processes, two per LLM role, over 4 simulator replicas per role:
    a task's steps meet their prefix again only if both processes pick the same replica for it."""
    bound = measured_ratio(replica_settings(tmp_path, {role: servers[:1] for role, servers in replicas.items()}))
    (tmp_path / "logs").mkdir()
    system = Deployment(rabbitmq_url=rabbitmq_url, postgres_url=postgres_url, log_dir=tmp_path / "logs", replicas=REPLICAS)
    try:
        system.start_all_workers()
        for role in (StepRole.PLANNER, StepRole.CALLER):
            system.start_worker(role)
            system.wait_for_consumers(role, at_least=2)
        records = load_trajectories()
        chosen = [records[index] for index in single_chain_indices(records)[:TASKS]]
        task_ids = [system.submit(record["conversations"][0]["value"], record["tools"]) for record in chosen]
        assert all(system.wait(task_id, timeout_s=90)["status"] == "succeeded" for task_id in task_ids)
        with Session(get_engine(system.settings.database_url)) as session:
            ratio = ratio_of_steps([crud.list_steps(session=session, task_id=uuid.UUID(task_id)) for task_id in task_ids])
    finally:
        system.close()
    print(f"\n2 worker processes per role, {REPLICAS} replicas: {ratio} (one server: {bound})")
    for role in bound:
        assert ratio[role] >= 0.97 * bound[role], (role, ratio, bound)


# --------------------------------------------------------------------------- failover


def replica_requests(role: LLMRole, url: str) -> float:
    return REGISTRY.get_sample_value(
        "umi_llm_replica_requests_total", {"role": role.value, "replica": replica_label(url), "outcome": "ok"}
    ) or 0.0


def test_a_replica_that_goes_down_hands_its_tasks_on_and_gets_them_back(
    tmp_path: Path, replicas: dict[LLMRole, list[ServerThread]]
) -> None:
    settings = replica_settings(tmp_path, replicas, llm_health_interval_s=60)
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=settings, dispatcher=dispatcher)
    record = load_trajectories()[2]  # planner three times
    task_id = create_task(rt, record)
    urls = settings.llm_urls(LLMRole.PLANNER)
    home_label = rendezvous_order(task_id.hex, [replica_label(url) for url in urls])[0]
    home = next(server for server in replicas[LLMRole.PLANNER] if replica_label(server.url) == home_label)
    before = replica_requests(LLMRole.PLANNER, home.url)
    home.stop()  # the task's planner replica is gone before its first step
    run_to_end(rt, dispatcher, task_id)
    assert [s.output for s in stored_steps(rt, task_id)] == [t["value"] for t in record["conversations"]]
    assert replica_requests(LLMRole.PLANNER, home.url) == before
    planner_set = rt.resources["llm:planner"]
    assert REGISTRY.get_sample_value("umi_llm_replica_up", {"role": "planner", "replica": home_label}) == 0
    # Its other requests all went to its second choice, which keeps its cache warm.
    assert planner_set.order(task_id.hex)[0].label != home_label
    # The replica comes back on its port: the next health check returns the task to it.
    revived = ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES)), port=home.port).start()
    try:
        planner_set.check_health()
        assert planner_set.order(task_id.hex)[0].label == home_label
        request = GenerateRequest(text="Hello", sampling_params=SamplingParams(max_new_tokens=4))
        planner_set.for_task(task_id.hex).generate(request)
        assert replica_requests(LLMRole.PLANNER, home.url) == before + 1
    finally:
        revived.stop()
        rt.close()


def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_background_health_check_skips_a_dead_replica_and_takes_it_back() -> None:
    first, second = (ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES))).start() for _ in range(2))
    settings = Settings(planner_llm_url=f"{first.url},{second.url}", llm_health_interval_s=0.1)
    with replicas_for_role(LLMRole.PLANNER, settings) as planner:
        key = next(k for k in (uuid.uuid4().hex for _ in range(100)) if planner.order(k)[0].label == replica_label(first.url))
        first.stop()  # no request fails: only the health check can notice
        wait_until(lambda: planner.order(key)[0].label == replica_label(second.url))
        revived = ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES)), port=first.port).start()
        wait_until(lambda: planner.order(key)[0].label == replica_label(first.url))
    revived.stop()
    second.stop()


def busy_app(hits: list[str]) -> Starlette:
    """A replica whose queue is full: 503 on every route, as SGLang with ``--max-queued-requests``."""

    async def busy(request: Request) -> JSONResponse:
        hits.append(request.url.path)
        return JSONResponse({"object": "error", "message": "The request queue is full.", "code": 503}, status_code=503)

    return Starlette(routes=[Route("/{path:path}", busy, methods=["GET", "POST"])])


def test_a_503_moves_the_retry_to_the_next_replica_and_marks_the_busy_one_down(simulator_url: str) -> None:
    hits: list[str] = []
    with ServerThread(busy_app(hits)) as busy:
        settings = Settings(planner_llm_url=f"{busy.url},{simulator_url}", llm_backoff_s=0.01, llm_max_retries=2)
        with replicas_for_role(LLMRole.PLANNER, settings) as planner:
            key = next(k for k in (uuid.uuid4().hex for _ in range(100)) if planner.order(k)[0].label == replica_label(busy.url))
            result = planner.for_task(key).generate(GenerateRequest(text="Hello", sampling_params=SamplingParams(max_new_tokens=4), rid="r1"))
            assert result.attempts == 2 and hits == ["/generate"]
            assert planner.order(key)[0].label == replica_label(simulator_url)  # skipped until healthy
            planner.check_health()
            assert planner.order(key)[0].label == replica_label(simulator_url)  # /health answers 503 too
            assert hits == ["/generate", "/health"]


# --------------------------------------------------------------------------- router mode


class RecordingRouter:
    """A stand-in for an SGLang router in front of a simulator: records requests, serves no /tokenize."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    async def handle(self, request: Request) -> JSONResponse:
        with self.lock:
            self.requests.append((request.url.path, dict(request.headers)))
        if request.url.path == "/tokenize":
            return JSONResponse({"error": "Not Found"}, status_code=404)
        async with httpx.AsyncClient() as client:
            answer = await client.request(request.method, self.upstream + request.url.path, content=await request.body(), timeout=10)
        return JSONResponse(answer.json(), status_code=answer.status_code)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])


def test_router_mode_sends_the_task_id_as_routing_key_and_never_asks_tokenize(simulator_url: str) -> None:
    router = RecordingRouter(simulator_url)
    with ServerThread(router.app()) as server:
        settings = Settings(caller_llm_url=server.url, llm_router=True, llm_max_retries=0)
        with replicas_for_role(LLMRole.CALLER, settings) as caller:
            client = caller.for_task("task-42")
            long = GenerateRequest(text="word " * 400, sampling_params=SamplingParams(max_new_tokens=16))
            fitted = fit_to_context(client, long, context_length=128)
            assert fitted.text is not None and len(fitted.text.encode()) < 128 and long.text.endswith(fitted.text)
            client.generate(GenerateRequest(text="Hello", sampling_params=SamplingParams(max_new_tokens=4)))
    assert [path for path, _ in router.requests] == ["/generate"]
    assert router.requests[0][1][ROUTING_KEY_HEADER.lower()] == "task-42"
