"""The SGLang **simulator**'s HTTP server: SGLang's routes, request checks and error shapes.

:func:`create_app` builds a FastAPI app that speaks SGLang 0.5.23's HTTP
protocol — ``/generate`` (POST/PUT, streaming, batches), ``/health``,
``/health_generate``, ``/ready``, ``/model_info``, ``/server_info`` (and their
``/get_*`` aliases), ``/v1/models``, ``/v1/completions``, ``/flush_cache``,
``/abort_request`` and ``/metrics`` — answering from recorded α-UMi data rather
than a model. It is always labelled a simulator (``model_path``
``simulator/...``, ``"simulator": true`` in the info routes, version
``"0.5.23 (simulator)"``). :func:`run_simulator` serves it with uvicorn.

Usage::

    from services.simulator import SimulatorConfig, create_app, run_simulator
    run_simulator(SimulatorConfig(role="planner", port=30001))
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.simulator.config import SIMULATED_SGLANG_VERSION, SimulatorConfig
from services.simulator.engine import PreparedItem, SimulatorEngine
from services.simulator.errors import (
    RequestValueError,
    SchedulerAbort,
    SimulatorHTTPError,
    bad_request_body,
    contract_error_body,
    http_exception_body,
    openai_error_body,
    value_error_body,
)
from services.simulator.openai_api import CompletionRequest, completion_chunk, completion_response, to_generate_body
from services.simulator.protocol import GenerateRequest, normalize_generate
from shared.sglang_contract import generate_contract_error

__all__ = ["create_app", "run_simulator"]

log = logging.getLogger(__name__)

_OPEN_PATH_PREFIXES = ("/health", "/ready", "/metrics")
_FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
_SSE_DONE = b"data: [DONE]\n\n"


# One encoder each, made once: json.dumps with options builds a new JSONEncoder on every call.
_SSE_ENCODER = json.JSONEncoder(ensure_ascii=False)
#: The options of Starlette's ``JSONResponse.render``.
_BODY_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _sse(payload: Any) -> bytes:
    return b"data: " + _SSE_ENCODER.encode(payload).encode("utf-8") + b"\n\n"


class _JSONResponse(JSONResponse):
    """Starlette's JSONResponse, byte for byte, rendered with the shared encoder."""

    def render(self, content: Any) -> bytes:
        return _BODY_ENCODER.encode(content).encode("utf-8")


def _json(status_code: int, body: Any) -> JSONResponse:
    return _JSONResponse(status_code=status_code, content=body)


# --- auth ------------------------------------------------------------------------------------


class ApiKeyMiddleware:
    """SGLang's ``--api-key`` check: ``Authorization: Bearer <key>`` on all but health/ready/metrics."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_OPEN_PATH_PREFIXES) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _json(401, {"error": "Unauthorized"})(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), self.api_key.encode())


# --- request pipeline ----------------------------------------------------------------------------


async def _read_json_body(request: Request) -> Any:
    """The parsed body, or :class:`SimulatorHTTPError` shaped like FastAPI's validation failure."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        error = {"type": "json_invalid", "loc": ("body", getattr(exc, "pos", 0)), "msg": "JSON decode error",
                 "input": {}, "ctx": {"error": getattr(exc, "msg", str(exc))}}
        raise SimulatorHTTPError(400, bad_request_body(f"1 validation error:\n  {error} [{error}]")) from exc


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        error = {"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary or "
                 "object to extract fields from", "input": body}
        raise SimulatorHTTPError(400, bad_request_body(f"1 validation error:\n  {error} [{error}]"))
    return body


class GenerateService:
    """Runs normalized ``/generate`` requests on the engine, whole or streamed."""

    def __init__(self, engine: SimulatorEngine) -> None:
        self.engine = engine

    def prepare(self, body: dict[str, Any]) -> tuple[GenerateRequest, list[PreparedItem]]:
        """Normalize and validate; raises :class:`RequestValueError`."""
        request = normalize_generate(body)
        return request, self.engine.prepare(request)

    async def complete(self, prepared: list[PreparedItem]) -> list[dict[str, Any]]:
        """Final outputs in input order; raises :class:`SchedulerAbort` if any prompt is refused."""
        tasks = [asyncio.ensure_future(self._final(item)) for item in prepared]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            self.engine.release(prepared)

    async def _final(self, prepared: PreparedItem) -> dict[str, Any]:
        final: dict[str, Any] = {}
        async for final in self.engine.run(prepared, stream=False):
            pass
        return final

    async def stream(self, prepared: list[PreparedItem], *, batch: bool) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """``(index, output)`` as they are produced; a refused prompt yields its abort chunk."""
        queue: asyncio.Queue[tuple[int, dict[str, Any]] | None] = asyncio.Queue()

        async def pump(item: PreparedItem) -> None:
            try:
                async for payload in self.engine.run(item, stream=True):
                    await queue.put((item.item.index, payload))
            except SchedulerAbort as abort:
                await queue.put((item.item.index, self.engine.abort_payload(item, abort)))
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(item)) for item in prepared]
        try:
            remaining = len(tasks)
            while remaining:
                entry = await queue.get()
                if entry is None:
                    remaining -= 1
                    continue
                index, payload = entry
                if batch:
                    payload["index"] = index
                yield index, payload
        finally:
            for task in tasks:
                task.cancel()
            self.engine.release(prepared)


