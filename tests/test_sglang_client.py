"""The SGLang client and the per-role requests, over real HTTP against a scripted SGLang stand-in.

The stand-in records every request (raw bytes and headers), checks each body
against SGLang's own request contract as the real server's gate does, and
answers from a per-test script of SGLang answers (each error shape, aborts,
delays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from shared.asgi import ServerThread, free_port
from shared.constraints import caller_ebnf, planner_regex
from shared.llm import build_role_request, client_for_role
from shared.prompts import (
    STOP_SEQUENCE,
    ToolDoc,
    Turn,
    render_caller_prompt,
    render_planner_prompt,
    render_summarizer_prompt,
)
from shared.roles import LLMRole
from shared.settings import Settings
from shared.sglang_client import (
    GRAMMAR_FIELDS,
    GenerateRequest,
    LLMTimeout,
    SamplingParams,
    SGLangAborted,
    SGLangClient,
    SGLangError,
    SGLangProtocolError,
    SGLangRequestError,
    SGLangResponseError,
    SGLangServerError,
    SGLangTimeout,
    SGLangTransportError,
)
from shared.sglang_contract import generate_contract_error
from tests.conftest import load_trajectories

# --------------------------------------------------------------------------- the scripted SGLang stand-in


@dataclass
class Reply:
    """One scripted answer: a JSON or text body with a status, optionally delayed."""

    status: int = 200
    body: Any = None
    text: str | None = None
    delay_s: float = 0.0


@dataclass
class Recorded:
    path: str
    raw: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class FakeSGLang:
    """Shared state of the stand-in server; tests script it and read what it saw."""

    script: list[Reply] = field(default_factory=list)
    repeat_last: bool = False
    api_key: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    contract_errors: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.script, self.repeat_last, self.api_key = [], False, None
            self.requests, self.contract_errors = [], []
            self.in_flight = self.max_in_flight = 0

    def next_reply(self) -> Reply | None:
        with self.lock:
            if not self.script:
                return None
            return self.script[0] if self.repeat_last and len(self.script) == 1 else self.script.pop(0)

    def generate_paths(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/generate"]


def success_payload(body: dict[str, Any], text: str = "I should call the API. Next: caller.") -> dict[str, Any]:
    """A real-shaped non-streaming /generate answer echoing the request's rid."""
    return {
        "text": text,
        "output_ids": [306, 881, 1246],
        "meta_info": {
            "id": body.get("rid") or "9f1c0d",
            "finish_reason": {"type": "stop", "matched": STOP_SEQUENCE},
            "prompt_tokens": 812,
            "completion_tokens": 3,
            "cached_tokens": 640,
            "reasoning_tokens": 0,
            "weight_version": "default",
            "e2e_latency": 0.083,
        },
    }


def build_app(state: FakeSGLang) -> FastAPI:
    app = FastAPI()

    async def record(request: Request) -> Recorded:
        seen = Recorded(request.url.path, await request.body(), {k.lower(): v for k, v in request.headers.items()})
        with state.lock:
            state.requests.append(seen)
        return seen

    def unauthorised(seen: Recorded) -> bool:
        return state.api_key is not None and seen.headers.get("authorization") != f"Bearer {state.api_key}"

    async def answer(reply: Reply) -> Response:
        await asyncio.sleep(reply.delay_s)
        if reply.text is not None:
            return PlainTextResponse(reply.text, status_code=reply.status)
        return JSONResponse(reply.body, status_code=reply.status)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        seen = await record(request)
        if unauthorised(seen):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        body = seen.json
        error = generate_contract_error(body)
        if error is not None:  # SGLang's gate: 400 with a plain-string error
            state.contract_errors.append(error)
            return JSONResponse({"error": error}, status_code=400)
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            reply = state.next_reply() or Reply(body=success_payload(body))
            return await answer(reply)
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


@pytest.fixture(scope="module")
def server_state() -> Iterator[tuple[FakeSGLang, str]]:
    state = FakeSGLang()
    with ServerThread(build_app(state)) as server:
        yield state, server.url


