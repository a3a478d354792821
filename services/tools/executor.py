"""The tool executor: validate one α-UMi tool call, route it to a backend, return the observation.

Rules (ToolBench's, github.com/OpenBMB/ToolBench):

1. The action must be exactly one of the task's tool Names, otherwise the observation is
   ``{"error": "No such function name: <name>", "response": ""}``.
2. The Action Input must be a JSON object (empty means ``{}``), otherwise
   ``{"error": "Tool input parse error...\\n", "response": ""}``.
3. The first backend that can serve the Name runs the call, bounded by the timeout.
   Transient failures (timeouts, connection errors, 5xx, 429) are retried by the shared
   :class:`~shared.retry.RetryPolicy` (exponential backoff with jitter, ``Retry-After``
   honoured, never past the task's deadline) up to ``max_retries`` times; then, like every
   other failure, they become an error observation. The task always continues.
4. Configured secrets are masked (``***``) in the observation, the error and every log
   record; the observation is then truncated to 1024 characters plus ``...`` and the error
   to :data:`~shared.redaction.ERROR_TEXT_LIMIT`.

Usage::

    executor = build_executor(get_settings())
    outcome = executor.execute("list_for_flowers", "{}", tools)
    outcome.observation, outcome.ok, outcome.backend
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.tools.base import ToolBackend
from services.tools.catalog import ToolCatalog
from services.tools.errors import (
    BackendTimeout,
    NoBackendError,
    ToolCallError,
    TransientBackendError,
    UnknownToolError,
)
from services.tools.http_api import HttpBackend
from services.tools.mirror import MirrorBackend
from services.tools.models import CallContext, ToolOutcome, parse_action_input
from services.tools.netguard import NetworkGuard
from services.tools.registry import PythonBackend, ToolRegistry, default_registry
from services.tools.virtual import VirtualBackend
from shared.prompts import ToolDoc, Turn, truncate_observation
from shared.redaction import Redactor, bound_text, install_log_redaction, log_redacted, secrets_redactor
from shared.retry import RetryPolicy
from shared.settings import Settings

__all__ = ["RetryPolicy", "ToolExecutor", "build_executor"]

logger = logging.getLogger("services.tools")


class _Attempts(BaseModel):
    """How a backend call ended: an observation or an error, after some attempts."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    observation: str | None = None
    error: ToolCallError | None = None
    attempts: int


