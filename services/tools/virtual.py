"""The StableToolBench ``/virtual`` backend: a server that answers (or simulates) any ToolBench API.

Request (StableToolBench ``server/main.py``, model ``Info``): ``POST <url>`` with header
``toolbench_key`` and JSON ``{"category", "tool_name", "api_name", "tool_input", "strip",
"toolbench_key"}`` (plus the call's ``Idempotency-Key`` header, for servers or proxies that
honour it); reply ``{"error": str, "response": str | object}``. With an empty
``error`` the observation is the response (JSON-encoded when it is not a string); otherwise
it is ToolBench's ``{"error": ..., "response": ...}`` observation.

The category, tool and API names come from the catalog when the tool is in it; otherwise
they are derived from the compact Name ``<api>_for_<tool>`` (using the tool name quoted in
the GLPFT ``function`` text when present) and the default category.

Usage::

    backend = VirtualBackend("http://127.0.0.1:8080/virtual", key=SecretStr("k"), catalog=catalog)
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from services.tools.base import ToolBackend
from services.tools.catalog import ToolCatalog
from services.tools.errors import ApiReportedError, BadResponseError
from services.tools.httpio import raise_for_status, send
from services.tools.models import CallContext
from services.tools.names import split_compact_name
from services.tools.netguard import NetworkGuard, guarded_client
from shared.prompts import ToolDoc

__all__ = ["VirtualBackend", "VirtualReply", "VirtualRequest", "VirtualTarget"]


class VirtualTarget(BaseModel):
    """The names a ToolBench server knows one API by."""

    model_config = ConfigDict(frozen=True)

    category: str
    tool_name: str
    api_name: str


class VirtualRequest(VirtualTarget):
    """The ``/virtual`` request body (StableToolBench's ``Info``)."""

    tool_input: str | dict[str, Any]
    strip: str = ""
    toolbench_key: str = ""


class VirtualReply(BaseModel):
    """The ``/virtual`` reply."""

    model_config = ConfigDict(extra="allow", frozen=True)

    error: str = ""
    response: Any = ""


class VirtualBackend(ToolBackend):
    """Calls a StableToolBench-compatible ``/virtual`` server; it can serve every tool."""

    name = "virtual"

    def __init__(
        self,
        url: str,
        *,
        guard: NetworkGuard | None = None,
        key: SecretStr | None = None,
        catalog: ToolCatalog | None = None,
        default_category: str = "",
        client: httpx.Client | None = None,
    ) -> None:
        self._url = url
        self._key = key
        self._catalog = catalog
        self._default_category = default_category
        self._owns_client = client is None
        self._client = client or guarded_client(guard or NetworkGuard())

    def can_serve(self, tool_name: str) -> bool:
        """A /virtual server simulates any API, so this backend is the catch-all."""
        return True

    def target(self, tool: ToolDoc) -> VirtualTarget:
        """Category, tool and API names for ``tool`` (catalog first, then the Name)."""
        entry = self._catalog.get(tool.Name) if self._catalog is not None else None
        if entry is not None:
            return VirtualTarget(category=entry.category, tool_name=entry.tool, api_name=entry.api)
        api, standard_tool = split_compact_name(tool.Name, tool.function)
        return VirtualTarget(category=self._default_category, tool_name=standard_tool, api_name=api)

    def call(self, tool: ToolDoc, arguments: dict[str, Any], timeout_s: float, context: CallContext | None = None) -> str:
        """POST the StableToolBench request and turn the reply into an observation."""
        key = self._key.get_secret_value() if self._key is not None else ""
        body = VirtualRequest(**self.target(tool).model_dump(), tool_input=arguments, toolbench_key=key)
        reply = send(
            self._client,
            "POST",
            self._url,
            json_body=body.model_dump(),
            headers={"toolbench_key": key} | (context.idempotency_headers if context is not None else {}),
            timeout_s=timeout_s,
        )
        raise_for_status(reply)
        answer = _parse_reply(reply.text)
        if answer.error:
            raise ApiReportedError(answer.error, response=answer.response)
        return answer.response if isinstance(answer.response, str) else json.dumps(answer.response)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


def _parse_reply(text: str) -> VirtualReply:
    try:
        return VirtualReply.model_validate_json(text)
    except ValidationError as exc:
        raise BadResponseError(f"/virtual reply is not {{error, response}} JSON: {exc.errors()[0]['msg']}") from None
