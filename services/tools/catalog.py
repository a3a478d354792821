"""ToolBench tool JSON files, indexed by the compact Name the models call them by.

A catalog folder is laid out as ToolBench's ``data/toolenv/tools``: ``<Category>/<tool>.json``,
where the file's base name is the tool's standard name. Each API of each tool becomes one
:class:`CatalogEntry` under ``(change_name(standardize(api)) + "_for_" + tool)[-64:]``.

Usage::

    catalog = ToolCatalog.load(Path("data/toolenv/tools"))
    entry = catalog.get("get_by_id_for_flowers")
    entry.category, entry.tool, entry.api, entry.spec.url
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.tools.errors import ToolSetupError
from services.tools.names import change_name, compact_name, parameter_name, standardize

__all__ = ["ApiSpec", "CatalogEntry", "ToolCatalog", "ToolParameter", "ToolSpec"]

logger = logging.getLogger(__name__)


class ToolParameter(BaseModel):
    """One RapidAPI parameter: ``{name, type, description, default}``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1)
    type: str = "STRING"
    description: str | None = ""
    default: Any = None

    @property
    def model_name(self) -> str:
        """The name the models use for it (``id`` → ``is_id``)."""
        return parameter_name(self.name)

    def aliases(self) -> tuple[str, ...]:
        """Every spelling a call may use: raw, standardised, and the models' name."""
        return tuple(dict.fromkeys((self.name, standardize(self.name), self.model_name)))


class ApiSpec(BaseModel):
    """One entry of a tool's ``api_list``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1)
    url: str = ""
    method: str = "GET"
    description: str | None = ""
    required_parameters: tuple[ToolParameter, ...] = ()
    optional_parameters: tuple[ToolParameter, ...] = ()

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.strip().upper() or "GET"

    @field_validator("required_parameters", "optional_parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return () if value is None else value

    @property
    def parameters(self) -> tuple[ToolParameter, ...]:
        """Required parameters first, then optional ones."""
        return self.required_parameters + self.optional_parameters


class ToolSpec(BaseModel):
    """A ToolBench tool JSON file (the fields this library uses)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tool_name: str = Field(min_length=1)
    tool_description: str | None = ""
    standardized_name: str | None = None
    api_list: tuple[ApiSpec, ...] = ()


class CatalogEntry(BaseModel):
    """One callable API: its compact Name and the names a ToolBench server knows it by."""

    model_config = ConfigDict(frozen=True)

    name: str
    category: str
    #: The tool's standard name (the JSON file's base name).
    tool: str
    #: ``change_name(standardize(api_name))``, as ToolBench's service expects it.
    api: str
    spec: ApiSpec


class ToolCatalog:
    """Catalog entries by compact Name; when two APIs share a Name the first one loaded wins."""

    def __init__(self, entries: Iterable[CatalogEntry] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: CatalogEntry) -> None:
        """Index one entry (a duplicate Name is logged and ignored)."""
        if entry.name in self._entries:
            logger.warning("tool catalog: %s is defined twice; keeping the first", entry.name)
            return
        self._entries[entry.name] = entry

    def add_tool(self, spec: ToolSpec, *, category: str, standard_tool_name: str | None = None) -> list[CatalogEntry]:
        """Index every API of one tool; the standard name defaults to ``standardize(tool_name)``."""
        tool = standard_tool_name or standardize(spec.tool_name)
        entries = [
            CatalogEntry(
                name=compact_name(api.name, tool),
                category=category,
                tool=tool,
                api=change_name(standardize(api.name)),
                spec=api,
            )
            for api in spec.api_list
        ]
        for entry in entries:
            self.add(entry)
        return entries

    @classmethod
    def load(cls, folder: Path) -> ToolCatalog:
        """Load ``<folder>/<Category>/<tool>.json``; unreadable files are logged and skipped."""
        if not folder.is_dir():
            raise ToolSetupError(f"UMI_TOOLS_HTTP_CATALOG: not a folder: {folder}")
        catalog = cls()
        for path in sorted(folder.glob("*/*.json")):
            spec = _read_tool_file(path)
            if spec is not None:
                catalog.add_tool(spec, category=path.parent.name, standard_tool_name=path.stem)
        logger.info("tool catalog %s: %d APIs", folder, len(catalog))
        return catalog

    def get(self, name: str) -> CatalogEntry | None:
        """The entry for a compact Name, if any."""
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries.values())


def _read_tool_file(path: Path) -> ToolSpec | None:
    try:
        return ToolSpec.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        logger.warning("tool catalog: skipping %s: %s", path, str(exc).splitlines()[0])
        return None
