"""SGLang grammar backends: the caller's EBNF needs xgrammar or llguidance (issue 7, item 5).

SGLang's ``outlines`` backend compiles JSON schemas and regexes but no EBNF, so every
constrained caller request would abort; ``none`` compiles nothing. The LLM step reads the
server's ``--grammar-backend`` from ``/server_info`` once per process and drops what the
server cannot compile (with a warning naming the fix) instead of failing every task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.simulator import SimulatorConfig, create_app
from shared.asgi import ServerThread
from shared.llm import GRAMMAR_BACKEND_KINDS, server_constraint_kinds
from shared.pipeline import Runtime
from shared.roles import LLMRole
from shared.sglang_client import SGLangClient
from tests.conftest import TRAIN_FILES, load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, create_task, run_to_end, sqlite_settings, stored_steps


@pytest.fixture(scope="module", params=["outlines", "none", "llguidance", "xgrammar"])
def backend_simulator(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    with ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES, grammar_backend=request.param))) as server:
        yield request.param, server.url


def test_the_simulator_behaves_as_its_grammar_backend(backend_simulator: tuple[str, str]) -> None:
    backend, url = backend_simulator
    body = {"text": "Q: x caller: ", "sampling_params": {"max_new_tokens": 8, "ebnf": 'root ::= "a"'}}
    answer = httpx.post(f"{url}/generate", json=body, timeout=10)
    if backend in ("llguidance", "xgrammar"):
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 400
        expected = "Failed to compile ebnf grammar" if backend == "outlines" else "--grammar-backend none"
        assert expected in answer.json()["error"]["message"]
    with SGLangClient(url) as client:
        assert client.server_info().grammar_backend == backend


def test_a_constrained_task_runs_on_any_backend_dropping_what_the_server_cannot_compile(
    tmp_path: Path, backend_simulator: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    backend, url = backend_simulator
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=sqlite_settings(tmp_path, url, constrained=True), dispatcher=dispatcher)
    record = load_trajectories()[2]
    task_id = create_task(rt, record)
    with caplog.at_level(logging.WARNING, logger="shared.llm"):
        run_to_end(rt, dispatcher, task_id)
    assert [s.output for s in stored_steps(rt, task_id)] == [t["value"] for t in record["conversations"]]
    warnings = [r.getMessage() for r in caplog.records if "grammar-backend" in r.getMessage()]
    if backend in ("llguidance", "xgrammar"):
        assert warnings == []
    else:
        assert any("caller requests go unconstrained" in w and "xgrammar or llguidance" in w for w in warnings), warnings
        assert len(warnings) <= 2  # asked once per process and role, not once per step


def test_a_server_that_does_not_report_a_backend_is_taken_as_sglangs_default() -> None:
    """E.g. a router whose ``/get_server_info`` has no ``grammar_backend``: SGLang's default, xgrammar."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    async def bare_info(request: object) -> JSONResponse:
        return JSONResponse({"version": "0.5.23"})

    front = Starlette(routes=[Route("/server_info", bare_info), Mount("/", app=create_app(SimulatorConfig(data=TRAIN_FILES)))])
    with ServerThread(front) as server, SGLangClient(server.url) as client:
        assert client.server_info().grammar_backend is None
        assert server_constraint_kinds(client, LLMRole.CALLER) == GRAMMAR_BACKEND_KINDS["xgrammar"]


def test_the_llm_workers_check_the_grammar_backend_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from services.caller.worker import create_app as create_caller_app
    from services.planner.worker import create_app as create_planner_app

    with ServerThread(create_app(SimulatorConfig(data=TRAIN_FILES, grammar_backend="outlines"))) as server:
        settings = sqlite_settings(tmp_path, server.url, constrained=True)
        with caplog.at_level(logging.WARNING, logger="shared.llm"):
            create_caller_app(settings).conf.umi_start_up()
            create_planner_app(settings).conf.umi_start_up()
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("caller SGLang server") and "outlines" in w for w in warnings), warnings
    assert not any(w.startswith("planner SGLang server") for w in warnings)  # outlines compiles the planner's regex


def test_a_worker_starts_although_its_llm_server_is_not_up_yet(tmp_path: Path) -> None:
    from services.caller.worker import create_app as create_caller_app
    from shared.asgi import free_port

    settings = sqlite_settings(tmp_path, f"http://127.0.0.1:{free_port()}", constrained=True, llm_connect_timeout_s=0.5)
    create_caller_app(settings).conf.umi_start_up()  # no exception: it is asked again on the first step
