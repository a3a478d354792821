"""Error text from SGLang is masked and bounded before it is stored, returned or logged (issue 6, item 7).

A small SGLang stand-in on 127.0.0.1 answers every ``/generate`` with one of SGLang's
error shapes, its message a 2 MB body that echoes the request's ``Authorization``
header (so ``UMI_LLM_API_KEY``) at both ends. A task is run through the role handlers
and through the HTTP API; the stored error, the API answer and every log record must
be short and must not contain the key in any form.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session

from services.gateway.app import create_app
from shared import crud
from shared.asgi import ServerThread
from shared.llm import client_for_role
from shared.pipeline import JobOutcome, Runtime
from shared.redaction import ERROR_TEXT_LIMIT
from shared.roles import LLMRole, StepRole
from shared.schemas import StepJob
from shared.sglang_client import GenerateRequest, SGLangError, SGLangRequestError, SGLangServerError
from tests.conftest import load_trajectories
from tests.pipeline_helpers import CollectingDispatcher, create_task, run_job, sqlite_settings

KEY = 'sk-umi-LLM/KEY+"42"'
PADDING = 2_000_000
#: Each of SGLang's error shapes (SGLang `srt/entrypoints/http_server.py` and `srt/utils/common.py`, github.com/sgl-project/sglang), by name: status and body for a message.
SHAPES: dict[str, tuple[int, Any]] = {
    "error-object-400": (400, lambda m: {"error": {"message": m}}),
    "contract-string-400": (400, lambda m: {"error": m}),
    "openai-503": (503, lambda m: {"object": "error", "message": m, "type": "503", "param": None, "code": 503}),
    "abort-200": (200, lambda m: {"text": "", "meta_info": {"id": "r", "finish_reason": {
        "type": "abort", "message": m, "status_code": 400, "err_type": None}}}),
}


class EchoState:
    """Which error shape the stand-in answers with, and how many /generate calls it saw."""

    def __init__(self) -> None:
        self.shape = "error-object-400"
        self.calls = 0
        self.lock = threading.Lock()


def echo_app(state: EchoState) -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        with state.lock:
            state.calls += 1
        echoed = f"you sent Authorization: {request.headers.get('authorization')}"
        message = f"{echoed} " + "x" * PADDING + f" {echoed}"
        status, body = SHAPES[state.shape]
        return JSONResponse(body(message), status_code=status)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        prompt = (await request.json())["prompt"]
        return JSONResponse({"tokens": [7] * (len(prompt) // 8), "count": len(prompt) // 8, "max_model_len": 4096})

    return app


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[EchoState, str]]:
    state = EchoState()
    with ServerThread(echo_app(state)) as server:
        yield state, server.url


def key_forms() -> list[str]:
    """The key as is, inside a JSON string, and URL-encoded, plus a long enough piece of it."""
    return [KEY, json.dumps(KEY)[1:-1], quote(KEY, safe=""), "LLM/KEY"]


def assert_clean(text: str) -> None:
    for form in key_forms():
        assert form not in text


def assert_logs_clean(records: list[logging.LogRecord]) -> None:
    """No record's message, arguments, extras or formatted traceback holds the key or the 2 MB body."""
    formatter = logging.Formatter()
    for record in records:
        message = record.getMessage()
        assert len(message) <= 2 * ERROR_TEXT_LIMIT, (record.name, len(message))
        assert_clean(message)
        assert_clean(" ".join(repr(value) for value in vars(record).values()))
        if record.exc_info:
            assert_clean(formatter.formatException(record.exc_info))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_client_masks_and_bounds_every_sglang_error_shape(
    echo: tuple[EchoState, str], shape: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = echo
    state.shape = shape
    settings = sqlite_settings(tmp_path, url, llm_api_key=KEY, llm_max_retries=1, llm_backoff_s=0.01)
    with caplog.at_level(logging.DEBUG), client_for_role(LLMRole.PLANNER, settings) as client:
        with pytest.raises(SGLangError) as info:
            client.generate(GenerateRequest(text="hello", rid="r"))
    exc = info.value
    if shape == "openai-503":
        assert isinstance(exc, SGLangServerError) and exc.attempts == 2  # retried once, then final
    elif shape != "abort-200":
        assert isinstance(exc, SGLangRequestError) and exc.attempts == 1
    assert len(str(exc)) <= ERROR_TEXT_LIMIT and len(exc.message) <= ERROR_TEXT_LIMIT  # type: ignore[attr-defined]
    assert "you sent Authorization: Bearer ***" in str(exc)
    assert_clean(str(exc))
    assert_clean(repr(exc))
    assert_logs_clean(caplog.records)


def test_a_task_failed_by_an_echoing_sglang_stores_a_masked_bounded_error(
    echo: tuple[EchoState, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = echo
    state.shape = "openai-503"
    settings = sqlite_settings(tmp_path, url, llm_api_key=KEY, llm_max_retries=2, llm_backoff_s=0.01)
    rt = Runtime(settings=settings, dispatcher=CollectingDispatcher())
    task_id = create_task(rt, load_trajectories()[0])
    before = state.calls
    with caplog.at_level(logging.DEBUG):
        outcome = run_job(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER))
    assert outcome is JobOutcome.TASK_ENDED and state.calls - before == 3
    with Session(rt.engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
    assert task is not None and (task.status, task.end_reason) == ("failed", "llm_error")
    assert task.error is not None and task.error.startswith("planner LLM failed: SGLang at ")
    assert len(task.error) <= ERROR_TEXT_LIMIT and "Bearer ***" in task.error
    assert_clean(task.error)
    assert_logs_clean(caplog.records)
    rt.close()


def test_the_api_answer_never_holds_the_key_or_the_whole_body(
    echo: tuple[EchoState, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, url = echo
    state.shape = "error-object-400"
    settings = sqlite_settings(tmp_path, url, llm_api_key=KEY, llm_max_retries=0)
    dispatcher = CollectingDispatcher()
    rt = Runtime(settings=settings, dispatcher=dispatcher)
    record = load_trajectories()[0]
    with caplog.at_level(logging.DEBUG), ServerThread(create_app(settings, dispatcher=dispatcher)) as gateway:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            accepted = client.post("/v1/tasks", json={"query": record["conversations"][0]["value"], "tools": record["tools"]})
            assert accepted.status_code == 202, accepted.text
            (job,) = dispatcher.jobs
            assert run_job(rt, job) is JobOutcome.TASK_ENDED
            response = client.get(f"/v1/tasks/{uuid.UUID(accepted.json()['id'])}")
    body = response.json()
    assert (body["status"], body["end_reason"]) == ("failed", "llm_error")
    assert len(body["error"]) <= ERROR_TEXT_LIMIT and "Bearer ***" in body["error"]
    assert len(response.content) < 2 * ERROR_TEXT_LIMIT + 4096
    assert_clean(response.text)
    assert_logs_clean(caplog.records)
    rt.close()


def test_a_password_in_an_llm_url_never_reaches_the_stored_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An SGLang server behind basic auth: its URL's password is masked like any secret setting."""
    from shared.asgi import free_port

    password = "pa55-in-the-url"
    settings = sqlite_settings(tmp_path, f"http://umi:{password}@127.0.0.1:{free_port()}", llm_max_retries=0)
    rt = Runtime(settings=settings, dispatcher=CollectingDispatcher())
    task_id = create_task(rt, load_trajectories()[0])
    with caplog.at_level(logging.DEBUG):
        assert run_job(rt, StepJob(task_id=task_id, step_index=1, role=StepRole.PLANNER)) is JobOutcome.TASK_ENDED
    with Session(rt.engine) as session:
        task = crud.get_task(session=session, task_id=task_id)
    assert task is not None and task.error is not None and "SGLang at" in task.error
    assert password not in task.error and "***" in task.error
    assert all(password not in record.getMessage() for record in caplog.records)
    rt.close()