@pytest.fixture
def fake(server_state: tuple[FakeSGLang, str]) -> FakeSGLang:
    state, _ = server_state
    state.reset()
    return state


@pytest.fixture
def url(server_state: tuple[FakeSGLang, str]) -> str:
    return server_state[1]


def make_client(url: str, **kwargs: Any) -> SGLangClient:
    options: dict[str, Any] = {"max_retries": 3, "backoff_s": 0.01, "timeout": LLMTimeout(connect=2.0, read=5.0)}
    options.update(kwargs)
    return SGLangClient(url, **options)


def simple_request(rid: str | None = "task-1-step-1", text: str = "... conclusion: ") -> GenerateRequest:
    params = SamplingParams(max_new_tokens=16, stop=[STOP_SEQUENCE])
    return GenerateRequest(text=text, sampling_params=params, rid=rid)


# --------------------------------------------------------------------------- (a) SGLang's contract


def _record_prompts() -> tuple[list[ToolDoc], dict[LLMRole, str]]:
    record = load_trajectories()[0]
    tools = [ToolDoc.model_validate(t) for t in record["tools"]]
    turns = [Turn.model_validate(c) for c in record["conversations"]]
    first_plan = next(i for i, t in enumerate(turns) if t.speaker.value == "assistant")
    prompts = {
        LLMRole.PLANNER: render_planner_prompt(tools, turns[:first_plan]),
        LLMRole.CALLER: render_caller_prompt(tools, turns[: first_plan + 1]),
        LLMRole.SUMMARIZER: render_summarizer_prompt(turns[: first_plan + 1]),
    }
    return tools, prompts


TOOLS, PROMPTS = _record_prompts()
SETTINGS = Settings(temperature=0.5, top_p=1.0, max_new_tokens=512)  # the α-UMi defaults, whatever UMI_* says
VARIANTS = [
    (role, constrained, greedy) for role in LLMRole for constrained in (False, True) for greedy in (False, True)
]


def _role_request(role: LLMRole, constrained: bool, greedy: bool) -> GenerateRequest:
    rid = f"{role.value}-{constrained}-{greedy}"
    return build_role_request(
        role, PROMPTS[role], tools=TOOLS, settings=SETTINGS, constrained=constrained, rid=rid, greedy=greedy
    )


@pytest.mark.parametrize(("role", "constrained", "greedy"), VARIANTS)
def test_every_role_request_passes_sglangs_contract(role: LLMRole, constrained: bool, greedy: bool) -> None:
    body = _role_request(role, constrained, greedy).to_body()
    assert generate_contract_error(body) is None
    params = body["sampling_params"]
    grammars = {key: params[key] for key in GRAMMAR_FIELDS if key in params}
    expected = {}
    if constrained and role is LLMRole.PLANNER:
        expected = {"regex": planner_regex()}
    elif constrained and role is LLMRole.CALLER:
        expected = {"ebnf": caller_ebnf(TOOLS)}
    assert grammars == expected
    assert params["stop"] == [STOP_SEQUENCE] and params["max_new_tokens"] == 512
    assert params["temperature"] == (0.0 if greedy else 0.5) and params["top_p"] == 1.0
    assert body["text"] == PROMPTS[role] and body["stream"] is False


def test_the_contract_check_is_real() -> None:
    good = _role_request(LLMRole.CALLER, True, False).to_body()
    wrong_key = {**good, "sampling_params": {**good["sampling_params"], "max_tokens": 5}}
    assert "max_tokens" in (generate_contract_error(wrong_key) or "")
    schema_object = {"text": "x", "sampling_params": {"json_schema": {"type": "object"}}}
    assert "expected a string" in (generate_contract_error(schema_object) or "")
    string_temperature = {"text": "x", "sampling_params": {"temperature": "0"}}
    assert generate_contract_error(string_temperature) is not None


