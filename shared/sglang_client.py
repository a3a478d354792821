"""A thread-safe HTTP client for SGLang's native ``/generate`` API (and ``/tokenize``).

One :class:`SGLangClient` talks to one SGLang server (or an SGLang router in
front of several). A worker process creates one client and shares it between
its threads: the connection pool is sized so that many requests can be in
flight at once, which is what lets SGLang batch them.

Requests are pydantic models that serialise to exactly what SGLang's request
contract accepts (only the sampling fields that were set, grammars as strings,
at most one grammar). Every failure is one of this module's exceptions; httpx
errors are translated where they happen (``raise SGLangTimeout(...) from exc``)
and never reach the caller.

Exception hierarchy::

    SGLangError                  anything this client raises about a call (.url, .attempts)
    ├── SGLangTransportError     no HTTP answer: refused, reset, DNS                    retried
    │   └── SGLangTimeout        connect/read/write/pool timeout, or the deadline ran out  retried while time is left
    └── SGLangResponseError      SGLang answered with an error (.status_code, .message)
        ├── SGLangRequestError   4xx: the request is wrong or unauthorised (400, 401, 404)  never retried
        ├── SGLangServerError    5xx (503: queue full), or a router's 408/429              retried
        ├── SGLangAborted        HTTP 200 but finish_reason "abort" or an error object
        │                        (e.g. a grammar that fails to compile)                   never retried
        └── SGLangProtocolError  an answer that is not SGLang's protocol (non-JSON 200)    never retried

An error's text is what the server said, with every secret the client knows
masked (``redactor``; the API key at least) and then cut to
:data:`~shared.redaction.ERROR_TEXT_LIMIT` characters, when the exception is
built: a server that echoes the ``Authorization`` header in a megabyte-long
error body leaks neither the key nor the megabytes into logs, rows or answers.

Retries follow :class:`shared.retry.RetryPolicy` (``stamina``): exponential
backoff with jitter, at most ``max_retries`` times and never past the caller's
``deadline`` (a ``time.monotonic()`` value). A retry sends the request id as
``<rid>-retry<n>`` so it cannot collide with the abandoned attempt that SGLang
may still be aborting ("Duplicate request ID"). The number of HTTP attempts is
recorded on the result and on every exception (``.attempts``).

Usage::

    with SGLangClient("http://127.0.0.1:30001", api_key=None, max_retries=4) as client:
        request = GenerateRequest(
            text=prompt,
            sampling_params=SamplingParams(max_new_tokens=512, temperature=0.5, stop=["</s>"]),
            rid="task-1-step-3",
        )
        try:
            result = client.generate(request, deadline=time.monotonic() + 120)
        except SGLangRequestError as exc:   # our fault: fix the request, do not retry
            ...
        except SGLangError as exc:          # SGLang unavailable or overloaded (retries spent)
            ...
        result.text, result.finish_reason, result.completion_tokens, result.cached_tokens, result.attempts
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.redaction import Redactor, bound_text
from shared.retry import RetryPolicy

__all__ = [
    "DEFAULT_TIMEOUT",
    "GRAMMAR_FIELDS",
    "FinishReason",
    "GenerateRequest",
    "GenerateResult",
    "LLMTimeout",
    "SGLangAborted",
    "SGLangClient",
    "SGLangError",
    "SGLangProtocolError",
    "SGLangRequestError",
    "SGLangResponseError",
    "TokenizeResult",
    "SGLangServerError",
    "SGLangTimeout",
    "SGLangTransportError",
    "SamplingParams",
    "sglang_error_message",
]

logger = logging.getLogger(__name__)

#: The four structured-output parameters; SGLang accepts only one per request.
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
#: 4xx statuses that mean "busy, try again" (SGLang router: queue timeout, queue full).
RETRYABLE_4XX = frozenset({408, 429})
_MAX_STOP_STRINGS = 32
#: Masks secrets in error text; the client passes its own (see :class:`SGLangClient`).
Redact = Callable[[str], str]


def _unchanged(text: str) -> str:
    return text


# --------------------------------------------------------------------------- exceptions


class SGLangError(Exception):
    """Base class of every error this client raises; ``url`` is the endpoint, ``attempts`` the HTTP tries.

    The message is masked with ``redact`` and then bounded, here and only here, so no
    caller can store, return or log a secret the server echoed or an unbounded body.
    """

    def __init__(self, message: str, *, url: str, attempts: int = 1, redact: Redact = _unchanged) -> None:
        super().__init__(bound_text(redact(message)))
        self.url = url
        self.attempts = attempts


class SGLangTransportError(SGLangError):
    """No usable HTTP answer: connection refused or reset, DNS failure."""


class SGLangTimeout(SGLangTransportError):
    """A connect/read/write/pool timeout, or the caller's deadline ran out."""


