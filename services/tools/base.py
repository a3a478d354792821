"""The backend contract: something that can answer some tool Names.

The executor asks its backends in order and uses the first whose :meth:`ToolBackend.can_serve`
accepts the tool's Name. A backend returns the observation text, or raises a
:class:`~services.tools.errors.ToolCallError` (transient ones are retried by the executor).

Usage::

    class EchoBackend(ToolBackend):
        name = "echo"

        def can_serve(self, tool_name: str) -> bool:
            return tool_name.startswith("echo_")

        def call(self, tool, arguments, timeout_s, context=None) -> str:
            return json.dumps(arguments)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from services.tools.models import CallContext
from shared.prompts import ToolDoc

__all__ = ["ToolBackend"]


class ToolBackend(ABC):
    """One way of answering tool calls (recordings, HTTP APIs, a /virtual server, Python)."""

    #: Short label stored with each call (``ToolOutcome.backend``) and used in logs.
    name: str

    @abstractmethod
    def can_serve(self, tool_name: str) -> bool:
        """Whether this backend knows the tool called ``tool_name``."""

    @abstractmethod
    def call(self, tool: ToolDoc, arguments: dict[str, Any], timeout_s: float, context: CallContext | None = None) -> str:
        """Run one call and return the observation text (untruncated).

        ``timeout_s`` bounds the call; ``context`` (the task's tools and history) is
        optional and only some backends use it.
        """

    def close(self) -> None:
        """Release connections and threads; the default has nothing to release."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