def test_bytes_on_the_wire_pass_the_contract(fake: FakeSGLang, url: str) -> None:
    requests = [_role_request(*variant) for variant in VARIANTS]
    with make_client(url) as client:
        for request in requests:
            client.generate(request)
    seen = fake.generate_paths()
    assert len(seen) == len(requests) and fake.contract_errors == []
    for request, recorded in zip(requests, seen, strict=True):
        assert recorded.headers["content-type"] == "application/json"
        assert generate_contract_error(recorded.json) is None
        assert recorded.json == request.to_body()


def test_sampling_params_refuse_two_grammars() -> None:
    with pytest.raises(ValueError, match="Only one of json_schema, regex, ebnf, or structural_tag"):
        SamplingParams(regex="a+", ebnf='root ::= "a"')
    assert SamplingParams(regex="", ebnf='root ::= "a"').grammar_fields() == ["ebnf"]


def test_sampling_params_send_only_set_fields() -> None:
    assert SamplingParams(max_new_tokens=5).to_dict() == {"max_new_tokens": 5}
    assert SamplingParams(json_schema={"type": "object"}).to_dict() == {"json_schema": '{"type": "object"}'}
    assert SamplingParams(stop="</s>").to_dict() == {"stop": ["</s>"]}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=5)  # type: ignore[call-arg]


def test_caller_without_tools_is_unconstrained() -> None:
    request = build_role_request(LLMRole.CALLER, "p", tools=[], settings=SETTINGS, constrained=True)
    assert request.sampling_params.grammar_fields() == []


# --------------------------------------------------------------------------- (b) answers and errors


def test_success_is_parsed(fake: FakeSGLang, url: str) -> None:
    with make_client(url) as client:
        result = client.generate(simple_request(rid="r-ok"))
    assert result.text == "I should call the API. Next: caller."
    assert result.output_ids == [306, 881, 1246]
    assert result.rid == "r-ok" and result.attempts == 1
    assert result.finish_reason is not None and result.finish_reason.type == "stop"
    assert result.finish_reason.matched == STOP_SEQUENCE
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (812, 3, 640)
    assert result.e2e_latency == pytest.approx(0.083)
    assert result.meta_info["weight_version"] == "default"


def test_length_finish_reason(fake: FakeSGLang, url: str) -> None:
    payload = success_payload({"rid": "r"})
    payload["meta_info"]["finish_reason"] = {"type": "length", "length": 16}
    fake.script = [Reply(body=payload)]
    with make_client(url) as client:
        result = client.generate(simple_request())
    assert result.finish_reason is not None
    assert (result.finish_reason.type, result.finish_reason.length) == ("length", 16)


CONTRACT_MESSAGE = "unknown field `max_tokens`, expected one of `max_new_tokens`, `stop`"
ERROR_SHAPES = [
    pytest.param(400, {"error": CONTRACT_MESSAGE}, None, SGLangRequestError, CONTRACT_MESSAGE, id="contract-string"),
    pytest.param(
        400,
        {"error": {"message": "Only one of json_schema, regex, ebnf, or structural_tag can be set."}},
        None, SGLangRequestError, "Only one of json_schema, regex, ebnf, or structural_tag can be set.",
        id="error-object",
    ),
    pytest.param(
        400,
        {"object": "error", "message": "JSON decode error", "type": "Bad Request", "param": None, "code": 400},
        None, SGLangRequestError, "JSON decode error", id="openai-400",
    ),
    pytest.param(
        503,
        {"object": "error", "message": "The request queue is full.", "type": "503", "param": None, "code": 503},
        None, SGLangServerError, "The request queue is full.", id="queue-full-503",
    ),
    pytest.param(401, {"error": "Unauthorized"}, None, SGLangRequestError, "Unauthorized", id="unauthorized"),
    pytest.param(502, None, "<html>Bad Gateway</html>", SGLangServerError, "<html>Bad Gateway</html>", id="non-json"),
    pytest.param(429, {"message": "queue full"}, None, SGLangServerError, "queue full", id="router-429"),
    pytest.param(404, {"detail": "Not Found"}, None, SGLangRequestError, "Not Found", id="fastapi-404"),
]


