"""The tool execution library (services.tools): rules, backends, egress guard, retries, secrets.

All network traffic goes to servers on 127.0.0.1 started here (ServerThread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stamina
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, SecretStr
from stamina.instrumentation import RetryDetails

from services.tools import (
    EgressRefused,
    HttpBackend,
    MirrorBackend,
    NetworkGuard,
    RetryPolicy,
    ToolCatalog,
    ToolErrorKind,
    ToolExecutor,
    ToolRegistry,
    ToolSpec,
    VirtualBackend,
    build_executor,
    change_name,
    check_host,
    compact_name,
    default_registry,
    prepare_request,
    register,
    split_compact_name,
    standardize,
)
from shared.asgi import ServerThread
from shared.prompts import Speaker, ToolDoc, Turn, parse_caller_output
from shared.redaction import ERROR_TEXT_LIMIT
from shared.settings import Settings
from tests.conftest import TRAJECTORIES, load_trajectories

PARSE_ERROR = '{"error": "Tool input parse error...\\n", "response": ""}'
TIMEOUT_OBSERVATION = '{"error": "request time out", "response": ""}'
SECRET = 'rk-SECRET/"q"+42'


def doc(name: str, function: str = "") -> ToolDoc:
    return ToolDoc(Name=name, function=function, input={})


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"tools_timeout_s": 5.0, "tools_max_retries": 2, "tools_allow_hosts": []}
    values.update(overrides)
    return Settings(**values)


class RetryWaits:
    """Records the wait stamina schedules before each retry (its on-retry instrumentation hook)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, details: RetryDetails) -> None:
        self.delays.append(details.wait_for)


@pytest.fixture
def waits() -> Iterator[RetryWaits]:
    recorder = RetryWaits()
    stamina.instrumentation.set_on_retry_hooks([recorder])
    yield recorder
    stamina.instrumentation.set_on_retry_hooks(None)


# --------------------------------------------------------------------------- names


def test_standardize_and_compact_names_follow_toolbench() -> None:
    assert standardize("  Get 27 Coupons!! ") == "get_27_coupons"
    assert standardize("27coupons") == "get_27coupons"
    assert standardize("--Foo--Bar__baz--") == "foo_bar_baz"
    assert standardize("天气 API") == "天气_api"
    assert standardize("a^b") == "a^b"  # ToolBench's character class keeps '^'
    assert change_name("id") == "is_id" and change_name("from") == "is_from" and change_name("ids") == "ids"
    assert compact_name("ID", "flowers") == "is_id_for_flowers"
    long_name = compact_name("very long api name " * 5, "some_tool")
    assert len(long_name) == 64 and long_name.endswith("_api_name_for_some_tool")
    assert split_compact_name("search_for_words_for_dict", 'subfunction for tool "dict", you') == ("search_for_words", "dict")
    assert split_compact_name("list_for_flowers") == ("list", "flowers")


# --------------------------------------------------------------------------- mirror


def _recorded_calls() -> Iterator[tuple[list[ToolDoc], list[Turn], str, str, str]]:
    """(tools, history up to the caller turn, action, action input, recorded observation)."""
    for record in load_trajectories():
        tools = [ToolDoc(**tool) for tool in record["tools"]]
        turns = [Turn.model_validate(turn) for turn in record["conversations"]]
        for index, (turn, following) in enumerate(zip(turns, turns[1:], strict=False)):
            if turn.speaker is Speaker.CALLER and following.speaker is Speaker.OBSERVATION:
                call = parse_caller_output(turn.value)
                yield tools, turns[: index + 1], call.action, call.action_input, following.value


def _reformatted(action_input: str) -> str:
    """Same arguments, reversed key order and different whitespace."""
    arguments = json.loads(action_input)
    return json.dumps(dict(reversed(list(arguments.items()))), indent=3, separators=(" ,", " :  "))


@pytest.fixture(scope="module")
def mirror_executor() -> Iterator[ToolExecutor]:
    with ToolExecutor([MirrorBackend.from_file(TRAJECTORIES)]) as executor:
        yield executor


def test_mirror_replays_every_recorded_observation_byte_exact(mirror_executor: ToolExecutor) -> None:
    calls = list(_recorded_calls())
    assert len(calls) == 59
    # The data exercises what the test is about: multi-key inputs, ' "'-prefixed observations,
    # and identical calls recorded with different observations.
    assert sum(len(json.loads(c[3])) >= 2 for c in calls) >= 5
    assert any(c[4].startswith(' "') for c in calls)
    by_key: dict[tuple[str, str], set[str]] = {}
    for _, _, action, action_input, observation in calls:
        by_key.setdefault((action, json.dumps(json.loads(action_input), sort_keys=True)), set()).add(observation)
    assert any(len(observations) > 1 for observations in by_key.values())

    for tools, history, action, action_input, expected in calls:
        for variant in (action_input, _reformatted(action_input)):
            outcome = mirror_executor.execute(action, variant, tools, history=history)
            assert outcome.ok and outcome.backend == "mirror"
            assert outcome.observation == expected, (action, variant)


