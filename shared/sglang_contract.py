"""SGLang's own ``/generate`` request contract, loaded from the installed ``sglang`` wheel.

``sglang/api/v1/api_types.py`` is generated code that needs only ``msgspec``;
importing the ``sglang`` package itself would pull in torch, so the file is
loaded by path. The simulator uses it as its contract gate (as the real server
does in ``srt/entrypoints/api_contract.py``) and the tests check every body the
client sends against it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ContractUnavailable", "generate_contract_error", "load_api_types"]


class ContractUnavailable(RuntimeError):
    """The ``sglang`` wheel is not installed, so its contract cannot be loaded."""


@functools.cache
def load_api_types() -> ModuleType:
    """The ``sglang.api.v1.api_types`` module, loaded without importing ``sglang``."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ContractUnavailable(
            "the sglang wheel is not installed; run `pip install --no-deps sglang==0.5.23` (scripts/bootstrap does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "api" / "v1" / "api_types.py"
    if not path.is_file():
        raise ContractUnavailable(f"sglang is installed but has no request contract at {path}")
    module_spec = importlib.util.spec_from_file_location("_sglang_api_v1_api_types", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def generate_contract_error(body: Any) -> str | None:
    """The contract violation in a parsed ``/generate`` JSON body, or ``None`` (mirrors SGLang's gate)."""
    api_types = load_api_types()
    try:
        api_types.GenerateRequest.from_json_value(body)
    except api_types.JsonContractError as exc:
        return str(exc)
    return None
