"""Configuration of the SGLang **simulator** (a stand-in for GPU SGLang servers, not inference).

A :class:`SimulatorConfig` describes one simulated SGLang server (one replica of
one α-UMi role): which recorded data it replays, where it listens, and how it
models latency, concurrency and the prefix cache. Latency presets are
:class:`LatencyProfile` values:

* :data:`INSTANT` (the default): no delay at all, unlimited concurrency — for
  unit tests and demos.
* :data:`LLAMA2_7B_1GPU`: roughly an α-UMi 7B checkpoint (Llama-2 7B, fp16) on
  one data-centre GPU — ~40 ms to the first token, ~0.1 ms per uncached prompt
  token, ~15 ms per generated token, 64 requests decoded at once — for load
  tests and routing studies.

Usage::

    config = SimulatorConfig(role="planner", port=30001, latency="llama2-7b-1gpu")
    config = SimulatorConfig(ttft_s=0.05, decode_s_per_token=0.01, max_running_requests=8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.example_data import BUNDLED_TRAJECTORIES
from shared.roles import LLMRole

__all__ = [
    "DEFAULT_DATA_FILES",
    "INSTANT",
    "LATENCY_PROFILES",
    "LLAMA2_7B_1GPU",
    "LatencyProfile",
    "SIMULATED_SGLANG_VERSION",
    "SimulatorConfig",
]

#: The SGLang release whose HTTP protocol the simulator follows.
SIMULATED_SGLANG_VERSION = "0.5.23"

#: The α-UMi example trajectories shipped with the product (ToolBench-derived, Apache-2.0).
DEFAULT_DATA_FILES: tuple[Path, ...] = (BUNDLED_TRAJECTORIES,)


class LatencyProfile(BaseModel):
    """How long a simulated request takes and how many run at once.

    A request's service time is ``ttft_s + prefill_s_per_token * uncached_prompt_tokens
    + decode_s_per_token * completion_tokens``; at most ``max_running_requests`` are
    served at once, the rest wait (at most ``max_queued_requests`` of them; more are
    refused with 503 as SGLang's ``--max-queued-requests`` does).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttft_s: float = Field(default=0.0, ge=0, description="Base time to the first token (scheduling + one forward).")
    prefill_s_per_token: float = Field(default=0.0, ge=0, description="Prefill time per prompt token not in the cache.")
    decode_s_per_token: float = Field(default=0.0, ge=0, description="Time per generated token.")
    max_running_requests: int = Field(default=1024, ge=1, description="Requests served concurrently.")
    max_queued_requests: int | None = Field(default=None, ge=0, description="Waiting requests allowed; None: no limit.")

    @classmethod
    def preset(cls, name: str) -> LatencyProfile:
        """The named preset (see :data:`LATENCY_PROFILES`); raises ``ValueError`` for unknown names."""
        try:
            return LATENCY_PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown latency profile {name!r}; choose one of {sorted(LATENCY_PROFILES)}") from None


#: No latency and (practically) unlimited concurrency: the default, for tests and demos.
INSTANT = LatencyProfile()

#: About an α-UMi 7B model (Llama-2 7B, fp16) served by SGLang on one H100/A100-class GPU.
LLAMA2_7B_1GPU = LatencyProfile(
    ttft_s=0.040,
    prefill_s_per_token=0.0001,
    decode_s_per_token=0.015,
    max_running_requests=64,
    max_queued_requests=None,
)

#: Preset names accepted by ``SimulatorConfig(latency=...)``, :meth:`LatencyProfile.preset` and the CLIs
#: (``none``/``realistic`` are the names ``umi sim serve --latency`` uses).
LATENCY_PROFILES: dict[str, LatencyProfile] = {
    "instant": INSTANT,
    "none": INSTANT,
    "llama2-7b-1gpu": LLAMA2_7B_1GPU,
    "realistic": LLAMA2_7B_1GPU,
}

_LATENCY_FIELDS = tuple(LatencyProfile.model_fields)


class SimulatorConfig(BaseModel):
    """One simulated SGLang server (one replica of one role, or of all three).

    ``latency`` may be given as a preset name or a :class:`LatencyProfile`; it fills
    the latency fields not given explicitly. ``data_files`` may also be passed as ``data``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: Trajectory / ``{input, target}`` files to replay (also accepted as ``data=``).
    data_files: list[Path] = Field(default_factory=lambda: list(DEFAULT_DATA_FILES), alias="data")
    #: Only replay this role's recordings (None: all three roles).
    role: LLMRole | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=30000, ge=0, le=65535)
    #: Reported as ``model_path``; default ``simulator/alpha-umi-<role>-7b``.
    model_path: str | None = None
    #: Name in ``/v1/models`` and the ``model_name`` metric label; default: the model path.
    served_model_name: str | None = None
    context_length: int = Field(default=4096, ge=16)
    #: When set, every route except ``/health*``, ``/ready*`` and ``/metrics*`` needs ``Authorization: Bearer <key>``.
    api_key: str | None = None

    ttft_s: float = Field(default=INSTANT.ttft_s, ge=0)
    prefill_s_per_token: float = Field(default=INSTANT.prefill_s_per_token, ge=0)
    decode_s_per_token: float = Field(default=INSTANT.decode_s_per_token, ge=0)
    max_running_requests: int = Field(default=INSTANT.max_running_requests, ge=1)
    max_queued_requests: int | None = Field(default=INSTANT.max_queued_requests, ge=0)

    #: Prefix-cache (radix tree) capacity in tokens; 0 disables the cache.
    prefix_cache_tokens: int = Field(default=100_000, ge=0)
    #: Answer in the shapes real checkpoints on SGLang produce: a leading space (SGLang decodes
    #: the first output token with the prompt's last ones), a trailing newline, and now and
    #: then a blank first planner answer (only where the request's constraint allows it).
    checkpoint_shapes: bool = False
    #: The ``--grammar-backend`` the simulated server reports and behaves as. Grammars are compiled
    #: with llguidance (SGLang's ``llguidance`` backend, which accepts what ``xgrammar`` does for the
    #: product's constraints); ``outlines`` aborts EBNF requests and ``none`` every grammar request,
    #: with SGLang's messages.
    grammar_backend: Literal["xgrammar", "llguidance", "outlines", "none"] = "llguidance"
    #: Tokens per streamed chunk (SGLang's ``--stream-interval``).
    stream_interval: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _expand_latency_profile(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "latency" not in data:
            return data
        data = dict(data)
        profile = data.pop("latency")
        if isinstance(profile, str):
            profile = LatencyProfile.preset(profile)
        elif isinstance(profile, dict):
            profile = LatencyProfile.model_validate(profile)
        if not isinstance(profile, LatencyProfile):
            raise ValueError("latency must be a preset name or a LatencyProfile")
        for name in _LATENCY_FIELDS:
            data.setdefault(name, getattr(profile, name))
        return data

    @property
    def latency(self) -> LatencyProfile:
        """The latency fields as a :class:`LatencyProfile`."""
        return LatencyProfile(**{name: getattr(self, name) for name in _LATENCY_FIELDS})

    @property
    def resolved_model_path(self) -> str:
        """``model_path``, defaulting to ``simulator/alpha-umi-<role>-7b``."""
        if self.model_path:
            return self.model_path
        return f"simulator/alpha-umi-{self.role.value}-7b" if self.role else "simulator/alpha-umi-7b"

    @property
    def resolved_served_model_name(self) -> str:
        """``served_model_name``, defaulting to the model path (as SGLang does)."""
        return self.served_model_name or self.resolved_model_path
