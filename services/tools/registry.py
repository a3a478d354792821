"""Python functions as tools: a registry and the backend that calls them.

A registered function is called with the parsed Action Input as keyword arguments. A
``str`` result is the observation; anything else is ``json.dumps``-ed (pydantic models are
dumped first). An exception becomes ToolBench's ``Function executing ... error...``
observation with the exception's type and message only (no traceback). Each call runs in a
worker thread bounded by the call's timeout; a function that overruns is reported as
``request time out`` (Python cannot stop the thread, so keep tools cooperative).

Usage::

    @register("add_for_calculator")
    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.\"\"\"
        return a + b

    executor = build_executor(settings)      # the default registry is served first
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from services.tools.base import ToolBackend
from services.tools.errors import (
    TIMEOUT_MESSAGE,
    InvalidArgumentsError,
    NoBackendError,
    ToolCallError,
    ToolErrorKind,
    ToolFunctionError,
    ToolSetupError,
)
from services.tools.models import CallContext
from shared.prompts import ToolDoc

__all__ = ["PythonBackend", "RegisteredTool", "ToolRegistry", "default_registry", "register"]

F = TypeVar("F", bound=Callable[..., Any])

_TYPE_WORDS = {int: "integer", float: "number", bool: "boolean", str: "string"}


class RegisteredTool(BaseModel):
    """A function and the compact doc it is shown to the models with."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    function: Callable[..., Any]
    doc: ToolDoc


class ToolRegistry:
    """Tool Name → Python function."""

    def __init__(self) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        self._lock = threading.Lock()

    def register(self, name: str | None = None, *, doc: ToolDoc | None = None, replace: bool = False) -> Callable[[F], F]:
        """Decorator: register the function under ``name`` (default: the function's name)."""

        def decorate(function: F) -> F:
            self.add(name or function.__name__, function, doc=doc, replace=replace)
            return function

        return decorate

    def add(self, name: str, function: Callable[..., Any], *, doc: ToolDoc | None = None, replace: bool = False) -> None:
        """Register ``function``; a second registration of a Name needs ``replace=True``."""
        tool = RegisteredTool(name=name, function=function, doc=doc or _derive_doc(name, function))
        with self._lock:
            if name in self._tools and not replace:
                raise ToolSetupError(f"tool {name!r} is already registered")
            self._tools[name] = tool

    def unregister(self, name: str) -> None:
        """Forget a tool (no error if it was not registered)."""
        with self._lock:
            self._tools.pop(name, None)

    def get(self, name: str) -> RegisteredTool | None:
        return self._tools.get(name)

    def docs(self) -> list[ToolDoc]:
        """The compact docs of all registered tools, in registration order."""
        return [tool.doc for tool in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


def _derive_doc(name: str, function: Callable[..., Any]) -> ToolDoc:
    """A GLPFT-style compact doc from the signature and the docstring's first paragraph."""
    summary = (inspect.getdoc(function) or "").split("\n\n", 1)[0].replace("\n", " ")
    inputs = {
        param.name: f"{_TYPE_WORDS.get(param.annotation, 'string')}, "
        for param in _signature(function).parameters.values()
        if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }
    try:
        return ToolDoc(Name=name, function=summary, input=inputs)
    except ValidationError as exc:
        raise ToolSetupError(f"invalid tool name {name!r}: {exc.errors()[0]['msg']}") from None


def _signature(function: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(function, eval_str=True)
    except (NameError, SyntaxError, TypeError):
        return inspect.signature(function)


#: The process-wide registry that :func:`build_executor` serves unless given another.
default_registry = ToolRegistry()


def register(name: str | None = None, *, doc: ToolDoc | None = None, replace: bool = False) -> Callable[[F], F]:
    """``@register("name")``: add a function to :data:`default_registry`."""
    return default_registry.register(name, doc=doc, replace=replace)


class PythonBackend(ToolBackend):
    """Runs registered functions in worker threads, each bounded by the call's timeout."""

    name = "python"

    def __init__(self, registry: ToolRegistry, *, max_workers: int = 8) -> None:
        self._registry = registry
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool-fn")

    def can_serve(self, tool_name: str) -> bool:
        return tool_name in self._registry

    def call(self, tool: ToolDoc, arguments: dict[str, Any], timeout_s: float, context: CallContext | None = None) -> str:
        """Call the function with ``arguments`` as keyword arguments."""
        registered = self._registry.get(tool.Name)
        if registered is None:
            raise NoBackendError(tool.Name)
        _check_signature(registered, arguments)
        future = self._pool.submit(_invoke, registered.function, arguments)
        try:
            result = future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            raise ToolFunctionError(
                TIMEOUT_MESSAGE, kind=ToolErrorKind.TIMEOUT, detail=f"{tool.Name} did not return within {timeout_s:g}s"
            ) from None
        except ToolCallError:
            raise  # a tool may signal e.g. a transient failure itself
        except Exception as exc:  # noqa: BLE001 - any failure of user code is an observation
            raise ToolFunctionError(f"Function executing {tool.Name} error...\n{type(exc).__name__}: {exc}") from None
        return _as_observation(tool.Name, result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_signature(tool: RegisteredTool, arguments: dict[str, Any]) -> None:
    try:
        inspect.signature(tool.function).bind(**arguments)
    except TypeError as exc:
        raise InvalidArgumentsError(f"{tool.name}: invalid arguments: {exc}") from None


def _invoke(function: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    result = function(**arguments)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    return result


def _as_observation(name: str, result: Any) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, bytes):
        return result.decode("utf-8", errors="replace")
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError) as exc:
        raise ToolFunctionError(f"Function executing {name} error...\nresult is not JSON-serialisable: {exc}") from None