def test_mirror_without_history_returns_the_first_recording(mirror_executor: ToolExecutor) -> None:
    tools = [doc("trending_coupons_for_get_27coupons"), doc("list_for_flowers")]
    outcome = mirror_executor.execute("trending_coupons_for_get_27coupons", " {\n } ", tools)
    assert outcome.ok and outcome.observation.startswith(' "<html>')
    # An empty Action Input means {} (ToolBench's server does the same).
    assert mirror_executor.execute("list_for_flowers", "", tools).observation.startswith("{'totalCount': 1")


def test_mirror_miss_is_an_error_observation(mirror_executor: ToolExecutor) -> None:
    outcome = mirror_executor.execute("list_for_flowers", '{"page": 2}', [doc("list_for_flowers")])
    assert not outcome.ok and outcome.backend == "mirror" and outcome.error_kind is ToolErrorKind.MIRROR_MISS
    body = json.loads(outcome.observation)
    assert "mirror" in body["error"] and "list_for_flowers" in body["error"] and body["response"] == ""


def test_tool_outside_the_mirror_has_no_backend(mirror_executor: ToolExecutor) -> None:
    outcome = mirror_executor.execute("weather_for_nowhere", "{}", [doc("weather_for_nowhere")])
    assert outcome.error_kind is ToolErrorKind.NO_BACKEND and outcome.backend is None
    assert outcome.observation == json.dumps(
        {"error": "No backend is configured to serve the tool weather_for_nowhere", "response": ""}
    )


# --------------------------------------------------------------------------- call validation


def test_unknown_tool_name_gets_toolbench_observation(mirror_executor: ToolExecutor) -> None:
    tools = [doc("list_for_flowers")]
    for action in ("nope_for_x", "flowers", "list_for_flowers "):  # exact match only, no endswith
        outcome = mirror_executor.execute(action, "{}", tools)
        assert outcome.observation == '{"error": "No such function name: ' + action + '", "response": ""}'
        assert not outcome.ok and outcome.error_kind is ToolErrorKind.UNKNOWN_TOOL and outcome.attempts == 0


@pytest.mark.parametrize("action_input", ["not json", '{"q": "x"', "[1, 2]", '"text"', "null"])
def test_action_input_must_be_a_json_object(mirror_executor: ToolExecutor, action_input: str) -> None:
    outcome = mirror_executor.execute("list_for_flowers", action_input, [doc("list_for_flowers")])
    assert outcome.observation == PARSE_ERROR
    assert outcome.error_kind is ToolErrorKind.INVALID_INPUT and outcome.attempts == 0


def test_array_input_error_says_what_was_wrong(mirror_executor: ToolExecutor) -> None:
    outcome = mirror_executor.execute("list_for_flowers", "[1, 2]", [doc("list_for_flowers")])
    assert outcome.error is not None and "array" in outcome.error


# --------------------------------------------------------------------------- python registry


def test_python_registry_calls_functions_with_keyword_arguments() -> None:
    registry = ToolRegistry()

    @registry.register("add_for_calc")
    def add(a: int, b: int = 0) -> int:
        """Add two integers.

        More text that is not part of the summary."""
        return a + b

    @registry.register("greet_for_calc")
    def greet(name: str) -> str:
        return f"hello {name}"

    @registry.register("stats_for_calc")
    async def stats(values: list) -> dict:
        await asyncio.sleep(0)
        return {"n": len(values), "max": max(values)}

    tools = registry.docs()
    assert tools[0] == ToolDoc(Name="add_for_calc", function="Add two integers.", input={"a": "integer, ", "b": "integer, "})
    with build_executor(settings(), registry=registry) as executor:
        assert executor.execute("add_for_calc", '{"a": 2, "b": 3}', tools).observation == "5"
        assert executor.execute("greet_for_calc", '{"name": "Ada"}', tools).observation == "hello Ada"
        outcome = executor.execute("stats_for_calc", '{"values": [3, 9]}', tools)
        assert outcome.observation == '{"n": 2, "max": 9}' and outcome.ok and outcome.backend == "python"

        wrong = executor.execute("add_for_calc", '{"a": 1, "c": 2}', tools)
        assert wrong.error_kind is ToolErrorKind.INVALID_ARGUMENTS and "add_for_calc" in json.loads(wrong.observation)["error"]


