"""The SGLang simulator, over real HTTP: replay, SGLang's protocol and errors, cache, latency."""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.simulator import LLAMA2_7B_1GPU, LatencyProfile, PseudoTokenizer, SimulatorConfig, create_app
from services.simulator.constraints import compile_constraint
from services.simulator.prefix_cache import RadixCache
from services.simulator.tokenizer import _REGISTERED_TEXTS
from shared.asgi import ServerThread
from shared.constraints import caller_ebnf, planner_regex
from shared.prompts import (
    STOP_SEQUENCE,
    Speaker,
    ToolDoc,
    Turn,
    model_calls,
    render_caller_prompt,
    render_planner_prompt,
    render_summarizer_prompt,
)
from shared.sglang_contract import generate_contract_error
from tests.conftest import load_trajectories

EOS = 2


# --- data ----------------------------------------------------------------------------------------


def _decision_points() -> list[dict[str, Any]]:
    """Every model call of raw_data_stage_2.json: role, exact prompt, recorded continuation, tools."""
    points = []
    for record in load_trajectories():
        tools = [ToolDoc.model_validate(t) for t in record["tools"]]
        turns = [Turn.model_validate(c) for c in record["conversations"]]
        for call in model_calls(tools, turns):
            points.append({"role": call.role.value, "prompt": call.prompt, "value": call.continuation, "tools": tools})
    return points


POINTS = _decision_points()
BY_ROLE = {role: [p for p in POINTS if p["role"] == role] for role in ("planner", "caller", "summarizer")}
TOOLS = [ToolDoc(Name="weather_for_demo", function="Current weather.", input={"city": "string"}),
         ToolDoc(Name="news_for_demo", function="Headlines.", input={})]


def _constraint_for(point: dict[str, Any]) -> dict[str, Any]:
    if point["role"] == "planner":
        return {"regex": planner_regex()}
    if point["role"] == "caller":
        return {"ebnf": caller_ebnf(point["tools"])}
    return {}