class SGLangResponseError(SGLangError):
    """SGLang answered, with an error. ``message`` is SGLang's own text (masked and bounded)."""

    def __init__(
        self, status_code: int, message: str, *, url: str, attempts: int = 1, redact: Redact = _unchanged
    ) -> None:
        super().__init__(f"SGLang at {url} answered {status_code}: {message}", url=url, attempts=attempts, redact=redact)
        self.status_code = status_code
        self.message = bound_text(redact(message))


class SGLangRequestError(SGLangResponseError):
    """A 4xx answer (contract violation, bad parameter, context too long, 401 unauthorised); never retried."""


class SGLangServerError(SGLangResponseError):
    """A 5xx answer (503: the request queue is full) or a router's 408/429; retried."""


class SGLangAborted(SGLangResponseError):
    """SGLang aborted the request: HTTP 200 with finish_reason ``abort``, or an error object.

    ``status_code`` is the abort's own status (400 for a grammar that fails to
    compile) when SGLang gives one, else the HTTP status.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        url: str,
        attempts: int = 1,
        redact: Redact = _unchanged,
        finish_reason: FinishReason | None = None,
    ) -> None:
        super().__init__(status_code, message, url=url, attempts=attempts, redact=redact)
        self.finish_reason = finish_reason


class SGLangProtocolError(SGLangResponseError):
    """An answer that does not follow SGLang's protocol (non-JSON 200, a batch list, an odd status)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class LLMTimeout:
    """Per-attempt timeouts in seconds (``None`` disables one; a deadline still bounds it).

    ``read`` bounds the wait for each chunk of the response; a non-streaming
    ``/generate`` sends nothing until it is done, so it bounds the generation.

    Examples::

        LLMTimeout()                          # 5 s connect, 120 s read, 30 s write and pool
        LLMTimeout(connect=2.0, read=300.0)   # long generations on a slow GPU
    """

    connect: float | None = 5.0
    read: float | None = 120.0
    write: float | None = 30.0
    pool: float | None = 30.0

    def capped(self, remaining: float | None) -> httpx.Timeout:
        """The httpx timeout for one attempt, each limit shrunk to the ``remaining`` seconds."""

        def cap(limit: float | None) -> float | None:
            if remaining is None:
                return limit
            return remaining if limit is None else min(limit, remaining)

        return httpx.Timeout(connect=cap(self.connect), read=cap(self.read), write=cap(self.write), pool=cap(self.pool))


DEFAULT_TIMEOUT = LLMTimeout()


# --------------------------------------------------------------------------- request / response models


class SamplingParams(BaseModel):
    """SGLang ``sampling_params``; only the fields that are set are sent (SGLang's defaults apply otherwise).

    Ranges mirror SGLang's ``SamplingParams.verify()`` so a bad value fails here,
    not as a 400 from the server. ``json_schema`` may be given as a dict; it is
    sent as a JSON string, as SGLang's contract requires.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(default=None, ge=0)
    min_new_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    stop: list[str] | None = Field(default=None, max_length=_MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stream_interval: int | None = Field(default=None, ge=1)
    sampling_seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_as_string(cls, value: object) -> object:
        return json.dumps(value) if isinstance(value, Mapping) else value

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (whole vocabulary) or at least 1")
        return value

    @model_validator(mode="after")
    def _one_grammar_at_most(self) -> SamplingParams:
        chosen = self.grammar_fields()
        if len(chosen) > 1:
            raise ValueError(
                "Only one of json_schema, regex, ebnf, or structural_tag can be set "
                f"(SGLang rejects the request otherwise); got {', '.join(chosen)}"
            )
        return self

    def grammar_fields(self) -> list[str]:
        """The structured-output fields that are set (SGLang treats an empty string as unset)."""
        return [name for name in GRAMMAR_FIELDS if getattr(self, name)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``sampling_params`` object: set fields only."""
        return self.model_dump(exclude_none=True)