# --- routes ------------------------------------------------------------------------------------


def _register_generate(app: FastAPI, service: GenerateService) -> None:
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        """SGLang's native generation route."""
        body = _require_object(await _read_json_body(request))
        contract_error = generate_contract_error(body)
        if contract_error is not None:
            return _json(400, contract_error_body(contract_error))
        if body.get("stream") is True:
            return StreamingResponse(_generate_sse(service, body), media_type="text/event-stream")
        try:
            normalized, prepared = service.prepare(body)
        except RequestValueError as exc:
            return _json(400, value_error_body(str(exc)))
        try:
            outputs = await service.complete(prepared)
        except SchedulerAbort as abort:
            error = abort.http_error()
            return _json(error.status_code, error.body)
        return _json(200, outputs[0] if normalized.is_single else outputs)


async def _generate_sse(service: GenerateService, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """SGLang's stream: validation errors arrive in-band (the 200 headers are already sent)."""
    try:
        normalized, prepared = service.prepare(body)
    except RequestValueError as exc:
        yield _sse({"error": {"message": str(exc), "type": "invalid_request_error", "code": 400, "retryable": False}})
        yield _SSE_DONE
        return
    async for _, payload in service.stream(prepared, batch=not normalized.is_single):
        yield _sse(payload)
    yield _SSE_DONE


def _register_openai(app: FastAPI, service: GenerateService, config: SimulatorConfig) -> None:
    model_name = config.resolved_served_model_name

    def card(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "sglang-simulator",
                "root": model, "parent": None, "max_model_len": config.context_length}

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        """The one model this simulator serves."""
        return _json(200, {"object": "list", "data": [card(model_name)]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> JSONResponse:
        """The model card, or 404 ``model_not_found``."""
        if model != model_name:
            return _json(404, {"error": {"message": f"The model '{model}' does not exist",
                                         "type": "invalid_request_error", "param": "model",
                                         "code": "model_not_found"}})
        return _json(200, card(model))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI text completions over the simulator's generate engine."""
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return _json(400, bad_request_body("Unsupported Media Type: Only 'application/json' is allowed"))
        try:
            completion = CompletionRequest.model_validate(_require_object(await _read_json_body(request)))
        except ValidationError as exc:
            return _json(400, bad_request_body(str(exc)))
        generate_body = to_generate_body(completion)
        created = int(time.time())
        if completion.stream:
            return StreamingResponse(_completion_sse(service, generate_body, completion, created),
                                     media_type="text/event-stream")
        try:
            _, prepared = service.prepare(generate_body)
        except RequestValueError as exc:
            return _json(400, openai_error_body(str(exc)))
        try:
            outputs = await service.complete(prepared)
        except SchedulerAbort as abort:
            err_type = abort.err_type or "ServiceUnavailableError"
            return _json(abort.status_code, openai_error_body(abort.message, err_type, abort.status_code))
        return _json(200, completion_response(completion, outputs, created))


async def _completion_sse(
    service: GenerateService, body: dict[str, Any], completion: CompletionRequest, created: int
) -> AsyncIterator[bytes]:
    try:
        _, prepared = service.prepare(body)
    except RequestValueError as exc:
        yield _sse({"error": openai_error_body(str(exc))})
        yield _SSE_DONE
        return
    sent: dict[int, int] = {}
    async for index, payload in service.stream(prepared, batch=True):
        yield _sse(completion_chunk(completion, payload, index, sent.get(index, 0), created))
        sent[index] = len(payload["text"])
    yield _SSE_DONE


def _register_info(app: FastAPI, engine: SimulatorEngine, started: float) -> None:
    config = engine.config

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        """Always healthy once serving (a real server runs a 1-token generation here)."""
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        """Ready as soon as the app serves."""
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> JSONResponse:
        """SGLang's model info, marked as a simulator."""
        return _json(200, {
            "model_path": config.resolved_model_path,
            "served_model_name": config.resolved_served_model_name,
            "tokenizer_path": "simulator/pseudo-tokenizer",
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "load_format": None,
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "simulator": True,
        })

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> JSONResponse:
        """The resolved configuration and live state, marked as a simulator."""
        return _json(200, _server_info(engine, started))


def _server_info(engine: SimulatorEngine, started: float) -> dict[str, Any]:
    config = engine.config
    return {
        "model_path": config.resolved_model_path,
        "served_model_name": config.resolved_served_model_name,
        "host": config.host,
        "port": config.port,
        "context_length": config.context_length,
        "max_running_requests": config.max_running_requests,
        "max_queued_requests": config.max_queued_requests,
        "max_total_num_tokens": config.prefix_cache_tokens,
        "disable_radix_cache": config.prefix_cache_tokens == 0,
        "stream_interval": config.stream_interval,
        "api_key": "<redacted>" if config.api_key else None,
        "grammar_backend": config.grammar_backend,
        "allow_auto_truncate": False,  # the simulator answers 400 to an over-long prompt, as SGLang's default
        "latency": config.latency.model_dump(),
        "simulator": {
            "role": config.role.value if config.role else None,
            "data_files": [str(path) for path in config.data_files],
            "recorded_prompts": engine.index.count_by_role(),
        },
        "internal_states": [{
            "num_running_reqs": engine.admission.running,
            "num_queue_reqs": engine.admission.waiting,
            "cache_tokens": engine.cache.size,
            "evicted_tokens": engine.cache.evicted_tokens,
        }],
        "startup_time": started,
        "version": f"{SIMULATED_SGLANG_VERSION} (simulator)",
        "frontend": "python",
    }


def _register_control(app: FastAPI, engine: SimulatorEngine) -> None:
    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = 0.0) -> Response:
        """Clear the prefix cache when idle (``?timeout=s`` waits for idleness)."""
        if timeout < 0:
            return _json(400, bad_request_body("timeout must be >= 0"))
        if await engine.flush_cache(timeout):
            return Response(_FLUSHED, status_code=200)
        message = (
            "Flush cache failed.\nCache not flushed because there are pending requests. "
            f"#queue-req: {engine.admission.waiting}, #running-req: {engine.admission.running}\n"
        )
        return Response(message, status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        """Abort one request by ``rid``, or all with ``abort_all``."""
        body = _require_object(await _read_json_body(request))
        engine.abort(str(body.get("rid") or ""), abort_all=bool(body.get("abort_all")))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition with SGLang's metric names."""
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SimulatorHTTPError)
    async def simulator_error(_: Request, exc: SimulatorHTTPError) -> JSONResponse:
        return _json(exc.status_code, exc.body)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(400, bad_request_body(f"{exc} {exc.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, http_exception_body(exc.status_code, str(exc.detail)))


def _register_tokenizer(app: FastAPI, engine: SimulatorEngine, config: SimulatorConfig) -> None:
    """``/tokenize`` and ``/detokenize`` (SGLang's OpenAI-style shapes) with the pseudo-tokenizer."""

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        body = _require_object(await _read_json_body(request))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            tokens: Any = engine.tokenizer.encode(prompt)
            count: Any = len(tokens)
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            tokens = [engine.tokenizer.encode(p) for p in prompt]
            count = [len(t) for t in tokens]
        else:
            return _json(400, openai_error_body("prompt must be a string or a list of strings"))
        return _json(200, {"tokens": tokens, "count": count, "max_model_len": config.context_length})

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> Response:
        body = _require_object(await _read_json_body(request))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return _json(400, openai_error_body("tokens must be a list of integers"))
        return _json(200, {"text": engine.tokenizer.decode(tokens)})


def create_app(config: SimulatorConfig, *, engine: SimulatorEngine | None = None) -> FastAPI:
    """The simulated SGLang server for ``config`` (an existing ``engine`` may be shared)."""
    engine = engine or SimulatorEngine(config)
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info(
            "SGLang simulator (no model; replaying %d recorded prompts) serving %s on %s:%s",
            len(engine.index), config.resolved_served_model_name, config.host, config.port,
        )
        log.info("The server is fired up and ready to roll! (simulator)")
        yield

    app = FastAPI(title="SGLang simulator", version=f"{SIMULATED_SGLANG_VERSION} (simulator)", lifespan=lifespan)
    app.state.engine = engine
    service = GenerateService(engine)
    _register_error_handlers(app)
    _register_info(app, engine, started)
    _register_generate(app, service)
    _register_openai(app, service, config)
    _register_control(app, engine)
    _register_tokenizer(app, engine, config)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app


def run_simulator(config: SimulatorConfig, *, log_level: str = "info") -> None:
    """Serve the simulator on ``config.host:config.port`` until interrupted (blocking)."""
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level)