class ToolExecutor:
    """Runs α-UMi tool calls against an ordered list of backends."""

    def __init__(
        self,
        backends: Sequence[ToolBackend],
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._backends = tuple(backends)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._redact = redactor or Redactor()
        install_log_redaction(self._redact)

    @property
    def backends(self) -> tuple[ToolBackend, ...]:
        return self._backends

    def backend_for(self, tool_name: str) -> ToolBackend | None:
        """The first backend that can serve ``tool_name``."""
        return next((b for b in self._backends if b.can_serve(tool_name)), None)

    def execute(
        self,
        action: str,
        action_input: str,
        tools: Sequence[ToolDoc],
        *,
        history: Sequence[Turn] = (),
        deadline: float | None = None,
        idempotency_key: str | None = None,
    ) -> ToolOutcome:
        """Run one call and return its (truncated, redacted) observation; never raises for a bad call.

        ``history`` (the task's conversation so far) is optional; the mirror backend uses
        it to replay repeated identical calls faithfully. ``deadline`` (``time.monotonic()``)
        bounds every attempt and every wait between attempts.
        ``idempotency_key`` is sent by the HTTP backends with every attempt of the call.
        """
        started = time.monotonic()
        try:
            tool = _find_tool(action, tools)
            arguments = parse_action_input(action_input)
            backend = self.backend_for(tool.Name)
            if backend is None:
                raise NoBackendError(tool.Name)
        except ToolCallError as exc:
            return self._finish(action, None, _Attempts(error=exc, attempts=0), started)
        log_redacted(logger, logging.DEBUG, self._redact, "tool call %s via %s: %s", tool.Name, backend.name, arguments)
        context = CallContext(tools=tuple(tools), history=tuple(history), idempotency_key=idempotency_key)
        result = self._call_with_retries(backend, tool, arguments, context, deadline)
        return self._finish(action, backend.name, result, started)

    def _call_with_retries(
        self, backend: ToolBackend, tool: ToolDoc, arguments: dict[str, Any], context: CallContext, deadline: float | None
    ) -> _Attempts:
        attempts = 0

        def attempt(number: int) -> str:
            nonlocal attempts
            attempts = number
            timeout_s = self._timeout_s if deadline is None else min(self._timeout_s, deadline - time.monotonic())
            if timeout_s <= 0:
                raise BackendTimeout("the task's deadline passed")
            return backend.call(tool, arguments, timeout_s, context)

        def log_retry(exc: Exception, retry: int, delay: float) -> None:
            assert isinstance(exc, TransientBackendError)
            log_redacted(
                logger, logging.WARNING, self._redact, "tool %s via %s: %s; retry %d/%d in %.2fs",
                tool.Name, backend.name, bound_text(exc.describe()), retry, self._retry.max_retries, delay,
            )  # fmt: skip

        try:
            observation = self._retry.call(
                attempt,
                transient=lambda exc: isinstance(exc, TransientBackendError),
                retry_after_s=lambda exc: getattr(exc, "retry_after_s", None),
                deadline=deadline,
                on_retry=log_retry,
            )
        except ToolCallError as exc:
            return _Attempts(error=exc, attempts=attempts)
        except Exception as exc:  # noqa: BLE001 - a backend bug must not kill the task
            error = ToolCallError(f"internal error in the {backend.name} backend", detail=_describe(exc))
            return _Attempts(error=error, attempts=attempts)
        return _Attempts(observation=observation, attempts=attempts)

    def _finish(self, action: str, backend: str | None, result: _Attempts, started: float) -> ToolOutcome:
        error = result.error
        raw = error.observation() if error is not None else (result.observation or "")
        redacted = self._redact(raw)
        observation = truncate_observation(redacted)
        outcome = ToolOutcome(
            observation=observation,
            ok=error is None,
            backend=backend,
            error=bound_text(self._redact(error.describe())) if error is not None else None,
            error_kind=error.kind if error is not None else None,
            latency_s=time.monotonic() - started,
            attempts=result.attempts,
            truncated=observation != redacted,
        )
        self._log(action, outcome)
        return outcome

    def _log(self, action: str, outcome: ToolOutcome) -> None:
        if outcome.ok:
            log_redacted(
                logger, logging.INFO, self._redact, "tool %s via %s: ok in %.3fs (%d attempt(s))",
                action, outcome.backend, outcome.latency_s, outcome.attempts,
            )  # fmt: skip
        else:
            log_redacted(
                logger, logging.WARNING, self._redact, "tool %s via %s failed [%s]: %s",
                action, outcome.backend or "(no backend)", outcome.error_kind, outcome.error,
            )  # fmt: skip

    def close(self) -> None:
        """Close every backend's connections and threads."""
        for backend in self._backends:
            backend.close()

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _find_tool(action: str, tools: Sequence[ToolDoc]) -> ToolDoc:
    """The task's tool with exactly this Name."""
    tool = next((t for t in tools if t.Name == action), None)
    if tool is None:
        raise UnknownToolError(action)
    return tool


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def build_executor(
    settings: Settings,
    *,
    registry: ToolRegistry | None = None,
    backoff_s: float | None = None,
) -> ToolExecutor:
    """The executor the settings describe; backends in order python, mirror, http, virtual.

    The Python registry (``registry`` or :data:`default_registry`) is always first; the
    mirror, the HTTP catalog and the /virtual server are added when configured. Both
    network backends go through the egress guard with ``tools_allow_hosts``.
    """
    guard = NetworkGuard(settings.tools_allow_hosts)
    backends: list[ToolBackend] = [PythonBackend(registry if registry is not None else default_registry)]
    if settings.tools_mirror is not None:
        backends.append(MirrorBackend.from_file(settings.tools_mirror))
    catalog = ToolCatalog.load(settings.tools_http_catalog) if settings.tools_http_catalog is not None else None
    if catalog is not None:
        backends.append(HttpBackend(catalog, guard=guard, rapidapi_key=settings.tools_rapidapi_key))
    if settings.tools_virtual_url is not None:
        backends.append(
            VirtualBackend(settings.tools_virtual_url, guard=guard, key=settings.tools_virtual_key, catalog=catalog)
        )
    return ToolExecutor(
        backends,
        timeout_s=settings.tools_timeout_s,
        retry=RetryPolicy(
            max_retries=settings.tools_max_retries,
            backoff_s=settings.tools_backoff_s if backoff_s is None else backoff_s,
        ),
        redactor=secrets_redactor(settings),
    )