def test_python_function_errors_and_timeouts_become_observations() -> None:
    registry = ToolRegistry()

    @registry.register("fail_for_calc")
    def fail() -> str:
        raise ValueError("boom")

    @registry.register("hang_for_calc")
    def hang() -> str:
        time.sleep(1.0)
        return "late"

    tools = registry.docs()
    with build_executor(settings(tools_timeout_s=0.2), registry=registry) as executor:
        outcome = executor.execute("fail_for_calc", "{}", tools)
        assert outcome.observation == json.dumps(
            {"error": "Function executing fail_for_calc error...\nValueError: boom", "response": ""}
        )
        assert outcome.error_kind is ToolErrorKind.FUNCTION_ERROR and "Traceback" not in outcome.observation

        started = time.monotonic()
        late = executor.execute("hang_for_calc", "{}", tools)
        assert late.observation == TIMEOUT_OBSERVATION and late.error_kind is ToolErrorKind.TIMEOUT
        assert time.monotonic() - started < 0.9


def test_module_level_register_feeds_the_default_registry(tmp_path: Path) -> None:
    @register("ping_for_health_probe")
    def ping() -> dict:
        return {"pong": True}

    try:
        with build_executor(settings()) as executor:
            outcome = executor.execute("ping_for_health_probe", "{}", [doc("ping_for_health_probe")])
        assert outcome.ok and outcome.backend == "python" and outcome.observation == '{"pong": true}'
    finally:
        default_registry.unregister("ping_for_health_probe")
    assert "ping_for_health_probe" not in default_registry


def test_observations_are_truncated_at_1024_characters() -> None:
    registry = ToolRegistry()
    registry.add("text_for_gen", lambda n: "x" * n)
    with build_executor(settings(), registry=registry) as executor:
        long = executor.execute("text_for_gen", '{"n": 2000}', [doc("text_for_gen")])
        exact = executor.execute("text_for_gen", '{"n": 1024}', [doc("text_for_gen")])
    assert long.observation == "x" * 1024 + "..." and long.truncated
    assert exact.observation == "x" * 1024 and not exact.truncated


# --------------------------------------------------------------------------- a local tool server


class ToolServerState:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.headers: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()

    def hit(self, name: str, request: Request) -> int:
        with self.lock:
            self.hits[name] += 1
            self.headers[name] = dict(request.headers)
            return self.hits[name]


def tool_server_app(state: ToolServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/search")
    def search(request: Request) -> dict[str, Any]:
        state.hit("search", request)
        return {"query": dict(request.query_params)}

    @app.post("/items")
    async def items(request: Request) -> dict[str, Any]:
        state.hit("items", request)
        return {"created": await request.json()}

    @app.get("/users/{user_id}")
    def user(user_id: str, request: Request) -> dict[str, Any]:
        state.hit("user", request)
        return {"user": user_id, "query": dict(request.query_params)}

    @app.get("/missing")
    def missing(request: Request) -> JSONResponse:
        state.hit("missing", request)
        return JSONResponse({"message": "Endpoint '/missing' does not exist"}, status_code=404)

    @app.get("/flaky")
    def flaky(request: Request) -> PlainTextResponse:
        if state.hit("flaky", request) <= 2:
            return PlainTextResponse("busy", status_code=503)
        return PlainTextResponse("recovered")

    @app.get("/down")
    def down(request: Request) -> PlainTextResponse:
        state.hit("down", request)
        return PlainTextResponse("still down", status_code=503)

    @app.get("/throttled")
    def throttled(request: Request) -> PlainTextResponse:
        if state.hit("throttled", request) == 1:
            return PlainTextResponse("slow down", status_code=429, headers={"Retry-After": "0.3"})
        return PlainTextResponse("thanks for waiting")

    @app.get("/leaky")
    def leaky(request: Request) -> PlainTextResponse:
        # A careless API: a 2 MB error page that echoes the caller's key, twice.
        state.hit("leaky", request)
        key = request.headers.get("x-rapidapi-key", "")
        return PlainTextResponse(f"bad key {key}\n" + "x" * 2_000_000 + f"\nbad key {key}", status_code=400)

    @app.get("/slow")
    async def slow(request: Request) -> PlainTextResponse:
        state.hit("slow", request)
        await asyncio.sleep(1.0)
        return PlainTextResponse("late")

    @app.get("/redirect")
    def redirect(request: Request) -> RedirectResponse:
        state.hit("redirect", request)
        return RedirectResponse("/search?q=redirected", status_code=302)

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, Any]:
        state.hit("whoami", request)
        return {"your_key": request.headers.get("x-rapidapi-key"), "query": dict(request.query_params)}

    return app