class GenerateRequest(BaseModel):
    """One ``/generate`` request for a single prompt: raw text (no chat template) or token ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None
    #: Token ids instead of ``text`` (a prompt cut to the context window, see ``shared.llm``).
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    #: Request id, echoed by SGLang as ``meta_info.id``; generated by the server when omitted.
    rid: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids cannot be empty")
        return self

    def to_body(self) -> dict[str, Any]:
        """The JSON body SGLang receives (one non-streaming answer)."""
        prompt = {"text": self.text} if self.text is not None else {"input_ids": self.input_ids}
        body: dict[str, Any] = {
            **prompt,
            "sampling_params": self.sampling_params.to_dict(),
            "stream": False,
        }
        if self.rid is not None:
            body["rid"] = self.rid
        return body


class TokenizeResult(BaseModel):
    """``/tokenize`` answer for one prompt."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tokens: list[int]
    count: int
    max_model_len: int


class ServerInfo(BaseModel):
    """The parts of ``/server_info`` the product reads (the server's resolved arguments)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: ``--grammar-backend``: ``xgrammar`` (SGLang's default), ``llguidance``, ``outlines`` or ``none``.
    grammar_backend: str | None = None
    #: ``--allow-auto-truncate``: the server cuts an over-long prompt itself (keeping its start) instead of
    #: answering 400. Only a server that says ``false`` is sent a long prompt before it is tokenized.
    allow_auto_truncate: bool | None = None
    version: str | None = None


class FinishReason(BaseModel):
    """``meta_info.finish_reason``: why generation ended.

    ``stop``: ``matched`` is the EOS token id, the stop string or the matched
    regex text; ``length``: ``length`` tokens were generated; ``abort``:
    ``message``, ``status_code`` and ``err_type`` explain it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None
    err_type: str | None = None


class GenerateResult(BaseModel):
    """A finished generation."""

    model_config = ConfigDict(frozen=True)

    text: str
    output_ids: list[int] = Field(default_factory=list)
    #: ``meta_info.id``: the request id SGLang used (``<rid>-retry<n>`` after a retry).
    rid: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    #: Server-side end-to-end latency in seconds (final output only).
    e2e_latency: float | None = None
    #: The whole ``meta_info`` object, for fields not modelled here.
    meta_info: dict[str, Any] = Field(default_factory=dict)
    #: HTTP attempts this result took (1 without retries).
    attempts: int = 1
    #: Client-side seconds from the first attempt to the parsed answer.
    elapsed_s: float = 0.0

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, attempts: int = 1, elapsed_s: float = 0.0) -> GenerateResult:
        """Parse one SGLang ``/generate`` response object (raises ``ValidationError`` when malformed)."""
        meta = payload.get("meta_info") or {}
        return cls(
            text=payload.get("text") or "",
            output_ids=payload.get("output_ids") or [],
            rid=meta.get("id") or "",
            finish_reason=meta.get("finish_reason"),
            prompt_tokens=meta.get("prompt_tokens") or 0,
            completion_tokens=meta.get("completion_tokens") or 0,
            cached_tokens=meta.get("cached_tokens") or 0,
            e2e_latency=meta.get("e2e_latency"),
            meta_info=dict(meta),
            attempts=attempts,
            elapsed_s=elapsed_s,
        )


# --------------------------------------------------------------------------- response decoding


def _decode_body(response: httpx.Response) -> Any:
    """The parsed JSON body, or the raw text when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return response.text


def _or_empty(text: str) -> str:
    return text.strip() or "(empty body)"


def sglang_error_message(body: Any) -> str | None:
    """SGLang's message from any of its error shapes, or ``None`` when ``body`` is not an error.

    Shapes: ``{"error": "<text>"}`` (contract gate, 401), ``{"error": {"message": ...}}``
    (validation, scheduler aborts) and ``{"object": "error", "message": ...}`` (OpenAI
    style: request parsing, 503 queue full).
    """
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, Mapping) and error.get("message") is not None:
        return str(error["message"])
    if error is not None:
        return json.dumps(error)
    if body.get("object") == "error":
        return str(body.get("message"))
    return None


def _loose_message(body: Any) -> str | None:
    """A message from error bodies that are not SGLang's own (a proxy's ``message``, FastAPI's ``detail``)."""
    if isinstance(body, Mapping):
        for key in ("message", "detail"):
            if body.get(key) is not None:
                return str(body[key])
    return None


def _response_error(response: httpx.Response, url: str, redact: Redact) -> SGLangResponseError:
    """The exception for a non-2xx answer."""
    body = _decode_body(response)
    message = sglang_error_message(body) or _loose_message(body) or _or_empty(response.text)
    status = response.status_code
    if status >= 500 or status in RETRYABLE_4XX:
        return SGLangServerError(status, message, url=url, redact=redact)
    if 400 <= status < 500:
        return SGLangRequestError(status, message, url=url, redact=redact)
    return SGLangProtocolError(status, message, url=url, redact=redact)


