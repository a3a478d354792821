"""A multi-process deployment on one machine, for end-to-end tests and the benchmark.

Real RabbitMQ (a per-session vhost), real PostgreSQL, each role worker as its own
``umi worker <role>`` process, the gateway on real HTTP, and the SGLang
simulator standing in for the three GPU servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from kombu import Connection

from services.gateway.app import create_app as create_gateway
from services.simulator import SimulatorConfig
from services.simulator import create_app as create_simulator
from shared.asgi import ServerThread, free_port
from shared.db import get_engine, upgrade_schema
from shared.example_data import BUNDLED_TRAJECTORIES as TRAJECTORIES
from shared.lifecycle import TERMINAL_STATUSES
from shared.roles import LLMRole, StepRole
from shared.settings import Settings, load_settings
from shared.topology import QUEUE_ROLES, Topology

#: The local servers' admin connections (trust auth, the guest user), as on the development machine.
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RABBITMQ_LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672"


@contextlib.contextmanager
def scratch_backends(prefix: str = "umi-scratch") -> Iterator[tuple[str, str]]:
    """A new vhost on the local RabbitMQ and a new migrated database on the local PostgreSQL,
    both removed afterwards: (broker URL, database URL)."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:6]}"
    database = vhost.replace("-", "_")
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True)
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    postgres_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    try:
        upgrade_schema(postgres_url)
        yield f"{RABBITMQ_LOCAL_URL}/{vhost}", postgres_url
    finally:
        get_engine(postgres_url).dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)


