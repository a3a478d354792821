"""Bad input gets a clear ``422``/``413`` naming what is wrong, never a ``500``; nothing bad is stored.

One regression test per defect found by trying the gateway as an attacker would (issue 9):
NUL, lone surrogates and NaN answered ``500``, huge bodies and tool docs were read and stored.
The gateway runs on a real uvicorn server over the real PostgreSQL; raw sockets send what
``httpx`` would refuse to (chunked uploads, bytes that are not JSON).
"""

from __future__ import annotations

import json
import socket
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import func, select

from services.gateway.app import create_app
from shared.asgi import ServerThread
from shared.db import get_engine, session_scope
from shared.models import Task
from shared.schemas import MAX_ECHO_CHARS, MAX_ERRORS, IngressEnvelope, TaskCreate, safe_validation_errors
from shared.settings import load_settings
from tests.pipeline_helpers import CollectingDispatcher

MAX_BODY_BYTES = 1_048_576
TOOL = {"Name": "get_weather_for_weather", "function": "Weather by city.", "input": {"city": "string, "}}


@pytest.fixture(scope="module")
def gateway(postgres_url: str) -> Iterator[tuple[ServerThread, CollectingDispatcher]]:
    settings = load_settings(database_url=postgres_url, max_body_bytes=MAX_BODY_BYTES)
    dispatcher = CollectingDispatcher()
    with ServerThread(create_app(settings, dispatcher=dispatcher)) as server:
        yield server, dispatcher


@pytest.fixture
def client(gateway: tuple[ServerThread, CollectingDispatcher]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway[0].url, timeout=30) as http:
        yield http


def _task_count(postgres_url: str) -> int:
    with session_scope(get_engine(postgres_url)) as session:
        return int(session.exec(select(func.count()).select_from(Task)).one())


def _post_raw(client: httpx.Client, body: str) -> httpx.Response:
    """POST ``body`` as given: Python's ``json`` spells NaN and lone surrogates (``\\ud800``) as JSON does not."""
    return client.post("/v1/tasks", content=body.encode("utf-8"), headers={"content-type": "application/json"})


def _assert_refused(response: httpx.Response, loc: list[Any], message: str) -> None:
    assert response.status_code == 422, response.text
    json.loads(response.text)  # valid JSON, whatever was echoed
    details = response.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in details), details


# Each raw body is what the attacker sent (JSON text as Python's json reads it), the field the
# 422 must name, and a piece of its message.
RAW_BODIES = [
    ('{"query": "a\\u0000b", "tools": [%s]}', ["body", "query"], "NUL"),
    ('{"query": "\\ud800", "tools": [%s]}', ["body", "query"], "lone surrogate"),
    (
        '{"query": "q", "tools": [{"Name": "t", "function": "f", "input": {"k\\udfff": 1}}, %s]}',
        ["body", "tools", 0, "input", "k\ufffd\ufffd\ufffd"],  # the key, its surrogate replaced
        "lone surrogate",
    ),
    ('{"query": "q", "tools": [%s], "temperature": NaN}', ["body", "temperature"], "finite number"),
    ('{"query": "q", "tools": [%s], "timeout_s": Infinity}', ["body", "timeout_s"], "finite number"),
    ('{"query": "q", "tools": [%s], "timeout_s": 1e400}', ["body", "timeout_s"], "finite number"),  # json reads inf
    ('{"query": "q", "tools": [{"Name": "t", "function": "f", "input": {"n": [1, -Infinity]}}]}', ["body", "tools", 0, "input", "n", 1], "finite"),
    (
        '{"query": "q", "tools": [%s], "history": [{"from": "user", "value": "x\\u0000"}]}',
        ["body", "history", 0, "value"],
        "NUL",
    ),
]


