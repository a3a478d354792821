#!/usr/bin/env python
"""Micro benchmark: the SGLang simulator's own CPU per ``/generate`` (and ``/tokenize``) request.

Starts ``python -m services.simulator`` (instant latency, all roles, the bundled data) as a
subprocess, then sends the α-UMi requests the product sends — every planner, caller and
summarizer decision point of the bundled single-chain trajectories, rendered with
``shared/prompts.py`` and built with ``build_role_request(..., constrained=True)`` as
``umi bench``'s ideal loop does — round-robin, ``--concurrency`` at a time, ``--requests`` in
all (after a warm-up pass). It reports the simulator process's CPU time ÷ requests (user +
system, read with psutil, so the load generator's own CPU does not count) and requests/s.

    .venv/bin/python scripts/bench_simulator.py [--requests 3000] [--concurrency 8] [--repeat 3] [--tokenize]
                                                [--py-spy stacks.txt]

Timings on a shared machine are noisy: compare the medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.simulator.replay import trajectory_decision_points  # noqa: E402
from shared.example_data import load_trajectories, single_chain_indices  # noqa: E402
from shared.llm import build_role_request  # noqa: E402
from shared.prompts import ToolDoc  # noqa: E402
from shared.settings import Settings  # noqa: E402


def request_bodies() -> list[dict[str, Any]]:
    """One ``/generate`` body per decision point of the bundled single-chain trajectories."""
    settings = Settings()
    records = load_trajectories()
    bodies = []
    for index in single_chain_indices(records):
        record = records[index]
        tools = [ToolDoc.model_validate(tool) for tool in record["tools"]]
        for role, prompt, _ in trajectory_decision_points(record):
            request = build_role_request(role, prompt, tools=tools, settings=settings, constrained=True)
            bodies.append(request.to_body())
    return bodies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_simulator(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "services.simulator", "--port", str(port), "--latency", "instant",
               "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the simulator did not come up")


async def drive(url: str, path: str, bodies: list[dict[str, Any]], requests: int, concurrency: int) -> float:
    """Send ``requests`` bodies round-robin, ``concurrency`` at a time; returns the wall time."""
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def lane() -> None:
            nonlocal next_index
            while next_index < requests:
                body = bodies[next_index % len(bodies)]
                next_index += 1
                response = await client.post(path, json=body)
                response.raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return time.monotonic() - started


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokenize", action="store_true", help="measure /tokenize with the same prompts instead")
    parser.add_argument("--py-spy", metavar="FILE", help="also record the simulator with py-spy (raw folded stacks, --gil)")
    args = parser.parse_args()

    bodies = request_bodies()
    path = "/generate"
    if args.tokenize:
        path, bodies = "/tokenize", [{"prompt": body["text"]} for body in bodies]
    port = free_port()
    server = start_simulator(port)
    url = f"http://127.0.0.1:{port}"
    try:
        process = psutil.Process(server.pid)
        asyncio.run(drive(url, path, bodies, len(bodies), args.concurrency))  # warm-up: every prompt once
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "-f", "raw",
                                    "-o", args.py_spy, "--pid", str(server.pid)])
            time.sleep(1)
        cpu_ms, rates = [], []
        for run in range(args.repeat):
            before = cpu_seconds(process)
            wall = asyncio.run(drive(url, path, bodies, args.requests, args.concurrency))
            used = cpu_seconds(process) - before
            cpu_ms.append(used * 1000 / args.requests)
            rates.append(args.requests / wall)
            print(f"run {run + 1}: {cpu_ms[-1]:.3f} CPU ms/request, {rates[-1]:.0f} requests/s", flush=True)
        print(f"{path}: {len(bodies)} distinct prompts, {args.requests} requests x {args.repeat}, "
              f"concurrency {args.concurrency}: median {statistics.median(cpu_ms):.3f} CPU ms/request, "
              f"{statistics.median(rates):.0f} requests/s")
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
