"""Names of the agent's roles, used by queues, steps, metrics and settings alike."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["LLMRole", "StepRole"]


class LLMRole(StrEnum):
    """The three fine-tuned LLMs of α-UMi; each has its own SGLang server."""

    PLANNER = "planner"
    CALLER = "caller"
    SUMMARIZER = "summarizer"


class StepRole(StrEnum):
    """Who produced a step of a task's trajectory.

    ``user`` is the task's query, ``tools`` an observation from the tool executor.
    The α-UMi conversation names (``assistant``, ``observation``, ``conclusion``)
    are derived from these in :mod:`shared.prompts`.
    """

    USER = "user"
    PLANNER = "planner"
    CALLER = "caller"
    TOOLS = "tools"
    SUMMARIZER = "summarizer"