class Deployment:
    """Simulators + gateway in this process, one worker process per role."""

    def __init__(
        self,
        *,
        rabbitmq_url: str,
        postgres_url: str,
        log_dir: Path,
        simulator: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        replicas: int = 1,
    ) -> None:
        """``simulator`` are simulator config fields (``data`` replaces the bundled trajectories);
        ``settings`` are extra settings fields, given to the workers as ``UMI_*`` variables too;
        ``replicas`` simulators per role (each its own prefix cache), listed in ``UMI_<ROLE>_LLM_URL``."""
        self.log_dir = log_dir
        config = {"data": [TRAJECTORIES], **(simulator or {})}
        #: Every role's simulator replicas; ``simulators`` holds the first of each.
        self.replicas = {
            role: [
                ServerThread(create_simulator(SimulatorConfig.model_validate({"role": role.value, **config}))).start()
                for _ in range(replicas)
            ]
            for role in LLMRole
        }
        self.simulators = {role: servers[0] for role, servers in self.replicas.items()}
        llm_urls = {role: ",".join(server.url for server in servers) for role, servers in self.replicas.items()}
        self.env = {
            "UMI_BROKER_URL": rabbitmq_url,
            "UMI_DATABASE_URL": postgres_url,
            "UMI_QUEUE_PREFIX": f"umi{uuid.uuid4().hex[:6]}",
            "UMI_TOOLS_MIRROR": str(TRAJECTORIES),
            "UMI_LLM_BACKOFF_S": "0.05",
            **{f"UMI_{role.value.upper()}_LLM_URL": urls for role, urls in llm_urls.items()},
            **{f"UMI_{name.upper()}": str(value) for name, value in (settings or {}).items()},
        }
        self.settings: Settings = load_settings(
            broker_url=rabbitmq_url,
            database_url=postgres_url,
            queue_prefix=self.env["UMI_QUEUE_PREFIX"],
            tools_mirror=TRAJECTORIES,
            **{f"{role.value}_llm_url": urls for role, urls in llm_urls.items()},
            **(settings or {}),
        )
        self.topology = Topology(self.settings)
        self.workers: dict[StepRole, subprocess.Popen[bytes]] = {}
        #: Every worker process started, all stopped by :meth:`close` (``workers`` keeps the last per role).
        self.processes: list[subprocess.Popen[bytes]] = []
        #: Each worker process's service (its role, or ``ingress``) and Prometheus port (its own ``UMI_METRICS_PORT``).
        self.metrics_ports: dict[subprocess.Popen[bytes], tuple[str, int]] = {}
        self.gateway = ServerThread(create_gateway(self.settings)).start()
        self.http = httpx.Client(base_url=self.gateway.url, timeout=30)

    # --- workers -------------------------------------------------------------
    def start_worker(self, role: StepRole, *, concurrency: int = 4, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start ``umi worker <role>`` and wait until it consumes its queue (unless ``wait`` is false)."""
        log = open(self.log_dir / f"worker-{role.value}-{len(os.listdir(self.log_dir))}.log", "wb")
        metrics_port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "umi", "worker", role.value, "--concurrency", str(concurrency), "--loglevel", "INFO"],
            env={**os.environ, **self.env, "UMI_METRICS_PORT": str(metrics_port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers[role] = process
        self.processes.append(process)
        self.metrics_ports[process] = (role.value, metrics_port)
        if wait:
            self.wait_for_consumers(role, at_least=1, process=process)
        return process

    def start_ingress(self, *, env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start ``umi worker ingress`` (``env``: extra variables, e.g. ``UMI_AUTH``) and wait until it
        consumes (unless ``wait`` is false); its metrics are served on a free port unless ``env`` sets one."""
        log = open(self.log_dir / f"ingress-{len(os.listdir(self.log_dir))}.log", "wb")
        env = {"UMI_METRICS_PORT": str(free_port()), **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "umi", "worker", "ingress", "--loglevel", "INFO"],
            env={**os.environ, **self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        self.metrics_ports[process] = ("ingress", int(env["UMI_METRICS_PORT"]))
        if wait:
            self.wait_for_ingress(process)
        return process

    def wait_for_ingress(self, process: subprocess.Popen[bytes] | None = None) -> None:
        """Wait until an ingress worker consumes ``umi.ingress``."""
        self._wait_for_queue_consumers(self.topology.ingress_queue_name, "ingress", process=process, timeout_s=60)

    def start_all_workers(self) -> None:
        for role in QUEUE_ROLES:
            self.start_worker(role)

    def metrics_urls(self) -> dict[str, list[str]]:
        """The ``/metrics`` URLs of every running process, by role (``gateway``: this process, which runs it)."""
        urls: dict[str, list[str]] = {"gateway": [f"{self.gateway.url}/metrics"]}
        for process, (service, port) in self.metrics_ports.items():
            if process.poll() is None:
                urls.setdefault(service, []).append(f"http://127.0.0.1:{port}/metrics")
        return urls

    def consumer_count(self, role: StepRole) -> int:
        return self.queue_consumer_count(self.topology.queue_name(role))

    def queue_consumer_count(self, queue: str) -> int:
        """How many consumers ``queue`` has now (raises if it is not declared yet)."""
        with Connection(self.settings.broker_url) as connection:
            declared = connection.default_channel.queue_declare(queue, passive=True)
            return int(declared.consumer_count)

    def wait_for_consumers(self, role: StepRole, *, at_least: int, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 60) -> None:
        self._wait_for_queue_consumers(self.topology.queue_name(role), role.value, at_least=at_least, process=process, timeout_s=timeout_s)

    def _wait_for_queue_consumers(
        self, queue: str, what: str, *, at_least: int = 1, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{what} worker exited with {process.returncode}; see {self.log_dir}")
            try:
                if self.queue_consumer_count(queue) >= at_least:
                    return
            except Exception:  # queue not declared yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} worker did not start consuming within {timeout_s}s; see {self.log_dir}")

    def kill_worker(self, role: StepRole) -> None:
        """SIGKILL a worker: no warm shutdown, no acks."""
        process = self.workers.pop(role)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    # --- tasks -----------------------------------------------------------------
    def submit(self, query: str, tools: list[dict[str, Any]], **extra: Any) -> str:
        response = self.http.post("/v1/tasks", json={"query": query, "tools": tools, **extra})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def get(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, task_id: str, *, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            task = self.get(task_id)
            if task["status"] in TERMINAL_STATUSES:
                return task
            time.sleep(0.1)
        raise TimeoutError(f"task {task_id} did not finish in {timeout_s}s: {self.get(task_id)}")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.http.close()
        self.gateway.stop()
        for servers in self.replicas.values():
            for server in servers:
                server.stop()