def _abort_error(payload: Mapping[str, Any], url: str, redact: Redact) -> SGLangAborted | None:
    """An :class:`SGLangAborted` when a 200 payload is an abort or an error object, else ``None``."""
    message = sglang_error_message(payload)
    if message is not None:
        error = payload.get("error")
        code = error.get("code") if isinstance(error, Mapping) else None
        return SGLangAborted(code if isinstance(code, int) and code else 200, message, url=url, redact=redact)
    meta = payload.get("meta_info")
    reason = meta.get("finish_reason") if isinstance(meta, Mapping) else None
    if isinstance(reason, Mapping) and reason.get("type") == "abort":
        finish = FinishReason.model_validate(reason)
        return SGLangAborted(
            finish.status_code or 200, finish.message or "request aborted", url=url, redact=redact, finish_reason=finish
        )
    return None


def _parse_generate(payload: Any, url: str, redact: Redact, *, attempts: int, elapsed_s: float) -> GenerateResult:
    """A :class:`GenerateResult` from a 200 body, raising for aborts and malformed bodies."""
    if not isinstance(payload, Mapping):
        kind = "a list (batch answer)" if isinstance(payload, list) else "not a JSON object"
        raise SGLangProtocolError(200, f"/generate answer is {kind}: {_or_empty(str(payload))}", url=url, redact=redact)
    abort = _abort_error(payload, url, redact)
    if abort is not None:
        raise abort
    try:
        return GenerateResult.from_payload(payload, attempts=attempts, elapsed_s=elapsed_s)
    except ValidationError as exc:
        raise SGLangProtocolError(200, f"malformed /generate answer: {exc}", url=url, redact=redact) from exc


def _is_retryable(exc: Exception) -> bool:
    return isinstance(exc, SGLangTransportError | SGLangServerError)


def _retry_rid(body: dict[str, Any] | None, attempt: int) -> dict[str, Any] | None:
    """The body for ``attempt``: retries get ``<rid>-retry<n>`` so they never clash with an aborting rid."""
    if body is None or attempt == 1 or "rid" not in body:
        return body
    return {**body, "rid": f"{body['rid']}-retry{attempt - 1}"}


# --------------------------------------------------------------------------- client