@pytest.mark.parametrize(("template", "loc", "message"), RAW_BODIES)
def test_nul_surrogates_and_non_finite_numbers_are_a_422_naming_the_field(
    client: httpx.Client, postgres_url: str, template: str, loc: list[Any], message: str
) -> None:
    before = _task_count(postgres_url)
    body = template % json.dumps(TOOL) if "%s" in template else template
    _assert_refused(_post_raw(client, body), loc, message)
    assert _task_count(postgres_url) == before
    # The connection is still good: the next request on it is answered.
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"query": "q", "tools": [{**TOOL, "function": "f" * 8_193}]}, ["body", "tools", 0, "function"], "at most 8192 characters"),
        (
            {"query": "q", "tools": [TOOL, {**TOOL, "Name": "big", "input": {"p": "x" * 16_400}}]},
            ["body", "tools", 1, "input"],
            "at most 16384",
        ),
        (
            {"query": "q", "tools": [{**TOOL, "input": {"a": [[[[[[[[1]]]]]]]]}}]},
            ["body", "tools", 0, "input"],
            "nested deeper than 8 levels",
        ),
        ({"query": "q" * 32_001, "tools": [TOOL]}, ["body", "query"], "at most 32000 characters"),
        ({"query": "q", "tools": [TOOL], "history": [{"from": "user", "value": "v" * 32_001}]}, ["body", "history", 0, "value"], "at most 32000"),
        ({"query": "q", "tools": [{**TOOL, "Name": f"t{i}"} for i in range(65)]}, ["body", "tools"], "at most 64 items"),
        ({"query": "q", "tools": [TOOL], "history": [{"from": "user", "value": "v"}] * 201}, ["body", "history"], "at most 200 items"),
        ({"query": "q", "tools": [{**TOOL, "Name": "n" * 257}]}, ["body", "tools", 0, "Name"], "at most 256 characters"),
        ({"query": "q", "tools": [{**TOOL, "extra": 1}]}, ["body", "tools", 0, "extra"], "Extra inputs are not permitted"),
        ({"query": "q", "tools": [TOOL], "history": [{"from": "user", "value": "v", "at": 1}]}, ["body", "history", 0, "at"], "Extra inputs"),
    ],
)
def test_field_limits_and_unknown_nested_fields_are_a_422_naming_the_field(
    client: httpx.Client, postgres_url: str, body: dict[str, Any], loc: list[Any], message: str
) -> None:
    before = _task_count(postgres_url)
    _assert_refused(client.post("/v1/tasks", json=body), loc, message)
    assert _task_count(postgres_url) == before


def test_a_body_full_of_bad_values_gets_a_bounded_answer(client: httpx.Client) -> None:
    body = {"query": "q", "tools": [{**TOOL, "input": {f"k{i}": "\u0000" for i in range(5_000)}}]}
    response = client.post("/v1/tasks", json=body)
    assert response.status_code == 422 and len(response.json()["detail"]) == MAX_ERRORS
    assert len(response.content) < MAX_ERRORS * 400


def test_a_request_at_the_limits_is_accepted(client: httpx.Client, postgres_url: str) -> None:
    tool = {"Name": "t", "function": "f" * 8_192, "input": {"p": "x" * (16_384 - len('{"p": ""}'))}}
    accepted = client.post("/v1/tasks", json={"query": "q" * 32_000, "tools": [tool]})
    assert accepted.status_code == 202, accepted.text
    assert client.get(f"/v1/tasks/{accepted.json()['id']}").json()["query"] == "q" * 32_000


@pytest.mark.parametrize(
    ("body", "content_type", "loc", "message"),
    [
        (b'{"query": "q", "tools": [', "application/json", ["body", 25], "JSON decode error: Expecting value"),
        (b'{"query": "\xff"}', "application/json", ["body"], "not valid UTF-8"),
        # Python's json decodes UTF-8-encoded surrogates ("surrogatepass"); the model refuses them.
        (b'{"query": "\xed\xa0\x80", "tools": []}', "application/json", ["body", "query"], "lone surrogate"),
        (b"[" * 100_000, "application/json", ["body"], "nested too deeply"),
        (b'{"query": "q", "max_steps": 1' + b"0" * 5_000 + b"}", "application/json", ["body"], "integer string conversion"),
        (b"query=q", "application/x-www-form-urlencoded", ["body"], "Content-Type must be application/json (not 'application/x-www"),
        (b'{"query": "q", "tools": []}', "text/plain; charset=utf-8", ["body"], "Content-Type must be application/json (not 'text/plain"),
        (b'{"query": "q", "tools": []}', "", ["body"], "Content-Type must be application/json (none was sent)"),
        (b"", "application/json", ["body"], "Field required"),
    ],
)
def test_malformed_bodies_and_wrong_content_types_are_a_clear_422(
    client: httpx.Client, body: bytes, content_type: str, loc: list[Any], message: str
) -> None:
    response = client.post("/v1/tasks", content=body, headers={"content-type": content_type})
    _assert_refused(response, loc, message)


def test_a_20_mb_tool_description_is_refused_unread(client: httpx.Client, postgres_url: str) -> None:
    before = _task_count(postgres_url)
    response = client.post("/v1/tasks", json={"query": "q", "tools": [{**TOOL, "function": "d" * 20_000_000}]})
    assert response.status_code == 413, response.text
    assert _task_count(postgres_url) == before


