"""ToolBench name normalisation (``toolbench/utils.py``), reproduced character for character.

The compact doc ``Name`` of an API is
``(change_name(standardize(api_name)) + "_for_" + standard_tool_name)[-64:]``: the cut keeps
the *last* 64 characters, so the ``_for_<tool>`` suffix survives and the API name's front
is lost.

Usage::

    compact_name("Get by ID", "flowers")   # 'get_by_id_for_flowers'
    change_name(standardize("id"))         # 'is_id'
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_NAME_CHARS",
    "change_name",
    "compact_name",
    "parameter_name",
    "split_compact_name",
    "standardize",
    "standardize_category",
]

MAX_NAME_CHARS = 64

# ToolBench's own pattern. Inside the class every ``^`` after the first is a literal,
# so ToolBench keeps ``^`` characters; we keep that quirk to produce the same names.
_NOT_NAME_CHAR = re.compile("[^\\u4e00-\\u9fa5^a-z^A-Z^0-9^_]")
_REPEATED_UNDERSCORE = re.compile(r"(_)\1+")
_KEYWORDS = frozenset({"from", "class", "return", "false", "true", "id", "and"})
_TOOL_IN_FUNCTION = re.compile(r'subfunction for tool "([^"]+)"')


def standardize(string: str) -> str:
    """ToolBench ``standardize``: ``_`` for odd characters, one ``_`` per run, lower case,
    no leading/trailing ``_``, and ``get_`` before a leading digit."""
    string = _NOT_NAME_CHAR.sub("_", string)
    string = _REPEATED_UNDERSCORE.sub("_", string).lower()
    string = string.strip("_")
    if string and string[0].isdigit():
        string = "get_" + string
    return string


def change_name(name: str) -> str:
    """ToolBench ``change_name``: Python keywords (and ``id``) become ``is_<name>``."""
    return "is_" + name if name in _KEYWORDS else name


def parameter_name(raw: str) -> str:
    """The name a model uses for a ToolBench parameter (``id`` → ``is_id``)."""
    return change_name(standardize(raw))


def compact_name(api_name: str, standard_tool_name: str) -> str:
    """The α-UMi / ToolBench function name of one API of one tool."""
    return (change_name(standardize(api_name)) + "_for_" + standard_tool_name)[-MAX_NAME_CHARS:]


def standardize_category(category: str) -> str:
    """ToolBench's category folder name: spaces, commas and slashes become ``_``."""
    saved = category.replace(" ", "_").replace(",", "_").replace("/", "_")
    while " " in saved or "," in saved:
        saved = saved.replace(" ", "_").replace(",", "_")
    return saved.replace("__", "_")


def split_compact_name(name: str, function: str = "") -> tuple[str, str]:
    """Best guess at ``(api_name, standard_tool_name)`` for a compact Name.

    The GLPFT compact doc's ``function`` text names the tool (``subfunction for tool "x"``),
    which resolves names whose API part itself contains ``_for_``; otherwise the Name is
    split at its last ``_for_``. A Name without ``_for_`` is its own API and tool name.
    """
    match = _TOOL_IN_FUNCTION.search(function)
    if match:
        tool = match.group(1)
        suffix = "_for_" + tool
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], tool
    api, sep, tool = name.rpartition("_for_")
    if sep and api and tool:
        return api, tool
    return name, name