def tool_json(base_url: str) -> dict[str, Any]:
    """A ToolBench tool file for the local server."""

    def param(name: str, kind: str = "STRING", default: Any = "") -> dict[str, Any]:
        return {"name": name, "type": kind, "description": f"the {name}", "default": default}

    def api(name: str, path: str, method: str = "GET", required=(), optional=()) -> dict[str, Any]:
        return {
            "name": name,
            "url": base_url + path,
            "method": method,
            "description": name,
            "required_parameters": list(required),
            "optional_parameters": list(optional),
        }

    return {
        "tool_name": "Demo Tool!",
        "tool_description": "A local test tool",
        "title": "Demo Tool",
        "api_list": [
            api("Search", "/search", required=[param("q")], optional=[param("limit", "NUMBER", 10), param("id")]),
            api("Create item", "/items", "POST", required=[param("name")], optional=[param("tags", "ARRAY")]),
            api("User by id", "/users/{id}", required=[param("id")], optional=[param("fields")]),
            api("Missing", "/missing"),
            api("Flaky", "/flaky"),
            api("Down", "/down"),
            api("Slow", "/slow"),
            api("Throttled", "/throttled"),
            api("Leaky", "/leaky"),
            api("Redirect", "/redirect"),
            api("Who am I", "/whoami", optional=[param("q")]),
        ],
    }


class ToolServer(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    url: str
    catalog_dir: Path
    state: ToolServerState
    tools: list[ToolDoc]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolServer]:
    state = ToolServerState()
    with ServerThread(tool_server_app(state)) as server:
        catalog_dir = tmp_path_factory.mktemp("toolenv")
        (catalog_dir / "Data").mkdir()
        # The file's base name is the tool's standard name (as in ToolBench's tools folder).
        (catalog_dir / "Data" / "demo_tool.json").write_text(json.dumps(tool_json(server.url)))
        tools = [doc(entry.name) for entry in ToolCatalog.load(catalog_dir)]
        yield ToolServer(url=server.url, catalog_dir=catalog_dir, state=state, tools=tools)


def http_executor(server: ToolServer, **overrides: Any) -> ToolExecutor:
    values: dict[str, Any] = {"tools_http_catalog": server.catalog_dir, "tools_allow_hosts": ["127.0.0.1"]}
    values.update(overrides)
    return build_executor(settings(**values), registry=ToolRegistry(), backoff_s=0.01)


def test_catalog_names_use_the_file_base_name(tool_server: ToolServer) -> None:
    catalog = ToolCatalog.load(tool_server.catalog_dir)
    entry = catalog.get("user_by_id_for_demo_tool")
    assert entry is not None and (entry.category, entry.tool, entry.api) == ("Data", "demo_tool", "user_by_id")
    assert [t.Name for t in tool_server.tools][:3] == ["search_for_demo_tool", "create_item_for_demo_tool", "user_by_id_for_demo_tool"]


def test_prepare_request_maps_arguments_to_parameters(tool_server: ToolServer) -> None:
    catalog = ToolCatalog.load(tool_server.catalog_dir)
    search = prepare_request(catalog.get("search_for_demo_tool"), {"q": "cats", "is_id": "7", "limit": None})  # type: ignore[arg-type]
    assert search.method == "GET" and search.params == {"q": "cats", "id": "7"} and search.json_body is None
    user = prepare_request(catalog.get("user_by_id_for_demo_tool"), {"is_id": "a/b"})  # type: ignore[arg-type]
    assert user.url == tool_server.url + "/users/a%2Fb" and user.params == {}


def test_http_get_sends_query_parameters_and_rapidapi_headers(tool_server: ToolServer) -> None:
    with http_executor(tool_server, tools_rapidapi_key=SECRET) as executor:
        outcome = executor.execute("search_for_demo_tool", '{"q": "cats", "limit": 5, "is_id": "x1"}', tool_server.tools)
    assert outcome.ok and outcome.backend == "http" and outcome.attempts == 1
    assert json.loads(outcome.observation) == {"query": {"q": "cats", "limit": "5", "id": "x1"}}
    headers = tool_server.state.headers["search"]
    assert headers["x-rapidapi-key"] == SECRET
    assert headers["x-rapidapi-host"] == "127.0.0.1"