def test_64_tools_of_512_kb_are_refused_unread(client: httpx.Client, postgres_url: str) -> None:
    before = _task_count(postgres_url)
    tools = [{"Name": f"t{i}", "function": "d" * 524_288, "input": {}} for i in range(64)]
    response = client.post("/v1/tasks", json={"query": "q", "tools": tools})
    assert response.status_code == 413, response.text
    assert _task_count(postgres_url) == before


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _upload(server: ServerThread, *, chunked: bool, total_bytes: int) -> tuple[int, bytes, int, int]:
    """Send a ``total_bytes`` body in 64 KB pieces for as long as the server reads it.

    Returns the status, the response body, how many body bytes were sent before the server
    answered or stopped reading, and the peak of Python memory allocated meanwhile (bytes) by
    this process, where the gateway's server thread runs.
    """
    tracemalloc.start()
    piece = b"x" * 65_536
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total_bytes}"
    sent = 0
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
        sock.settimeout(0.05)
        while sent < total_bytes:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered before reading everything
            except TimeoutError:
                pass
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")  # all of it was read: end the body so the server answers
        sock.settimeout(30)
        status, _, body = _read_response(sock)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return status, body, sent, peak


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_50_mb_body_is_refused_with_413_before_it_is_read(gateway: tuple[ServerThread, CollectingDispatcher], chunked: bool) -> None:
    started = time.monotonic()
    status, body, sent, peak_bytes = _upload(gateway[0], chunked=chunked, total_bytes=50 * 1024 * 1024)
    assert status == 413
    # Streamed past the limit: the gateway's JSON. Announced too large: FastAPI's plain "Content Too Large".
    assert (b"larger than 1048576 bytes (UMI_MAX_BODY_BYTES)" in body) if chunked else (body == b"Content Too Large")
    # The server stopped after about the limit (socket buffers hold a few MB more), not 50 MB.
    assert sent < 12 * 1024 * 1024, sent
    # Reading the body whole would have held 50 MB at once.
    assert peak_bytes < 16 * 1024 * 1024, peak_bytes
    assert time.monotonic() - started < 20


def test_after_a_nan_the_same_connection_answers_the_next_request(gateway: tuple[ServerThread, CollectingDispatcher]) -> None:
    server = gateway[0]
    body = b'{"query": "q", "tools": [{"Name": "t", "function": "f", "input": {"x": NaN}}], "temperature": NaN}'
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, headers, answer = _read_response(sock)
        assert status == 422 and headers.get("connection") != "close"
        assert {tuple(d["loc"]) for d in json.loads(answer)["detail"]} == {("body", "temperature"), ("body", "tools", 0, "input", "x")}
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200


def test_the_ingress_envelope_refuses_the_same_input_naming_the_field() -> None:
    envelope = '{"schema_version": 1, "task": {"query": "q\\u0000", "tools": [{"Name": "t", "function": "f", "input": {"x": NaN}}]}}'
    with pytest.raises(Exception) as refused:
        IngressEnvelope.model_validate_json(envelope)
    locs = {tuple(error["loc"]) for error in refused.value.errors()}  # type: ignore[attr-defined]
    assert locs == {("task", "query"), ("task", "tools", 0, "input", "x")}


def test_the_422_echo_is_bounded_and_always_encodable() -> None:
    errors = [
        {"type": "string_too_long", "loc": ("body", "query"), "msg": "too long", "input": "q" * 100_000},
        {"type": "x", "loc": ("body", "k\ud800"), "msg": "bad \ud800", "input": float("nan"), "ctx": {"error": ValueError("v")}},
        {"type": "missing", "loc": ("body",), "msg": "Field required", "input": {"huge": "x" * 100_000}},
    ] * 40
    items = safe_validation_errors(errors)
    encoded = json.dumps(items, allow_nan=False)
    assert len(items) == 50 and len(encoded) < 50 * 2 * MAX_ECHO_CHARS
    assert items[0]["input"] == "q" * MAX_ECHO_CHARS + "…"
    assert items[1] == {"type": "x", "loc": ["body", "k?"], "msg": "bad ?", "input": "nan", "ctx": {"error": "v"}}
    assert "input" not in items[2]


def test_an_unexpected_error_is_a_500_that_leaks_nothing(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(load_settings(database_url=postgres_url), dispatcher=CollectingDispatcher())

    @app.get("/explode")
    def explode() -> None:
        raise RuntimeError("secret-token-123 in an exception")

    with ServerThread(app) as server:
        response = httpx.get(server.url + "/explode", timeout=30)
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    assert "secret-token-123" in caplog.text and "Traceback" in caplog.text  # logged for the operator only


def test_task_create_stays_usable_from_python() -> None:
    """Recorded data and Python callers pass plain ToolDoc/Turn objects; they are checked the same way."""
    from shared.prompts import Speaker, ToolDoc, Turn

    task = TaskCreate(query="q", tools=[ToolDoc(Name="t", function="f")], history=[Turn(speaker=Speaker.USER, value="hi")])
    assert task.tools[0].rendered() == ToolDoc(Name="t", function="f").rendered()
    with pytest.raises(ValueError, match="at most 8192"):
        TaskCreate(query="q", tools=[ToolDoc(Name="t", function="f" * 9_000)])
