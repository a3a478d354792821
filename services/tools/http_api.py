"""The HTTP backend: call the real API a ToolBench tool JSON file describes.

The call is built as ToolBench's generated ``api.py`` builds it: arguments go to the
declared parameters (a model may spell ``id`` as ``is_id``; both are accepted and the raw
name is sent), GET sends them as query parameters and other methods as a JSON body, and
RapidAPI's ``X-RapidAPI-Key`` / ``X-RapidAPI-Host`` headers are added, and the call's
``Idempotency-Key`` when it has one (the same for every retry and takeover). ``{name}``
placeholders in the URL path are filled from the arguments. The observation is the
response body text. Missing required or undeclared arguments are refused before sending.

The RapidAPI key is held as a ``SecretStr`` and only unwrapped into the request header.

Usage::

    backend = HttpBackend(ToolCatalog.load(folder), guard=NetworkGuard(), rapidapi_key=key)
    backend.call(tool, {"q": "cats"}, timeout_s=10)
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr

from services.tools.base import ToolBackend
from services.tools.catalog import CatalogEntry, ToolCatalog
from services.tools.errors import InvalidArgumentsError, NoBackendError
from services.tools.httpio import raise_for_status, send
from services.tools.models import CallContext
from services.tools.netguard import NetworkGuard, guarded_client
from shared.prompts import ToolDoc

__all__ = ["HttpBackend", "PreparedRequest", "prepare_request"]

_PLACEHOLDER = re.compile(r"\{([^{}/]+)\}")
_QUERY_SCALARS = (str, int, float, bool)


class PreparedRequest(BaseModel):
    """The HTTP request one call turns into (before headers)."""

    model_config = ConfigDict(frozen=True)

    method: str
    url: str
    params: dict[str, Any] | None = None
    json_body: dict[str, Any] | None = None


def prepare_request(entry: CatalogEntry, arguments: dict[str, Any]) -> PreparedRequest:
    """Map ``arguments`` onto the API's parameters; raises :class:`InvalidArgumentsError`."""
    spec = entry.spec
    values, unknown = _match_parameters(entry, arguments)
    url, values, used, missing_in_path = _fill_path(spec.url, values)
    missing = [p.model_name for p in spec.required_parameters if p.name not in values and p.name not in used]
    _check_arguments(missing_in_path + missing, unknown, entry)
    if spec.method == "GET":
        return PreparedRequest(method="GET", url=url, params={k: _query_value(v) for k, v in values.items()})
    return PreparedRequest(method=spec.method, url=url, json_body=values)


def _match_parameters(entry: CatalogEntry, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    by_alias: dict[str, str] = {}
    for parameter in entry.spec.parameters:
        for alias in parameter.aliases():
            by_alias.setdefault(alias, parameter.name)
    placeholders = set(_PLACEHOLDER.findall(entry.spec.url))
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in arguments.items():
        raw = by_alias.get(key, key if key in placeholders else None)
        if raw is None:
            unknown.append(key)
        elif value is not None:
            values[raw] = value
    return values, unknown


def _fill_path(url: str, values: dict[str, Any]) -> tuple[str, dict[str, Any], set[str], list[str]]:
    """Substitute ``{name}`` placeholders: (url, values left for query/body, names used, names missing)."""
    remaining = dict(values)
    used: set[str] = set()
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in remaining:
            missing.append(name)
            return match.group(0)
        used.add(name)
        return quote(str(_query_value(remaining.pop(name))), safe="")

    return _PLACEHOLDER.sub(substitute, url), remaining, used, missing


def _check_arguments(missing: list[str], unknown: list[str], entry: CatalogEntry) -> None:
    problems = []
    if missing:
        problems.append("Missing required parameters: " + ", ".join(missing))
    if unknown:
        declared = ", ".join(p.model_name for p in entry.spec.parameters) or "none"
        problems.append(f"Unexpected parameters: {', '.join(unknown)} (declared: {declared})")
    if problems:
        raise InvalidArgumentsError(f"{entry.name}: " + "; ".join(problems))


def _query_value(value: Any) -> Any:
    if isinstance(value, _QUERY_SCALARS):
        return value
    if isinstance(value, list) and all(isinstance(item, _QUERY_SCALARS) for item in value):
        return value
    return json.dumps(value)


class HttpBackend(ToolBackend):
    """Real HTTP calls to the APIs of a :class:`ToolCatalog`, through the egress guard."""

    name = "http"

    def __init__(
        self,
        catalog: ToolCatalog,
        *,
        guard: NetworkGuard | None = None,
        rapidapi_key: SecretStr | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self._catalog = catalog
        self._key = rapidapi_key
        self._owns_client = client is None
        self._client = client or guarded_client(guard or NetworkGuard())

    @property
    def catalog(self) -> ToolCatalog:
        return self._catalog

    def can_serve(self, tool_name: str) -> bool:
        """Tools of the catalog whose API has a URL."""
        entry = self._catalog.get(tool_name)
        return entry is not None and bool(entry.spec.url)

    def call(self, tool: ToolDoc, arguments: dict[str, Any], timeout_s: float, context: CallContext | None = None) -> str:
        """Send the request; the body text is the observation."""
        entry = self._catalog.get(tool.Name)
        if entry is None:
            raise NoBackendError(tool.Name)
        prepared = prepare_request(entry, arguments)
        reply = send(
            self._client,
            prepared.method,
            prepared.url,
            params=prepared.params,
            json_body=prepared.json_body,
            headers=self._headers(prepared.url) | (context.idempotency_headers if context is not None else {}),
            timeout_s=timeout_s,
        )
        raise_for_status(reply)
        return reply.text

    def _headers(self, url: str) -> dict[str, str]:
        try:
            host = httpx.URL(url).host
        except httpx.InvalidURL as exc:
            raise InvalidArgumentsError("request invalid, the request could not be built", detail=str(exc)) from None
        headers = {"X-RapidAPI-Host": host}
        if self._key is not None and self._key.get_secret_value():
            headers["X-RapidAPI-Key"] = self._key.get_secret_value()
        return headers

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