def test_http_post_sends_a_json_body_and_fills_path_parameters(tool_server: ToolServer) -> None:
    with http_executor(tool_server) as executor:
        created = executor.execute("create_item_for_demo_tool", '{"name": "pen", "tags": ["a", "b"]}', tool_server.tools)
        user = executor.execute("user_by_id_for_demo_tool", '{"is_id": 42, "fields": "name"}', tool_server.tools)
    assert json.loads(created.observation) == {"created": {"name": "pen", "tags": ["a", "b"]}}
    assert json.loads(user.observation) == {"user": "42", "query": {"fields": "name"}}
    assert "x-rapidapi-key" not in tool_server.state.headers["items"]  # no key configured, none sent


def test_http_missing_required_parameter_is_refused_before_sending(tool_server: ToolServer) -> None:
    before = tool_server.state.hits["search"]
    with http_executor(tool_server) as executor:
        outcome = executor.execute("search_for_demo_tool", '{"limit": 3, "colour": "red"}', tool_server.tools)
    assert not outcome.ok and outcome.error_kind is ToolErrorKind.INVALID_ARGUMENTS
    error = json.loads(outcome.observation)["error"]
    assert "Missing required parameters: q" in error and "Unexpected parameters: colour" in error
    assert tool_server.state.hits["search"] == before


def test_http_non_2xx_is_an_error_observation_with_the_status(tool_server: ToolServer) -> None:
    with http_executor(tool_server) as executor:
        outcome = executor.execute("missing_for_demo_tool", "{}", tool_server.tools)
        redirect = executor.execute("redirect_for_demo_tool", "{}", tool_server.tools)
    body = json.loads(outcome.observation)
    assert body["error"] == "request invalid, data error. status_code=404"
    assert "does not exist" in body["response"]
    assert outcome.attempts == 1 and outcome.error_kind is ToolErrorKind.HTTP_STATUS  # 4xx is not retried
    assert json.loads(redirect.observation)["error"] == "request invalid, data error. status_code=302"
    assert redirect.error is not None and "not followed" in redirect.error


def test_http_retries_503_with_backoff_then_succeeds(tool_server: ToolServer, waits: RetryWaits) -> None:
    tool_server.state.hits["flaky"] = 0
    with http_executor(tool_server, tools_max_retries=3) as executor:
        outcome = executor.execute("flaky_for_demo_tool", "{}", tool_server.tools)
    assert outcome.ok and outcome.observation == "recovered" and outcome.attempts == 3
    # Exponential backoff from UMI_TOOLS_BACKOFF_S (0.01 here), each wait plus a jitter of at most 0.01.
    assert len(waits.delays) == 2
    assert 0.01 <= waits.delays[0] <= 0.02 and 0.02 <= waits.delays[1] <= 0.03
    assert tool_server.state.hits["flaky"] == 3


def test_http_retries_are_bounded_then_the_status_is_reported(tool_server: ToolServer, waits: RetryWaits) -> None:
    before = tool_server.state.hits["down"]
    with http_executor(tool_server, tools_max_retries=2) as executor:
        outcome = executor.execute("down_for_demo_tool", "{}", tool_server.tools)
    assert outcome.observation == json.dumps({"error": "request invalid, data error. status_code=503", "response": "still down"})
    assert not outcome.ok and outcome.attempts == 3 and len(waits.delays) == 2
    assert tool_server.state.hits["down"] - before == 3


def test_http_429_waits_as_long_as_retry_after_says(tool_server: ToolServer, waits: RetryWaits) -> None:
    tool_server.state.hits["throttled"] = 0
    with http_executor(tool_server) as executor:
        outcome = executor.execute("throttled_for_demo_tool", "{}", tool_server.tools)
    assert outcome.ok and outcome.observation == "thanks for waiting" and outcome.attempts == 2
    assert waits.delays == [pytest.approx(0.3, abs=0.02)]  # the server's 0.3 s, not the 0.01 s backoff


def test_retries_never_wait_past_the_tasks_deadline(tool_server: ToolServer, waits: RetryWaits) -> None:
    before = tool_server.state.hits["down"]
    started = time.monotonic()
    with build_executor(
        settings(tools_http_catalog=tool_server.catalog_dir, tools_allow_hosts=["127.0.0.1"], tools_max_retries=5),
        registry=ToolRegistry(),
        backoff_s=2.0,
    ) as executor:
        outcome = executor.execute("down_for_demo_tool", "{}", tool_server.tools, deadline=started + 1.5)
    # The first wait (2 s or more) would end past the deadline, so the 503 is final at once.
    assert time.monotonic() - started < 1.5
    assert not outcome.ok and outcome.attempts == 1 and waits.delays == []
    assert tool_server.state.hits["down"] - before == 1


