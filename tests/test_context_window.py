"""Prompts longer than the context window minus the output budget are cut from the left (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.simulator import SimulatorConfig, create_app
from shared import crud
from shared.asgi import ServerThread, free_port
from shared.db import session_scope
from shared.llm import fit_to_context
from shared.pipeline import JobOutcome, Runtime
from shared.roles import StepRole
from shared.schemas import StepJob, TaskCreate
from shared.sglang_client import GenerateRequest, SamplingParams, SGLangClient
from shared.sglang_contract import generate_contract_error
from tests.conftest import TRAJECTORIES, load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, run_job, sqlite_settings, stored_steps

CONTEXT = 600
OUTPUT = 64


@pytest.fixture(scope="module")
def small_context_simulator() -> Iterator[str]:
    with ServerThread(create_app(SimulatorConfig(data=[TRAJECTORIES], context_length=CONTEXT))) as server:
        yield server.url


def _request(text: str) -> GenerateRequest:
    return GenerateRequest(text=text, sampling_params=SamplingParams(max_new_tokens=OUTPUT, stop=["</s>"]))


def test_a_long_prompt_keeps_its_last_tokens_and_the_server_accepts_it(small_context_simulator: str) -> None:
    prompt = "".join(f"line {i}: some history\n" for i in range(200))
    with SGLangClient(small_context_simulator) as client:
        fitted = fit_to_context(client, _request(prompt), context_length=4096)
        tokens = client.tokenize(prompt).tokens
        assert fitted.text is None and fitted.input_ids == tokens[-(CONTEXT - OUTPUT):]
        assert generate_contract_error(fitted.to_body()) is None
        result = client.generate(fitted)
    assert result.prompt_tokens == CONTEXT - OUTPUT


def test_a_prompt_that_cannot_be_too_long_is_sent_as_text_without_tokenizing() -> None:
    dead = SGLangClient(f"http://127.0.0.1:{free_port()}", max_retries=0)  # any call would fail
    request = _request("short prompt")
    assert fit_to_context(dead, request, context_length=CONTEXT) is request


def test_a_prompt_that_fits_after_tokenizing_stays_text(small_context_simulator: str) -> None:
    prompt = "x" * (CONTEXT - OUTPUT + 10)  # more characters than the budget, but ~4 per token
    with SGLangClient(small_context_simulator) as client:
        assert fit_to_context(client, _request(prompt), context_length=CONTEXT).text == prompt


def test_the_planner_step_of_a_long_trajectory_is_generated_from_the_cut_prompt(tmp_path: Path, small_context_simulator: str) -> None:
    record = load_trajectories()[2]
    turns = record["conversations"]
    last_observation = max(i for i, turn in enumerate(turns) if turn["from"] == "observation")
    rt = Runtime(
        settings=sqlite_settings(tmp_path, small_context_simulator, context_length=CONTEXT, max_new_tokens=OUTPUT),
        dispatcher=CollectingDispatcher(),
    )
    with session_scope(rt.engine) as session:
        task = crud.create_task(
            session=session,
            task_in=TaskCreate(query=turns[0]["value"], tools=record["tools"], history=turns[1 : last_observation + 1]),
            max_steps=12,
            timeout_s=60,
            constrained=True,
        )
    job = StepJob(task_id=task.id, step_index=last_observation + 1, role=StepRole.PLANNER)
    assert run_job(rt, job) is JobOutcome.STORED
    planner = stored_steps(rt, task.id)[-1]
    assert planner.role == "planner" and planner.prompt_tokens == CONTEXT - OUTPUT