# --- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(SimulatorConfig())) as thread:
        yield thread


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def stop_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLPFT-style {input, target} records whose targets contain stop strings."""
    path = tmp_path_factory.mktemp("sim") / "records.json"
    records = [
        {"input": "Q: stop test assistant: ", "target": "alpha beta</s>gamma STOP delta"},
        {"input": "Q: natural end caller: ", "target": "Action: x\nAction Input: {}"},
    ]
    path.write_text(json.dumps(records))
    return path


def _serve(**fields: Any) -> ServerThread:
    """A simulator for one test, started by ``with``."""
    return ServerThread(create_app(SimulatorConfig(**fields)))


def generate(http: httpx.Client, text: Any, **params: Any) -> httpx.Response:
    return http.post("/generate", json={"text": text, "sampling_params": params})


def _sse_events(body: str) -> list[Any]:
    assert body.endswith("data: [DONE]\n\n")
    events = [block for block in body.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    return [json.loads(block[len("data: "):]) for block in events[:-1]]


# --- replay --------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["planner", "caller", "summarizer"])
def test_every_recorded_decision_point_replays_exactly(client: httpx.Client, role: str) -> None:
    assert BY_ROLE[role], "the example data must contain this role"
    for point in BY_ROLE[role]:
        params = {"max_new_tokens": 512, "stop": [STOP_SEQUENCE], "temperature": 0.5, **_constraint_for(point)}
        body = {"text": point["prompt"], "sampling_params": params}
        assert generate_contract_error(body) is None
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["text"] == point["value"]
        meta = out["meta_info"]
        assert meta["finish_reason"] == {"type": "stop", "matched": EOS}
        assert meta["simulator"] == {"source": "recorded"}
        assert meta["prompt_tokens"] == PseudoTokenizer.count(point["prompt"])
        assert meta["completion_tokens"] == PseudoTokenizer.count(point["value"]) + 1 == len(out["output_ids"])
        assert out["output_ids"][-1] == EOS


def test_recorded_values_satisfy_the_product_constraints_and_violations_are_rejected() -> None:
    regex = compile_constraint("regex", planner_regex())
    for point in BY_ROLE["planner"]:
        assert regex.accepts(point["value"]), point["value"][-80:]
        assert not regex.accepts(point["value"] + " and more")
    for point in BY_ROLE["caller"]:
        grammar = compile_constraint("ebnf", caller_ebnf(point["tools"]))
        assert grammar.accepts(point["value"]), point["value"]
        assert not grammar.accepts(point["value"] + "}")
        assert not grammar.accepts(point["value"].replace("Action: ", "Action: not_a_listed_tool_", 1))
        assert not grammar.accepts(point["value"].replace("Action Input: ", "Action Input: [", 1))


def test_recorded_answer_that_violates_the_request_constraint_is_a_400(client: httpx.Client) -> None:
    planner = BY_ROLE["planner"][0]
    response = generate(client, planner["prompt"], max_new_tokens=512, regex=r"Action: .*")
    assert response.status_code == 400
    assert list(response.json()) == ["error"] and list(response.json()["error"]) == ["message"]
    assert "violates the request's regex constraint" in response.json()["error"]["message"]

    caller = BY_ROLE["caller"][0]
    response = generate(client, caller["prompt"], max_new_tokens=512, ebnf=caller_ebnf(TOOLS))
    assert response.status_code == 400
    assert "violates the request's ebnf constraint" in response.json()["error"]["message"]


def test_glpft_training_records_are_replayed(tmp_path: Path) -> None:
    records = json.loads((Path(__file__).parent / "data/toolbench-train-example/train_caller.json").read_text())[:3]
    path = tmp_path / "train_caller.json"
    path.write_text(json.dumps(records))
    with _serve(data_files=[path]) as thread, httpx.Client(base_url=thread.url) as http:
        for record in records:
            out = generate(http, record["input"], max_new_tokens=512, stop=[STOP_SEQUENCE]).json()
            assert out["text"] == record["target"]
            assert out["meta_info"]["simulator"]["source"] == "recorded"


def test_role_filter_replays_only_that_role() -> None:
    with _serve(role="caller") as thread, httpx.Client(base_url=thread.url) as http:
        caller, planner = BY_ROLE["caller"][0], BY_ROLE["planner"][0]
        assert generate(http, caller["prompt"], max_new_tokens=512).json()["text"] == caller["value"]
        out = generate(http, planner["prompt"], max_new_tokens=512).json()
        assert out["meta_info"]["simulator"]["source"] == "synthetic"
        assert http.get("/model_info").json()["model_path"] == "simulator/alpha-umi-caller-7b"


# --- synthetic answers -------------------------------------------------------------------------------


def test_unknown_prompts_get_role_valid_synthetic_answers(client: httpx.Client) -> None:
    user = Turn(speaker=Speaker.USER, value="What is the weather in Paris?")
    out = generate(client, render_planner_prompt(TOOLS, [user]), max_new_tokens=512, regex=planner_regex()).json()
    assert out["meta_info"]["simulator"] == {"source": "synthetic"}
    assert "weather_for_demo" in out["text"] and out["text"].endswith("Next: caller.")

    thought = Turn(speaker=Speaker.ASSISTANT, value="Call the weather API. Next: caller.")
    out = generate(client, render_caller_prompt(TOOLS, [user, thought]), max_new_tokens=512,
                   ebnf=caller_ebnf(TOOLS)).json()
    assert out["text"] == "Action: weather_for_demo\nAction Input: {}"

    history = [user, thought, Turn(speaker=Speaker.CALLER, value=out["text"]),
               Turn(speaker=Speaker.OBSERVATION, value='{"temp_c": 21, "sky": "clear"}')]
    out = generate(client, render_planner_prompt(TOOLS, history), max_new_tokens=512).json()
    assert out["text"].endswith("Next: conclusion.")

    done = Turn(speaker=Speaker.ASSISTANT, value="I can answer now. Next: conclusion.")
    out = generate(client, render_summarizer_prompt([*history, done]), max_new_tokens=512).json()
    assert "simulated" in out["text"] and '{"temp_c": 21, "sky": "clear"}' in out["text"]


def test_synthetic_answers_satisfy_a_constraint_the_default_text_would_not(client: httpx.Client) -> None:
    prompt = render_planner_prompt(TOOLS, [Turn(speaker=Speaker.USER, value="Give me a code.")])
    out = generate(client, prompt, max_new_tokens=64, regex=r"CODE-[0-9]{3}").json()
    assert re.fullmatch(r"CODE-[0-9]{3}", out["text"])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = generate(client, prompt, max_new_tokens=64, json_schema=json.dumps(schema)).json()
    assert isinstance(json.loads(out["text"])["n"], int)
    grammar = caller_ebnf([ToolDoc(Name="other_tool", function="")])
    out = generate(client, prompt, max_new_tokens=64, ebnf=grammar).json()
    assert out["text"] == "Action: other_tool\nAction Input: {}"


# --- stop, max_new_tokens, finish_reason -----------------------------------------------------------


@pytest.fixture(scope="module")
def stop_client(stop_data: Path) -> Iterator[httpx.Client]:
    with ServerThread(create_app(SimulatorConfig(data_files=[stop_data], served_model_name="stop-test"))) as thread:
        with httpx.Client(base_url=thread.url) as http:
            yield http


def test_stop_string_cuts_and_trims(stop_client: httpx.Client) -> None:
    out = generate(stop_client, "Q: stop test assistant: ", stop=["STOP", "</s>"]).json()
    assert out["text"] == "alpha beta"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "</s>"}
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == math.ceil(len("alpha beta</s>") / 4)

    out = generate(stop_client, "Q: stop test assistant: ", stop="STOP").json()
    assert out["text"] == "alpha beta</s>gamma "
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "STOP"}


def test_no_stop_trim_keeps_the_stop_string(stop_client: httpx.Client) -> None:
    out = generate(stop_client, "Q: stop test assistant: ", stop=["</s>"], no_stop_trim=True).json()
    assert out["text"].startswith("alpha beta</s>")
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "</s>"}


def test_max_new_tokens_truncates_with_a_length_finish(stop_client: httpx.Client) -> None:
    out = generate(stop_client, "Q: stop test assistant: ", max_new_tokens=2, stop=["</s>"]).json()
    assert out["text"] == "alpha be"
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"] == 2
    out = generate(stop_client, "Q: stop test assistant: ", max_new_tokens=0).json()
    assert (out["text"], out["output_ids"]) == ("", [])
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_natural_end_is_an_eos_stop(stop_client: httpx.Client) -> None:
    target = "Action: x\nAction Input: {}"
    out = generate(stop_client, "Q: natural end caller: ", max_new_tokens=100).json()
    assert out["text"] == target
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    # The EOS needs a token of its own: a budget that only fits the text ends on length.
    exact = math.ceil(len(target) / 4)
    out = generate(stop_client, "Q: natural end caller: ", max_new_tokens=exact).json()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": exact}


def test_stop_token_ids_end_on_the_first_listed_id_generated(stop_client: httpx.Client) -> None:
    ids = PseudoTokenizer().encode("alpha beta</s>gamma STOP delta")
    out = generate(stop_client, "Q: stop test assistant: ", stop_token_ids=[ids[3], 31999, ids[1]]).json()
    assert out["output_ids"] == ids[:2] and out["text"] == "alph"  # the id's own text is not output
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[1]}
    out = generate(stop_client, "Q: stop test assistant: ", stop_token_ids=[31999]).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}


# --- error shapes --------------------------------------------------------------------------------------


def _assert_bad_request_object(response: httpx.Response) -> None:
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert (body["object"], body["type"], body["param"], body["code"]) == ("error", "Bad Request", None, 400)
    assert body["message"]


def test_unparseable_or_non_object_bodies_are_fastapi_style_400s(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    _assert_bad_request_object(client.post("/generate", content=b"{not json", headers=headers))
    _assert_bad_request_object(client.post("/generate", json=[{"text": "x"}]))


@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "sampling_params": {"max_tokens": 5}},
        {"text": "x", "sampling_params": {"temperature": "0"}},
        {"text": "x", "sampling_params": {"json_schema": {"type": "object"}}},
        {"text": 5},
    ],
)
def test_contract_violations_use_sglang_contract_text(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/generate", json=body)
    expected = generate_contract_error(body)
    assert expected is not None
    assert response.status_code == 400
    assert response.json() == {"error": expected}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1}, "temperature must be a non-negative finite number, got -1."),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], got 3."),
        ({"presence_penalty": -2.5}, "presence_penalty must be in [-2, 2], got -2.5."),
        ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0."),
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
        ({"max_new_tokens": 2, "min_new_tokens": 5}, "min_new_tokens must be in [0, max_new_tokens(2)], got 5."),
        ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens], got -1."),
        ({"stop": [f"s{i}" for i in range(33)]}, "at most 32 stop strings are allowed, got 33"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "Only one of json_schema, regex, ebnf, or structural_tag can be set."),
    ],
)
def test_sampling_params_are_verified_like_sglang(client: httpx.Client, params: dict[str, Any], message: str) -> None:
    response = generate(client, "hello", **params)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message}}


def test_missing_prompt_empty_ids_and_context_length(client: httpx.Client) -> None:
    response = client.post("/generate", json={"sampling_params": {}})
    assert (response.status_code, response.json()) == (
        400, {"error": {"message": "Either text, input_ids or input_embeds should be provided."}})
    response = client.post("/generate", json={"input_ids": []})
    assert response.json() == {"error": {"message": "input_ids cannot be empty."}}

    response = generate(client, "a" * 4 * 4096)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": (
        "The input (4096 tokens) is longer than the model's context length (4096 tokens).")}}
    response = generate(client, "a" * 4 * 4000, max_new_tokens=512)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(
        "Requested token count exceeds the model's maximum context length of 4096 tokens. "
        "You requested a total of 4512 tokens: 4000 tokens from the input messages and 512 tokens")


@pytest.mark.parametrize(("kind", "source"), [("regex", "(unclosed"), ("ebnf", 'root ::= "a" missing_rule'),
                                              ("ebnf", "root ::= ::="), ("json_schema", "{not json"),
                                              ("json_schema", '{"type": "string", "pattern": "a\\u0000"}'),
                                              ("regex", "a\x00")])
def test_constraints_that_do_not_compile_are_400s(client: httpx.Client, kind: str, source: str) -> None:
    response = generate(client, "hello", **{kind: source})
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message"]
    grammar = {"regex": "regex", "ebnf": "ebnf", "json_schema": "json"}[kind]
    assert body["error"]["message"].startswith(f"Failed to compile {grammar} grammar: ")


def test_api_key_guards_all_but_health_and_metrics() -> None:
    with _serve(api_key="s3cret") as thread, httpx.Client(base_url=thread.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = http.post("/generate", json={"text": "hi"}, headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
        assert http.get("/v1/models").status_code == 401
        assert http.get("/flush_cache").status_code == 401
        ok = http.post("/generate", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["text"]
        for path in ("/health", "/health_generate", "/ready", "/metrics"):
            assert http.get(path).status_code == 200


# --- concurrency, queueing, abort ---------------------------------------------------------------------


def _wait_until_running(http: httpx.Client, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while http.get("/server_info").json()["internal_states"][0]["num_running_reqs"] < count:
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.01)


def test_full_queue_is_a_503_and_a_streamed_abort() -> None:
    with _serve(ttft_s=0.6, max_running_requests=1, max_queued_requests=0) as thread, \
            httpx.Client(base_url=thread.url, timeout=10) as http, ThreadPoolExecutor(1) as pool:
        first = pool.submit(generate, http, "first", max_new_tokens=4)
        _wait_until_running(http)
        response = generate(http, "second", max_new_tokens=4)
        assert response.status_code == 503
        assert response.json() == {"object": "error", "message": "The request queue is full.", "type": "503",
                                   "param": None, "code": 503}
        streamed = http.post("/generate", json={"text": "third", "stream": True})
        assert streamed.status_code == 200
        (chunk,) = _sse_events(streamed.text)
        assert chunk["meta_info"]["finish_reason"]["type"] == "abort"
        assert chunk["meta_info"]["finish_reason"]["status_code"] == 503
        assert first.result().status_code == 200


def test_waiting_requests_queue_and_duplicate_rids_are_refused() -> None:
    with _serve(ttft_s=0.4, max_running_requests=1) as thread, \
            httpx.Client(base_url=thread.url, timeout=10) as http, ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: http.post("/generate", json={"text": "a", "rid": "dup"}))
        _wait_until_running(http)
        second = pool.submit(lambda: http.post("/generate", json={"text": "b", "rid": "other"}))
        deadline = time.monotonic() + 5
        while "sglang:num_queue_reqs{" not in http.get("/metrics").text or \
                _metric(http.get("/metrics").text, "sglang:num_queue_reqs") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        duplicate = http.post("/generate", json={"text": "c", "rid": "dup"})
        assert (duplicate.status_code, duplicate.json()) == (
            400, {"error": {"message": "Duplicate request ID detected: dup"}})
        assert first.result().json()["meta_info"]["id"] == "dup"
        assert second.result().status_code == 200
        assert second.result().json()["meta_info"]["e2e_latency"] >= 0.5  # waited for the first one


def test_abort_request_ends_a_running_request_early() -> None:
    with _serve(decode_s_per_token=0.05) as thread, httpx.Client(base_url=thread.url, timeout=10) as http, \
            ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(lambda: http.post("/generate", json={
            "text": "long one", "rid": "victim", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}))
        _wait_until_running(http)
        assert http.post("/abort_request", json={"rid": "victim"}).status_code == 200
        out = pending.result().json()
        assert time.monotonic() - started < 5  # 200 tokens would take 10 s
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["meta_info"]["completion_tokens"] < 200


# --- prefix cache ------------------------------------------------------------------------------------------


def test_cached_tokens_grow_along_a_trajectory_and_flush_resets_them(client: httpx.Client) -> None:
    flushed = client.post("/flush_cache")
    assert flushed.status_code == 200
    assert flushed.text.startswith("Cache flushed.\nPlease check backend logs for more details. (When there are "
                                   "running or waiting requests, the operation will not be performed.)")
    record = next(r for r in load_trajectories() if sum(c["from"] == "assistant" for c in r["conversations"]) >= 3)
    tools = [ToolDoc.model_validate(t) for t in record["tools"]]
    turns = [Turn.model_validate(c) for c in record["conversations"]]
    steps = [i for i, t in enumerate(turns) if t.speaker is Speaker.ASSISTANT]
    prompts = [render_planner_prompt(tools, turns[:i]) for i in steps[:3]]
    cached = [generate(client, p, max_new_tokens=512).json()["meta_info"]["cached_tokens"] for p in prompts]
    assert cached[0] == 0
    for earlier, later, hit in zip(prompts, prompts[1:], cached[1:], strict=False):
        assert hit == len(os.path.commonprefix([earlier, later])) // 4 > 0
    assert cached[2] > cached[1]

    assert client.get("/flush_cache").status_code == 200
    assert generate(client, prompts[2], max_new_tokens=512).json()["meta_info"]["cached_tokens"] == 0
    repeat = generate(client, prompts[2], max_new_tokens=512).json()["meta_info"]
    assert repeat["cached_tokens"] == repeat["prompt_tokens"] - 1  # SGLang always computes the last token


def test_flush_cache_refuses_while_busy_unless_it_may_wait() -> None:
    with _serve(ttft_s=0.3) as thread, httpx.Client(base_url=thread.url, timeout=10) as http, \
            ThreadPoolExecutor(1) as pool:
        pending = pool.submit(generate, http, "busy", max_new_tokens=2)
        _wait_until_running(http)
        refused = http.get("/flush_cache")
        assert refused.status_code == 400 and "Cache not flushed" in refused.text
        waited = http.post("/flush_cache", params={"timeout": 3})
        assert waited.status_code == 200 and waited.text.startswith("Cache flushed.")
        assert pending.result().status_code == 200


def test_radix_cache_matches_prefixes_and_evicts_least_recently_used() -> None:
    cache = RadixCache(capacity=10)
    cache.insert([1, 2, 3, 4, 5])
    cache.insert([1, 2, 3, 9])
    assert cache.match_prefix([1, 2, 3, 4, 7]) == 4
    assert cache.match_prefix([1, 2, 3, 9, 9]) == 4
    assert cache.size == 6
    cache.insert([7, 7, 7, 7, 7, 7])  # overflows: the least recently used branch goes first
    assert cache.size <= 10 and cache.match_prefix([7, 7, 7, 7, 7, 7]) == 6
    assert cache.match_prefix([1, 2, 3, 9]) < 4 or cache.match_prefix([1, 2, 3, 4, 5]) < 5
    cache.reset()
    assert cache.match_prefix([7, 7]) == 0
    disabled = RadixCache(capacity=0)
    disabled.insert([1, 2])
    assert disabled.match_prefix([1, 2]) == 0


def test_radix_cache_match_is_the_longest_common_prefix_wherever_edges_part() -> None:
    # Edges are compared block by block: partings at, around and past the block boundaries.
    rng = random.Random(7)
    cache, inserted = RadixCache(capacity=1_000_000), []
    for _ in range(60):
        base = rng.choice(inserted) if inserted and rng.random() < 0.8 else []
        cut = rng.choice([0, 1, 63, 64, 65, 127, 128, 129, 200, len(base)])
        tokens = base[:cut] + [rng.randint(0, 3) for _ in range(rng.randint(0, 300))]
        probe = tokens[: rng.randint(0, len(tokens))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 5))]
        expected = max((_common_prefix(probe, seen) for seen in inserted), default=0)
        assert cache.match_prefix(probe) == cache.match_prefix(tuple(probe)) == expected
        cache.insert(tokens)
        inserted.append(tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_pseudo_tokenizer_is_deterministic_and_concatenation_friendly() -> None:
    tokenizer = PseudoTokenizer()
    base = "You have assess to the following apis:\n"
    longer = base + "more history here"
    ids, longer_ids = tokenizer.encode(base), tokenizer.encode(longer)
    assert len(ids) == math.ceil(len(base) / 4) and PseudoTokenizer.count(longer) == len(longer_ids)
    full = len(base) // 4
    assert longer_ids[:full] == ids[:full]
    assert PseudoTokenizer().encode(base) == ids
    assert all(3 <= i < 32000 for i in ids)
    assert tokenizer.decode(longer_ids) == longer


def test_pseudo_tokenizer_cuts_ascii_runs_into_pieces_and_falls_back_to_bytes() -> None:
    # The rules spelled out one character at a time: ASCII runs in pieces of 4 from the run's
    # start, another BMP character alone, a character beyond it as its UTF-8 bytes (ids 3-258).
    piece = PseudoTokenizer().encode
    text = "abcdefg\u00e9hi\U0001f600\u4e2d\u4e2d j\ud800k" + "x" * 9
    expected = [*piece("abcd"), *piece("efg"), *piece("\u00e9"), *piece("hi"),
                *(3 + b for b in "\U0001f600".encode()), *piece("\u4e2d"), *piece("\u4e2d"),
                *piece(" j"), *piece("\ud800"), *piece("kxxx"), *piece("xxxx"), *piece("xx")]
    assert PseudoTokenizer().encode(text) == expected
    assert [PseudoTokenizer.text_through(text, n) for n in (5, 6, 7, 8, 9)] == [
        "abcdefg\u00e9hi", "abcdefg\u00e9hi", "abcdefg\u00e9hi", "abcdefg\u00e9hi\U0001f600",
        "abcdefg\u00e9hi\U0001f600\u4e2d"]
    assert PseudoTokenizer.tokens_through(text, len("abcdefg\u00e9hi\U0001f600")) == 8


def test_pseudo_tokenizer_remembered_texts_answer_as_new_ones() -> None:
    # encode remembers (bounded) which texts it registered for decode; a repeat, or a text
    # forgotten and seen again, must give the same ids and decode the same way.
    texts = [f"prompt {i} \u4e2d\U0001f600 " + "x" * i for i in range(_REGISTERED_TEXTS + 50)]
    fresh = [PseudoTokenizer().encode(text) for text in texts]
    tokenizer = PseudoTokenizer()
    first = tokenizer.encode(texts[0])
    first.append(-1)  # the caller's list is its own
    assert tokenizer.encode("".join(list(texts[0]))) == fresh[0]
    for text, ids in zip(texts, fresh, strict=True):
        assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == text
    assert len(tokenizer._registered) == _REGISTERED_TEXTS  # bounded
    assert texts[0] not in tokenizer._registered
    for text, ids in zip(texts, fresh, strict=True):  # evicted or not: same ids, same text back
        assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == text


# --- streaming and batches ------------------------------------------------------------------------------------


def test_streaming_sends_cumulative_chunks_then_done(client: httpx.Client) -> None:
    point = BY_ROLE["caller"][0]
    body = {"text": point["prompt"], "stream": True,
            "sampling_params": {"max_new_tokens": 512, "stop": [STOP_SEQUENCE], "stream_interval": 3,
                                "ebnf": caller_ebnf(point["tools"])}}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    chunks = _sse_events(text)
    total = PseudoTokenizer.count(point["value"]) + 1
    assert len(chunks) == math.ceil(total / 3)
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert chunks[-1]["text"] == point["value"]
    for earlier, later in zip(chunks, chunks[1:], strict=False):
        assert later["text"].startswith(earlier["text"])
        assert later["output_ids"][: len(earlier["output_ids"])] == earlier["output_ids"]
    assert [len(c["output_ids"]) for c in chunks[:-1]] == [3 * (i + 1) for i in range(len(chunks) - 1)]
    assert "e2e_latency" in chunks[-1]["meta_info"] and "e2e_latency" not in chunks[0]["meta_info"]


def test_streaming_errors_are_in_band(client: httpx.Client) -> None:
    response = client.post("/generate", json={"text": "x", "stream": True, "sampling_params": {"temperature": -1}})
    assert response.status_code == 200
    (event,) = _sse_events(response.text)
    assert event == {"error": {"message": "temperature must be a non-negative finite number, got -1.",
                               "type": "invalid_request_error", "code": 400, "retryable": False}}
    response = client.post("/generate", json={"text": "x", "stream": True, "sampling_params": {"regex": "("}})
    (chunk,) = _sse_events(response.text)
    reason = chunk["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert reason["message"].startswith("Failed to compile regex grammar")


def test_batch_returns_a_list_in_order_with_rids(client: httpx.Client) -> None:
    points = [BY_ROLE["summarizer"][0], BY_ROLE["planner"][1], BY_ROLE["caller"][1]]
    response = client.post("/generate", json={
        "text": [p["prompt"] for p in points], "rid": ["r-a", "r-b", "r-c"],
        "sampling_params": {"max_new_tokens": 512, "stop": [STOP_SEQUENCE]}})
    outputs = response.json()
    assert isinstance(outputs, list)
    assert [o["text"] for o in outputs] == [p["value"] for p in points]
    assert [o["meta_info"]["id"] for o in outputs] == ["r-a", "r-b", "r-c"]
    fan_out = generate(client, "hello", max_new_tokens=3, n=2).json()
    assert isinstance(fan_out, list) and len(fan_out) == 2
    uuid_hex = generate(client, "hello", max_new_tokens=1).json()["meta_info"]["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", uuid_hex)


def test_put_generate_is_accepted(client: httpx.Client) -> None:
    point = BY_ROLE["planner"][2]
    response = client.put("/generate", json={"text": point["prompt"], "sampling_params": {"max_new_tokens": 512}})
    assert response.status_code == 200 and response.json()["text"] == point["value"]


# --- info routes, OpenAI routes, metrics -------------------------------------------------------------------------


def test_info_routes_are_labelled_as_a_simulator(client: httpx.Client) -> None:
    for path in ("/health", "/health_generate", "/ready"):
        assert client.get(path).status_code == 200
    for path in ("/model_info", "/get_model_info"):
        info = client.get(path).json()
        assert info["model_path"] == "simulator/alpha-umi-7b" and info["simulator"] is True
        assert info["is_generation"] is True and info["served_model_name"] == "simulator/alpha-umi-7b"
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path).json()
        assert info["version"] == "0.5.23 (simulator)"
        assert info["context_length"] == 4096
        assert set(info["latency"]) >= {"ttft_s", "prefill_s_per_token", "decode_s_per_token", "max_running_requests"}
        assert info["simulator"]["recorded_prompts"] == {role: len(BY_ROLE[role]) for role in BY_ROLE}


def test_v1_models(client: httpx.Client) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    assert (card["id"], card["object"], card["owned_by"], card["max_model_len"]) == (
        "simulator/alpha-umi-7b", "model", "sglang-simulator", 4096)
    assert client.get("/v1/models/simulator/alpha-umi-7b").json()["id"] == "simulator/alpha-umi-7b"
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_v1_completions(client: httpx.Client) -> None:
    point = BY_ROLE["planner"][3]
    body = {"model": "simulator/alpha-umi-7b", "prompt": point["prompt"], "max_tokens": 512,
            "stop": [STOP_SEQUENCE], "regex": planner_regex()}
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["model"] == "simulator/alpha-umi-7b"
    (choice,) = out["choices"]
    assert (choice["text"], choice["finish_reason"], choice["matched_stop"]) == (point["value"], "stop", EOS)
    usage = out["usage"]
    assert usage["prompt_tokens"] == PseudoTokenizer.count(point["prompt"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    short = client.post("/v1/completions", json={"model": "m", "prompt": point["prompt"]}).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 16
    assert short["choices"][0]["text"] == point["value"][:64]

    streamed = client.post("/v1/completions", json={**body, "stream": True})
    chunks = _sse_events(streamed.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == point["value"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    wrong_type = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "text/plain"})
    _assert_bad_request_object(wrong_type)
    bad = client.post("/v1/completions", json={**body, "temperature": -1})
    assert bad.status_code == 400 and bad.json()["object"] == "error"


def _metric(text: str, name: str, model: str | None = None) -> float:
    label = f'model_name="{model}"' if model else ""
    pattern = re.compile(rf"^{re.escape(name)}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$", re.MULTILINE)
    match = pattern.search(text)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_metrics_use_sglang_names_and_count_requests(stop_data: Path) -> None:
    with _serve(data_files=[stop_data], served_model_name="metrics-test") as thread, \
            httpx.Client(base_url=thread.url) as http:
        outs = [generate(http, "Q: natural end caller: ", max_new_tokens=100).json() for _ in range(3)]
        response = http.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        model = "metrics-test"
        assert _metric(text, "sglang:num_requests_total", model) == 3
        assert _metric(text, "sglang:prompt_tokens_total", model) == sum(o["meta_info"]["prompt_tokens"] for o in outs)
        assert _metric(text, "sglang:generation_tokens_total", model) == sum(
            o["meta_info"]["completion_tokens"] for o in outs)
        cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
        assert cached > 0 and _metric(text, "sglang:cached_tokens_total", model) == cached
        assert _metric(text, "sglang:e2e_request_latency_seconds_count", model) == 3
        assert _metric(text, "sglang:time_to_first_token_seconds_count", model) == 3
        assert _metric(text, "sglang:num_running_reqs", model) == 0
        assert _metric(text, "sglang:num_queue_reqs", model) == 0
        prompt_total = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        assert _metric(text, "sglang:cache_hit_rate", model) == pytest.approx(cached / prompt_total)


# --- latency model -------------------------------------------------------------------------------------------------


def test_latency_model_times_prefill_decode_and_cache_hits() -> None:
    with _serve(ttft_s=0.1, prefill_s_per_token=0.001, decode_s_per_token=0.02) as thread, \
            httpx.Client(base_url=thread.url, timeout=10) as http:
        prompt = "p" * 4 * 200  # 200 tokens: 0.2 s of prefill when nothing is cached
        started = time.monotonic()
        cold = generate(http, prompt, max_new_tokens=10, ignore_eos=True).json()["meta_info"]
        cold_wall = time.monotonic() - started
        assert 0.1 + 0.2 + 0.2 <= cold["e2e_latency"] <= cold_wall < 2.0
        warm = generate(http, prompt, max_new_tokens=10, ignore_eos=True).json()["meta_info"]
        assert warm["cached_tokens"] == 199
        assert 0.3 <= warm["e2e_latency"] < cold["e2e_latency"] - 0.15  # prefill of one token only

        body = {"text": "q" * 40, "stream": True, "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
        started = time.monotonic()
        arrivals = []
        with http.stream("POST", "/generate", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic() - started)
        assert len(arrivals) == 5
        assert arrivals[0] >= 0.1 and arrivals[-1] - arrivals[0] >= 4 * 0.02 * 0.8  # decode spread over chunks


def test_running_limit_serializes_requests() -> None:
    with _serve(ttft_s=0.25, max_running_requests=1) as thread, \
            httpx.Client(base_url=thread.url, timeout=10) as http, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        results = list(pool.map(lambda text: generate(http, text, max_new_tokens=1), ["one", "two"]))
        assert all(r.status_code == 200 for r in results)
        assert time.monotonic() - started >= 0.5


def test_unknown_routes_and_bad_query_params_use_sglang_error_shapes(client: httpx.Client) -> None:
    missing = client.get("/no_such_route")
    assert (missing.status_code, missing.json()) == (
        404, {"object": "error", "message": "Not Found", "type": "404", "param": None, "code": 404})
    _assert_bad_request_object(client.get("/flush_cache", params={"timeout": "soon"}))


def test_command_line_builds_the_config() -> None:
    from services.simulator.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(["--role", "summarizer", "--port", "30003", "--latency", "llama2-7b-1gpu",
                                      "--max-queued-requests", "16", "--api-key", "k"])
    config = config_from_args(args)
    assert (config.role, config.port, config.api_key, config.max_queued_requests) == ("summarizer", 30003, "k", 16)
    assert config.ttft_s == LLAMA2_7B_1GPU.ttft_s
    assert config.resolved_model_path == "simulator/alpha-umi-summarizer-7b"


def test_config_latency_presets() -> None:
    config = SimulatorConfig(latency="llama2-7b-1gpu", max_running_requests=8)
    assert config.ttft_s == LLAMA2_7B_1GPU.ttft_s and config.decode_s_per_token == LLAMA2_7B_1GPU.decode_s_per_token
    assert config.max_running_requests == 8  # explicit fields win over the preset
    assert SimulatorConfig().latency.ttft_s == 0.0
    with pytest.raises(ValueError, match="unknown latency profile"):
        SimulatorConfig(latency="warp-speed")
    assert LatencyProfile.preset("realistic") == LLAMA2_7B_1GPU and LatencyProfile.preset("none").ttft_s == 0
    explicit = SimulatorConfig(role="planner", **LatencyProfile.preset("realistic").model_dump())
    assert explicit.max_running_requests == LLAMA2_7B_1GPU.max_running_requests
    data = Path("/x/records.json")
    assert SimulatorConfig(data=[data]).data_files == SimulatorConfig(data_files=[data]).data_files == [data]