def test_http_timeout_is_a_request_time_out_observation(tool_server: ToolServer, waits: RetryWaits) -> None:
    started = time.monotonic()
    with http_executor(tool_server, tools_timeout_s=0.2, tools_max_retries=1) as executor:
        outcome = executor.execute("slow_for_demo_tool", "{}", tool_server.tools)
    assert outcome.observation == TIMEOUT_OBSERVATION and outcome.error_kind is ToolErrorKind.TIMEOUT
    assert outcome.attempts == 2 and len(waits.delays) == 1
    assert time.monotonic() - started < 0.9


def test_retry_policy_backs_off_exponentially_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=5, backoff_s=0.5, max_backoff_s=3.0)
    for retry, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (5, 3.0)):
        delays = [policy.delay_s(retry) for _ in range(50)]
        assert all(base <= d <= base + 0.5 for d in delays) and len(set(delays)) > 1
    assert 2.5 <= policy.delay_s(1, retry_after_s=2.5) <= 3.0
    assert policy.delay_s(1, retry_after_s=60) <= 3.5  # capped


def test_an_api_error_echoing_the_key_is_masked_and_bounded(
    tool_server: ToolServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), http_executor(tool_server, tools_rapidapi_key=SECRET) as executor:
        outcome = executor.execute("leaky_for_demo_tool", "{}", tool_server.tools)
    assert tool_server.state.headers["leaky"]["x-rapidapi-key"] == SECRET  # the server did see the key
    assert not outcome.ok and outcome.error is not None and outcome.attempts == 1
    assert len(outcome.error) <= ERROR_TEXT_LIMIT and len(outcome.observation) <= 1024 + 3
    assert "bad key ***" in outcome.observation
    for text in (outcome.error, outcome.observation, *(r.getMessage() for r in caplog.records)):
        assert SECRET not in text and "rk-SECRET" not in text
    assert all(len(r.getMessage()) <= 2 * ERROR_TEXT_LIMIT for r in caplog.records)


def test_connection_errors_are_retried_then_reported(waits: RetryWaits) -> None:
    catalog = ToolCatalog()
    with ServerThread(FastAPI()) as gone:
        url = gone.url
    catalog.add_tool(ToolSpec.model_validate({"tool_name": "gone", "api_list": [{"name": "ping", "url": url + "/x"}]}), category="C")
    backend = HttpBackend(catalog, guard=NetworkGuard(["127.0.0.1"]))
    with ToolExecutor([backend], retry=RetryPolicy(max_retries=2, backoff_s=0.01)) as executor:
        outcome = executor.execute("ping_for_gone", "{}", [doc("ping_for_gone")])
    assert outcome.error_kind is ToolErrorKind.CONNECTION and outcome.attempts == 3 and len(waits.delays) == 2
    assert json.loads(outcome.observation)["error"].startswith("request failed")


# --------------------------------------------------------------------------- egress guard


def test_loopback_tool_server_is_refused_without_the_allow_list(tool_server: ToolServer) -> None:
    before = sum(tool_server.state.hits.values())
    with http_executor(tool_server, tools_allow_hosts=[]) as executor:
        outcome = executor.execute("search_for_demo_tool", '{"q": "cats"}', tool_server.tools)
    assert not outcome.ok and outcome.error_kind is ToolErrorKind.REFUSED and outcome.attempts == 1
    error = json.loads(outcome.observation)["error"]
    assert error.startswith("request refused: 127.0.0.1 is a loopback address") and "UMI_TOOLS_ALLOW_HOSTS" in error
    assert sum(tool_server.state.hits.values()) == before


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.0.0.1", "private"),
        ("192.168.1.20", "private"),
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("[::1]", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.1.1", "private"),
        ("fe80::1", "link-local"),
        ("fd00::5", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("100.64.0.1", "non-global"),
    ],
)
def test_guard_refuses_internal_addresses(host: str, reason: str) -> None:
    def no_dns(name: str, port: int) -> list[str]:
        raise AssertionError("IP literals must not be resolved")

    with pytest.raises(EgressRefused, match=reason):
        check_host(host, resolver=no_dns)