@pytest.mark.parametrize(("status", "body", "text", "exc_type", "message"), ERROR_SHAPES)
def test_error_shapes_map_to_exceptions(
    fake: FakeSGLang, url: str, status: int, body: Any, text: str | None, exc_type: type[SGLangError], message: str
) -> None:
    fake.script = [Reply(status=status, body=body, text=text)]
    with make_client(url, max_retries=0) as client, pytest.raises(exc_type) as info:
        client.generate(simple_request())
    exc = info.value
    assert isinstance(exc, SGLangResponseError)
    assert exc.status_code == status and exc.message == message and exc.attempts == 1
    assert message in str(exc) and f"{url}/generate" in str(exc)


def test_200_abort_raises_aborted(fake: FakeSGLang, url: str) -> None:
    payload = success_payload({"rid": "r"}, text="")
    payload["meta_info"]["finish_reason"] = {
        "type": "abort", "message": "Failed to compile regex grammar: bad", "status_code": 400, "err_type": None,
    }
    fake.script = [Reply(body=payload)]
    with make_client(url) as client, pytest.raises(SGLangAborted) as info:
        client.generate(simple_request())
    assert info.value.message == "Failed to compile regex grammar: bad"
    assert info.value.status_code == 400 and info.value.finish_reason is not None
    assert len(fake.generate_paths()) == 1


def test_non_json_200_is_a_protocol_error(fake: FakeSGLang, url: str) -> None:
    fake.script = [Reply(status=200, text="hello")]
    with make_client(url) as client, pytest.raises(SGLangProtocolError, match="not a JSON object"):
        client.generate(simple_request())


# --------------------------------------------------------------------------- retries, timeouts, deadline


def test_400_is_not_retried(fake: FakeSGLang, url: str) -> None:
    fake.script = [Reply(status=400, body={"error": {"message": "bad"}})]
    with make_client(url, max_retries=5) as client, pytest.raises(SGLangRequestError) as info:
        client.generate(simple_request())
    assert len(fake.generate_paths()) == 1 and info.value.attempts == 1


def test_503_is_retried_then_succeeds(fake: FakeSGLang, url: str, caplog: pytest.LogCaptureFixture) -> None:
    queue_full = {"object": "error", "message": "The request queue is full.", "code": 503}
    fake.script = [Reply(status=503, body=queue_full), Reply(status=503, body=queue_full)]
    secret_prompt = "PROMPT-TEXT-THAT-MUST-NOT-BE-LOGGED"
    with caplog.at_level(logging.WARNING, logger="shared.sglang_client"), make_client(url) as client:
        result = client.generate(simple_request(rid="r-503", text=secret_prompt))
    seen = fake.generate_paths()
    assert len(seen) == 3 and result.attempts == 3
    assert [r.json["rid"] for r in seen] == ["r-503", "r-503-retry1", "r-503-retry2"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "shared.sglang_client"]
    assert len(warnings) == 2 and "queue is full" in warnings[0].getMessage()
    assert all(secret_prompt not in r.getMessage() for r in caplog.records)


def test_503_forever_gives_up_after_max_retries(fake: FakeSGLang, url: str) -> None:
    fake.script, fake.repeat_last = [Reply(status=503, body={"object": "error", "message": "busy", "code": 503})], True
    with make_client(url, max_retries=2) as client, pytest.raises(SGLangServerError) as info:
        client.generate(simple_request())
    assert info.value.attempts == 3 and len(fake.generate_paths()) == 3
    assert info.value.message == "busy"


def test_connection_refused_is_a_transport_error_after_retries() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with make_client(closed, max_retries=2) as client, pytest.raises(SGLangTransportError) as info:
        client.generate(simple_request())
    assert not isinstance(info.value, SGLangTimeout) and not isinstance(info.value, httpx.HTTPError)
    assert info.value.attempts == 3 and closed in str(info.value)