class SGLangClient:
    """A client for one SGLang server (or router), safe to share between threads.

    **Parameters:**

    * ``base_url`` - e.g. ``http://127.0.0.1:30001`` (no trailing path).
    * ``api_key`` - sent as ``Authorization: Bearer`` (servers started with ``--api-key``).
    * ``timeout`` - per-attempt :class:`LLMTimeout`.
    * ``max_retries`` - retries after the first attempt, on transport errors and 5xx/408/429.
    * ``backoff_s`` - first backoff; doubles each retry (capped at ``max_backoff_s``), plus jitter.
    * ``max_connections`` - pool size; at least the number of threads that call concurrently.
    * ``redactor`` - masks secrets in error text (e.g. :func:`shared.redaction.secrets_redactor`);
      the API key is always masked.
    * ``transport`` - an httpx transport to use instead of the network (tests).
    """

    #: A single SGLang server serves ``/tokenize`` (a router does not; see :mod:`shared.replicas`).
    serves_tokenize = True

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: LLMTimeout = DEFAULT_TIMEOUT,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_connections: int = 64,
        redactor: Redactor | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"SGLang base_url must be http(s)://host:port, got {base_url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.timeout = timeout
        own_key = Redactor([api_key])
        self._redact: Redact = own_key if redactor is None else (lambda text: own_key(redactor(text)))
        headers = {"Accept": "application/json", "User-Agent": "alpha-umi-queues sglang-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=self.timeout.capped(None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        #: Each endpoint's URL, parsed once: httpx parses a string URL on every request, IP address
        #: included, which cost more CPU than the rest of the request at zero model latency.
        self._parsed_urls: dict[str, httpx.URL] = {}

    @property
    def max_retries(self) -> int:
        return self.retry.max_retries

    def __repr__(self) -> str:
        return f"SGLangClient({self.base_url!r}, max_retries={self.max_retries})"

    # -- public API ---------------------------------------------------------------

    def generate(
        self, request: GenerateRequest, *, deadline: float | None = None, headers: Mapping[str, str] | None = None
    ) -> GenerateResult:
        """Run one generation, retrying transient failures.

        ``deadline`` is a ``time.monotonic()`` value bounding the whole call,
        retries and backoff included; each attempt's timeouts shrink to the time
        left. ``headers`` are sent with this request only (an SGLang router's
        ``X-SMG-Routing-Key``). Raises an :class:`SGLangError` subclass (with ``.attempts``).
        """
        started = time.monotonic()
        response, attempts = self._call("/generate", request.to_body(), deadline, headers=headers)
        url = self.base_url + "/generate"
        try:
            return _parse_generate(
                _decode_body(response), url, self._redact, attempts=attempts, elapsed_s=time.monotonic() - started
            )
        except SGLangError as exc:
            exc.attempts = attempts
            raise

    def server_info(self, *, deadline: float | None = None) -> ServerInfo:
        """``GET /server_info`` (falling back to ``/get_server_info``, which routers serve too); not retried."""
        remaining = None if deadline is None else deadline - time.monotonic()
        url = self.base_url + "/server_info"
        try:
            response = self._attempt(url, None, remaining, method="GET")
        except SGLangRequestError as exc:
            if exc.status_code != 404:
                raise
            url = self.base_url + "/get_server_info"
            response = self._attempt(url, None, remaining, method="GET")
        try:
            return ServerInfo.model_validate(_decode_body(response))
        except ValidationError as exc:
            message = f"unexpected server info: {_or_empty(response.text)}"
            raise SGLangProtocolError(response.status_code, message, url=url, redact=self._redact) from exc

    def health(self, *, timeout_s: float = 2.0) -> bool:
        """``GET /health`` answered 2xx within ``timeout_s`` (SGLang: the server can generate); never raises."""
        try:
            self._attempt(self.base_url + "/health", None, timeout_s, method="GET")
        except SGLangError:
            return False
        return True

    def tokenize(
        self, text: str, *, deadline: float | None = None, headers: Mapping[str, str] | None = None
    ) -> TokenizeResult:
        """``POST /tokenize``: the prompt's token ids as the server's tokenizer sees them."""
        response, _ = self._call("/tokenize", {"prompt": text}, deadline, headers=headers)
        try:
            return TokenizeResult.model_validate(_decode_body(response))
        except ValidationError as exc:
            message = f"unexpected /tokenize answer: {_or_empty(response.text)}"
            raise SGLangProtocolError(
                response.status_code, message, url=self.base_url + "/tokenize", redact=self._redact
            ) from exc

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> SGLangClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- retries --------------------------------------------------------------------

    def _call(
        self, path: str, body: dict[str, Any], deadline: float | None, *, headers: Mapping[str, str] | None = None
    ) -> tuple[httpx.Response, int]:
        """POST until a 2xx answer, retrying transient failures; returns the response and the attempt count."""
        url = self.base_url + path
        if deadline is not None and deadline <= time.monotonic():
            raise SGLangTimeout(f"SGLang at {url}: deadline passed before the call", url=url, attempts=0)

        def attempt(number: int) -> tuple[httpx.Response, int]:
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                return self._attempt(url, _retry_rid(body, number), remaining, extra_headers=headers), number
            except SGLangError as exc:
                exc.attempts = number
                raise

        def log_retry(exc: Exception, retry: int, delay: float) -> None:
            logger.warning(
                "SGLang POST %s failed (attempt %d of %d): %s; retrying in %.2fs",
                url, retry, self.max_retries + 1, exc, delay,
            )  # fmt: skip

        return self.retry.call(attempt, transient=_is_retryable, deadline=deadline, on_retry=log_retry)

    def _attempt(
        self,
        url: str,
        body: dict[str, Any] | None,
        remaining: float | None,
        *,
        method: str = "POST",
        extra_headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP exchange; a non-2xx answer is raised as an :class:`SGLangResponseError`."""
        content = None if body is None else json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        headers = {"Content-Type": "application/json"} if content is not None else {}
        headers.update(extra_headers or {})
        try:
            parsed = self._parsed_urls.get(url)
            if parsed is None:
                parsed = self._parsed_urls[url] = httpx.URL(url)
            response = self._http.request(
                method, parsed, content=content, headers=headers or None, timeout=self.timeout.capped(remaining)
            )
        except httpx.TimeoutException as exc:
            message = f"SGLang at {url}: {type(exc).__name__} ({exc or 'timed out'})"
            raise SGLangTimeout(message, url=url, redact=self._redact) from exc
        except httpx.RequestError as exc:
            message = f"SGLang at {url}: {type(exc).__name__} ({exc})"
            raise SGLangTransportError(message, url=url, redact=self._redact) from exc
        if response.is_success:
            return response
        raise _response_error(response, url, self._redact)
