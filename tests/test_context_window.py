"""Prompts longer than the context window minus the output budget are cut from the left.

As the α-UMi reference keeps ``tokens[-max_len:]``. The tokenizer-free shortcut counts
UTF-8 bytes, not characters: with Llama-2's byte fallback one emoji is four tokens (the
simulator's pseudo-tokenizer models that). Where no ``/tokenize`` route exists (an SGLang
router), the prompt is cut by its byte count instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.simulator import SimulatorConfig, create_app
from shared import crud
from shared.asgi import ServerThread, free_port
from shared.context_window import PROMPT_OVERHEAD_TOKENS, cut_text_to_tokens, max_prompt_tokens
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
    assert _run_long_planner_step(tmp_path, small_context_simulator, CONTEXT) == CONTEXT - OUTPUT


EMOJI = "\U0001F600"


def test_an_emoji_prompt_that_fits_by_characters_but_not_by_tokens_is_cut(small_context_simulator: str) -> None:
    budget = CONTEXT - OUTPUT
    prompt = "history " + EMOJI * (budget // 2) + " question"  # ~half the budget in characters, ~2x in tokens
    assert len(prompt) + 1 <= budget  # the old character shortcut would have sent it whole
    with SGLangClient(small_context_simulator) as client:
        assert client.tokenize(prompt).count > budget
        fitted = fit_to_context(client, _request(prompt), context_length=CONTEXT)
        assert fitted.text is None and len(fitted.input_ids) == budget
        result = client.generate(fitted)
    assert result.prompt_tokens == budget


def test_the_byte_bound_never_undercounts() -> None:
    from services.simulator import PseudoTokenizer

    for text in ["plain ascii text", EMOJI * 7, "mixed é ü " + EMOJI + " 中文 text", "\u0000 nul", ""]:
        assert PseudoTokenizer.count(text) + 1 <= max_prompt_tokens(text)
        for budget in (3, 5, 11, 40):
            cut = cut_text_to_tokens(text, budget)
            assert text.endswith(cut) and max_prompt_tokens(cut) <= max(budget, PROMPT_OVERHEAD_TOKENS)


@pytest.fixture(scope="module")
def router_without_tokenize() -> Iterator[str]:
    """The simulator behind a front that has no ``/tokenize`` route, like an SGLang router."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    simulator = create_app(SimulatorConfig(data=[TRAJECTORIES], context_length=CONTEXT))

    async def not_found(request: object) -> JSONResponse:
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    front = Starlette(routes=[Route("/tokenize", not_found, methods=["POST"]), Mount("/", app=simulator)])
    with ServerThread(front) as server:
        yield server.url


def test_without_tokenize_the_prompt_is_cut_by_its_byte_count_and_fits(router_without_tokenize: str) -> None:
    prompt = "".join(f"line {i}: some history {EMOJI}\n" for i in range(200))
    with SGLangClient(router_without_tokenize, max_retries=0) as client:
        fitted = fit_to_context(client, _request(prompt), context_length=CONTEXT)
        assert fitted.input_ids is None and fitted.text and prompt.endswith(fitted.text)
        result = client.generate(fitted)  # the server accepts it: no context overflow
    assert result.prompt_tokens <= CONTEXT - OUTPUT


def test_a_task_whose_output_budget_leaves_no_room_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    from sqlmodel import Session, select

    from shared.context_window import PromptDoesNotFit
    from shared.models import Task
    from shared.tasks import submit_task

    settings = sqlite_settings(tmp_path, "http://127.0.0.1:9")
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=settings, dispatcher=dispatcher)
    task_in = TaskCreate(query="q", tools=load_trajectories()[14]["tools"], max_new_tokens=settings.context_length - 10)
    with pytest.raises(PromptDoesNotFit, match="max_new_tokens"):
        submit_task(engine=rt.engine, dispatcher=dispatcher, settings=settings, task_in=task_in)
    with Session(rt.engine) as session:
        assert session.exec(select(Task)).all() == []
    assert dispatcher.jobs == []


def test_settings_that_leave_no_room_for_a_prompt_are_refused() -> None:
    from shared.settings import ConfigurationError, load_settings

    with pytest.raises(ConfigurationError, match="UMI_MAX_NEW_TOKENS / UMI_CONTEXT_LENGTH"):
        load_settings(context_length=1024, max_new_tokens=1000)


class _CountingFront:
    """The simulator behind an ASGI front that counts requests per path and keeps /generate bodies."""

    def __init__(self, context_length: int) -> None:
        self.simulator = create_app(SimulatorConfig(data=[TRAJECTORIES], context_length=context_length))
        self.calls: Counter[str] = Counter()
        self.generate_bodies: list[dict[str, object]] = []

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.simulator(scope, receive, send)
        self.calls[scope["path"]] += 1
        if scope["path"] != "/generate":
            return await self.simulator(scope, receive, send)
        chunks: list[dict] = []
        while not chunks or chunks[-1].get("more_body"):
            chunks.append(await receive())
        self.generate_bodies.append(json.loads(b"".join(chunk.get("body", b"") for chunk in chunks)))
        replay = iter(chunks)

        async def replayed() -> dict:
            return next(replay)

        return await self.simulator(scope, replayed, send)


def _run_long_planner_step(tmp_path: Path, url: str, context_length: int) -> int:
    """Store the planner step after a long recorded history; its prompt tokens."""
    record = load_trajectories()[2]
    turns = record["conversations"]
    last_observation = max(i for i, turn in enumerate(turns) if turn["from"] == "observation")
    rt = Runtime(
        settings=sqlite_settings(tmp_path, url, context_length=context_length, max_new_tokens=OUTPUT),
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
    assert run_job(rt, StepJob(task_id=task.id, step_index=last_observation + 1, role=StepRole.PLANNER)) is JobOutcome.STORED
    planner = stored_steps(rt, task.id)[-1]
    assert planner.role == "planner" and planner.prompt_tokens
    return planner.prompt_tokens


def _llm_errors(role: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("umi_llm_request_duration_seconds_count", {"role": role, "outcome": "error"}) or 0.0


def test_a_prompt_over_the_byte_bound_that_fits_in_tokens_is_sent_without_tokenizing(tmp_path: Path) -> None:
    """A server that refuses over-long prompts (no --allow-auto-truncate) is sent the prompt as it is."""
    context = 4096
    front = _CountingFront(context)
    with ServerThread(front) as server:
        prompt_tokens = _run_long_planner_step(tmp_path, server.url, context)
    (body,) = front.generate_bodies
    assert max_prompt_tokens(str(body["text"])) > context - OUTPUT  # the byte bound alone would have tokenized it
    assert front.calls["/tokenize"] == 0 and front.calls["/generate"] == 1
    assert prompt_tokens < context - OUTPUT


def test_a_prompt_the_server_refuses_as_too_long_is_tokenized_cut_and_sent_again(tmp_path: Path) -> None:
    errors_before = _llm_errors("planner")
    front = _CountingFront(CONTEXT)
    with ServerThread(front) as server:
        prompt_tokens = _run_long_planner_step(tmp_path, server.url, CONTEXT)
    assert front.calls["/generate"] == 2 and front.calls["/tokenize"] == 1
    first, second = front.generate_bodies
    assert "text" in first and second.get("input_ids")  # whole text refused, then its last tokens
    assert prompt_tokens == CONTEXT - OUTPUT
    assert _llm_errors("planner") == errors_before  # an expected refusal is not an LLM failure
