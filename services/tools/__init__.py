"""Tool execution for α-UMi: run the caller's ``Action`` / ``Action Input`` and return the observation.

The executor (:class:`ToolExecutor`) checks the call the way ToolBench does, routes it to
the first backend that serves the tool Name, retries transient failures, masks secrets
and truncates the observation. Backends, in the order :func:`build_executor` installs them:

- ``python``  — functions registered in code (:class:`ToolRegistry`, :func:`register`);
- ``mirror``  — observations replayed from recorded trajectories (``UMI_TOOLS_MIRROR``);
- ``http``    — real APIs described by ToolBench tool JSON files (``UMI_TOOLS_HTTP_CATALOG``);
- ``virtual`` — a StableToolBench ``/virtual`` server (``UMI_TOOLS_VIRTUAL_URL``), the catch-all.

The HTTP and virtual backends connect only through the egress guard (:class:`NetworkGuard`):
no private, loopback, link-local, multicast, reserved or unspecified addresses unless
allow-listed in ``UMI_TOOLS_ALLOW_HOSTS``, and no redirects.

Errors: every :class:`ToolCallError` becomes a ToolBench error observation and the task goes
on; the whole hierarchy is drawn in :mod:`services.tools.errors`.

Usage::

    from services.tools import build_executor
    executor = build_executor(get_settings())
    outcome = executor.execute(call.action, call.action_input, task_tools)
    store(outcome.observation, ok=outcome.ok, backend=outcome.backend, error=outcome.error)
"""

from __future__ import annotations

from services.tools.base import ToolBackend
from services.tools.catalog import ApiSpec, CatalogEntry, ToolCatalog, ToolParameter, ToolSpec
from services.tools.errors import (
    ApiReportedError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadResponseError,
    CallRejected,
    EgressRefused,
    HttpStatusError,
    InvalidArgumentsError,
    MirrorMissError,
    NoBackendError,
    PermanentBackendError,
    RetryableStatus,
    ToolCallError,
    ToolError,
    ToolErrorKind,
    ToolFunctionError,
    ToolInputError,
    ToolSetupError,
    TransientBackendError,
    UnknownToolError,
    error_observation,
)
from services.tools.executor import RetryPolicy, ToolExecutor, build_executor
from services.tools.http_api import HttpBackend, PreparedRequest, prepare_request
from services.tools.mirror import MirrorBackend, MirrorRecord, Recording
from services.tools.models import CallContext, ToolOutcome, canonical_arguments, parse_action_input
from services.tools.names import change_name, compact_name, split_compact_name, standardize
from services.tools.netguard import NetworkGuard, address_problem, check_host, guarded_client
from services.tools.registry import PythonBackend, RegisteredTool, ToolRegistry, default_registry, register
from services.tools.virtual import VirtualBackend, VirtualReply, VirtualRequest, VirtualTarget
from shared.redaction import Redactor

__all__ = [
    "ApiReportedError",
    "ApiSpec",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BadResponseError",
    "CallContext",
    "CallRejected",
    "CatalogEntry",
    "EgressRefused",
    "HttpBackend",
    "HttpStatusError",
    "InvalidArgumentsError",
    "MirrorBackend",
    "MirrorMissError",
    "MirrorRecord",
    "NetworkGuard",
    "NoBackendError",
    "PermanentBackendError",
    "PreparedRequest",
    "PythonBackend",
    "Recording",
    "Redactor",
    "RegisteredTool",
    "RetryPolicy",
    "RetryableStatus",
    "ToolBackend",
    "ToolCallError",
    "ToolCatalog",
    "ToolError",
    "ToolErrorKind",
    "ToolExecutor",
    "ToolFunctionError",
    "ToolInputError",
    "ToolOutcome",
    "ToolParameter",
    "ToolRegistry",
    "ToolSetupError",
    "ToolSpec",
    "TransientBackendError",
    "UnknownToolError",
    "VirtualBackend",
    "VirtualReply",
    "VirtualRequest",
    "VirtualTarget",
    "address_problem",
    "build_executor",
    "canonical_arguments",
    "change_name",
    "check_host",
    "compact_name",
    "default_registry",
    "error_observation",
    "guarded_client",
    "parse_action_input",
    "prepare_request",
    "register",
    "split_compact_name",
    "standardize",
]