def test_guard_allows_public_and_allow_listed_destinations() -> None:
    assert check_host("8.8.8.8") == ["8.8.8.8"]
    assert check_host("2606:4700:4700::1111") == ["2606:4700:4700::1111"]
    assert check_host("10.0.0.1", ["10.0.0.1"]) == ["10.0.0.1"]
    assert check_host("10.9.8.7", ["10.0.0.0/8"]) == ["10.9.8.7"]

    dns = {"internal.example": ["93.184.216.34", "10.0.0.7"], "public.example": ["93.184.216.34"]}

    def resolver(name: str, port: int) -> list[str]:
        return dns[name]

    assert check_host("public.example", resolver=resolver) == ["93.184.216.34"]
    with pytest.raises(EgressRefused, match="internal.example resolves to private address 10.0.0.7"):
        check_host("internal.example", resolver=resolver)
    assert check_host("Internal.Example", ["internal.example"], resolver=resolver) == dns["internal.example"]


def test_connections_go_to_the_vetted_address(tool_server: ToolServer) -> None:
    """A host name is resolved once by the guard and the socket dials that address."""
    port = int(tool_server.url.rsplit(":", 1)[1])
    catalog = ToolCatalog()
    spec = tool_json(f"http://tools.example:{port}")
    catalog.add_tool(ToolSpec.model_validate(spec), category="Data", standard_tool_name="demo_tool")
    lookups: list[str] = []

    def resolver(name: str, port: int) -> list[str]:
        lookups.append(name)
        return ["127.0.0.1"]

    allowed = HttpBackend(catalog, guard=NetworkGuard(["127.0.0.1"], resolver=resolver))
    refused = HttpBackend(catalog, guard=NetworkGuard([], resolver=resolver))
    with ToolExecutor([allowed]) as executor:
        outcome = executor.execute("search_for_demo_tool", '{"q": "dogs"}', tool_server.tools)
    assert outcome.ok and json.loads(outcome.observation) == {"query": {"q": "dogs"}}
    assert lookups == ["tools.example"]
    assert tool_server.state.headers["search"]["host"] == f"tools.example:{port}"
    assert tool_server.state.headers["search"]["x-rapidapi-host"] == "tools.example"
    with ToolExecutor([refused]) as executor:
        blocked = executor.execute("search_for_demo_tool", '{"q": "dogs"}', tool_server.tools)
    assert blocked.error_kind is ToolErrorKind.REFUSED
    assert "tools.example resolves to loopback address 127.0.0.1" in blocked.observation


# --------------------------------------------------------------------------- /virtual


class Info(BaseModel):
    """StableToolBench server/main.py's request model: every field is required."""

    category: str
    tool_name: str
    api_name: str
    tool_input: str | dict
    strip: str
    toolbench_key: str


def virtual_app(received: list[tuple[Info, str | None]]) -> FastAPI:
    app = FastAPI()

    @app.post("/virtual")
    def virtual(info: Info, request: Request) -> dict[str, Any]:
        received.append((info, request.headers.get("toolbench_key")))
        if info.api_name == "get_weather":
            return {"error": "", "response": {"city": info.tool_input["city"], "temp_c": 21}}  # type: ignore[index]
        if info.api_name == "get_note":
            return {"error": "", "response": "a plain note"}
        if info.api_name == "echo":
            return {"error": "", "response": info.tool_input}
        return {"error": "Rate limit error...", "response": "slow down"}

    return app


@pytest.fixture(scope="module")
def virtual_server() -> Iterator[tuple[str, list[tuple[Info, str | None]]]]:
    received: list[tuple[Info, str | None]] = []
    with ServerThread(virtual_app(received)) as server:
        yield server.url + "/virtual", received


def test_virtual_backend_speaks_the_stabletoolbench_protocol(
    virtual_server: tuple[str, list[tuple[Info, str | None]]], tmp_path: Path
) -> None:
    url, received = virtual_server
    (tmp_path / "Weather").mkdir()
    (tmp_path / "Weather" / "weather_api.json").write_text(
        json.dumps({"tool_name": "Weather API", "api_list": [{"name": "Get Weather", "url": "", "method": "GET"}]})
    )
    catalog = ToolCatalog.load(tmp_path)
    backend = VirtualBackend(url, guard=NetworkGuard(["127.0.0.1"]), key=SecretStr("vk-123"), catalog=catalog)
    tools = [doc("get_weather_for_weather_api"), doc("get_note_for_notes_app", 'This is the subfunction for tool "notes_app".')]
    with ToolExecutor([backend]) as executor:
        weather = executor.execute("get_weather_for_weather_api", '{"city": "Paris"}', tools)
        note = executor.execute("get_note_for_notes_app", "{}", tools)
        limited = executor.execute("other_for_notes_app", '{"limit": 1}', [doc("other_for_notes_app")])

    assert weather.ok and weather.backend == "virtual" and weather.observation == '{"city": "Paris", "temp_c": 21}'
    assert note.ok and note.observation == "a plain note"
    assert not limited.ok and limited.error_kind is ToolErrorKind.API_ERROR
    assert limited.observation == json.dumps({"error": "Rate limit error...", "response": "slow down"})

    info, header = received[-3]
    assert (info.category, info.tool_name, info.api_name) == ("Weather", "weather_api", "get_weather")
    assert info.tool_input == {"city": "Paris"} and info.strip == "" and info.toolbench_key == "vk-123"
    assert header == "vk-123"
    info, _ = received[-2]
    assert (info.category, info.tool_name, info.api_name) == ("", "notes_app", "get_note")