def test_read_timeout_raises_sglang_timeout(fake: FakeSGLang, url: str) -> None:
    fake.script = [Reply(body=success_payload({}), delay_s=1.5)]
    client = make_client(url, max_retries=0, timeout=LLMTimeout(connect=2.0, read=0.2))
    started = time.monotonic()
    with client, pytest.raises(SGLangTimeout) as info:
        client.generate(simple_request())
    assert time.monotonic() - started < 1.2 and info.value.attempts == 1


def test_deadline_stops_retries_early(fake: FakeSGLang, url: str) -> None:
    fake.script, fake.repeat_last = [Reply(status=503, body={"object": "error", "message": "busy", "code": 503})], True
    started = time.monotonic()
    with make_client(url, max_retries=50, backoff_s=0.05) as client, pytest.raises(SGLangServerError) as info:
        client.generate(simple_request(), deadline=started + 0.4)
    assert time.monotonic() - started < 0.6
    assert 1 <= info.value.attempts < 51 and info.value.attempts == len(fake.generate_paths())


def test_no_backoff_wait_ends_past_the_deadline(fake: FakeSGLang, url: str) -> None:
    fake.script, fake.repeat_last = [Reply(status=503, body={"object": "error", "message": "busy", "code": 503})], True
    started = time.monotonic()
    with make_client(url, max_retries=5, backoff_s=1.0) as client, pytest.raises(SGLangServerError) as info:
        client.generate(simple_request(), deadline=started + 0.8)
    # The first wait (1 s or more) would end past the deadline: the 503 is final at once, not after a sleep.
    assert time.monotonic() - started < 0.8
    assert info.value.attempts == 1 and len(fake.generate_paths()) == 1


def test_deadline_shrinks_the_read_timeout(fake: FakeSGLang, url: str) -> None:
    fake.script = [Reply(body=success_payload({}), delay_s=2.0)]
    started = time.monotonic()
    with make_client(url, timeout=LLMTimeout(read=30.0)) as client, pytest.raises(SGLangTimeout):
        client.generate(simple_request(), deadline=started + 0.3)
    assert time.monotonic() - started < 1.2


def test_passed_deadline_sends_nothing(fake: FakeSGLang, url: str) -> None:
    with make_client(url) as client, pytest.raises(SGLangTimeout) as info:
        client.generate(simple_request(), deadline=time.monotonic() - 1)
    assert info.value.attempts == 0 and fake.generate_paths() == []


# --------------------------------------------------------------------------- auth, settings, concurrency


def test_bearer_token(fake: FakeSGLang, url: str) -> None:
    fake.api_key = "s3cret"
    with make_client(url) as anonymous, pytest.raises(SGLangRequestError) as info:
        anonymous.generate(simple_request())
    assert info.value.status_code == 401 and info.value.message == "Unauthorized"
    assert len(fake.generate_paths()) == 1  # 401 is not retried
    with make_client(url, api_key="s3cret") as client:
        assert client.generate(simple_request()).text
    assert fake.generate_paths()[-1].headers["authorization"] == "Bearer s3cret"


def test_client_for_role_uses_settings(fake: FakeSGLang, url: str) -> None:
    fake.api_key = "from-settings"
    settings = Settings(caller_llm_url=url, llm_api_key="from-settings", llm_max_retries=1, llm_backoff_s=0.01)
    with client_for_role(LLMRole.CALLER, settings) as client:
        assert client.base_url == url and client.max_retries == 1
        assert client.timeout.read == settings.llm_read_timeout_s
        client.generate(_role_request(LLMRole.CALLER, True, False))
    assert fake.generate_paths()[-1].headers["authorization"] == "Bearer from-settings"


def test_one_client_keeps_many_requests_in_flight(fake: FakeSGLang, url: str) -> None:
    fake.script, fake.repeat_last = [Reply(body=success_payload({}), delay_s=0.3)], True
    results: list[str] = []
    with make_client(url) as client:
        threads = [
            threading.Thread(target=lambda: results.append(client.generate(simple_request(rid=None)).text))
            for _ in range(16)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 16 and fake.max_in_flight >= 8