def test_virtual_key_is_redacted_when_built_from_settings(
    virtual_server: tuple[str, list[tuple[Info, str | None]]], caplog: pytest.LogCaptureFixture
) -> None:
    url, received = virtual_server
    key = "vk-SECRET-987"
    caplog.set_level(logging.DEBUG)
    s = settings(tools_virtual_url=url, tools_virtual_key=key, tools_allow_hosts=["127.0.0.1"])
    with build_executor(s, registry=ToolRegistry()) as executor:
        assert [b.name for b in executor.backends] == ["python", "virtual"]
        outcome = executor.execute("echo_for_anything", json.dumps({"text": f"my key is {key}"}), [doc("echo_for_anything")])
    assert received[-1][0].toolbench_key == key and received[-1][0].tool_input == {"text": f"my key is {key}"}
    assert key not in outcome.observation and "***" in outcome.observation
    assert key not in caplog.text and any("***" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- secrets


def test_secrets_never_reach_observations_errors_or_logs(tool_server: ToolServer, caplog: pytest.LogCaptureFixture) -> None:
    registry = ToolRegistry()

    @registry.register("leak_for_calc")
    def leak(token: str) -> str:
        raise PermissionError(f"token {token} rejected")

    caplog.set_level(logging.DEBUG)
    s = settings(tools_http_catalog=tool_server.catalog_dir, tools_allow_hosts=["127.0.0.1"], tools_rapidapi_key=SECRET)
    tools = tool_server.tools + registry.docs()
    with build_executor(s, registry=registry) as executor:
        # The server echoes the key it received (JSON-escaped) and the query (which repeats it).
        echoed = executor.execute("who_am_i_for_demo_tool", json.dumps({"q": SECRET}), tools)
        failed = executor.execute("leak_for_calc", json.dumps({"token": SECRET}), tools)

    assert tool_server.state.headers["whoami"]["x-rapidapi-key"] == SECRET  # it was really sent
    assert json.loads(echoed.observation) == {"your_key": "***", "query": {"q": "***"}}
    assert failed.observation == json.dumps(
        {"error": "Function executing leak_for_calc error...\nPermissionError: token *** rejected", "response": ""}
    )
    assert failed.error is not None and SECRET not in failed.error
    escaped = json.dumps(SECRET)[1:-1]
    assert caplog.records, "the calls were logged"
    for record in caplog.records:
        message = record.getMessage()
        assert SECRET not in message and escaped not in message and "rk-SECRET" not in message, record.name
    assert any("***" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- assembly


def test_build_executor_orders_backends_and_routes_by_name(
    tool_server: ToolServer, virtual_server: tuple[str, list[tuple[Info, str | None]]]
) -> None:
    registry = ToolRegistry()
    registry.add("list_for_flowers", lambda: "from python")  # also recorded in the mirror
    s = settings(
        tools_mirror=TRAJECTORIES,
        tools_http_catalog=tool_server.catalog_dir,
        tools_virtual_url=virtual_server[0],
        tools_allow_hosts=["127.0.0.1"],
    )
    with build_executor(s, registry=registry) as executor:
        assert [b.name for b in executor.backends] == ["python", "mirror", "http", "virtual"]
        route = {name: executor.backend_for(name).name for name in ("list_for_flowers", "get_by_id_for_flowers", "search_for_demo_tool", "anything_for_else")}  # type: ignore[union-attr]
        assert route == {
            "list_for_flowers": "python",
            "get_by_id_for_flowers": "mirror",
            "search_for_demo_tool": "http",
            "anything_for_else": "virtual",
        }
        assert executor.execute("list_for_flowers", "{}", [doc("list_for_flowers")]).observation == "from python"
    with build_executor(settings(), registry=ToolRegistry()) as bare:
        assert [b.name for b in bare.backends] == ["python"]
