"""All configuration, read once from ``UMI_*`` environment variables.

Every service imports :func:`get_settings`; nothing else reads the environment.

Usage::

    from shared.settings import get_settings
    settings = get_settings()
    settings.broker_url          # UMI_BROKER_URL
    settings.llm_url(Role.PLANNER)   # UMI_PLANNER_LLM_URL (as given, normalised)
    settings.llm_urls(Role.PLANNER)  # its replicas' base URLs, a list
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.context_window import PromptDoesNotFit, prompt_budget
from shared.roles import LLMRole

__all__ = ["ConfigurationError", "Settings", "get_settings", "reset_settings_cache"]

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_DATABASE_URL = "sqlite:///.umi/umi.db"


class ConfigurationError(RuntimeError):
    """The environment holds a setting that cannot work; the message names it."""


def _http_url(value: str) -> str:
    """``value`` without a trailing slash, if it is an ``http(s)://host[:port]`` URL."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"must be an http(s)://host:port URL, got {maybe_sanitize_url(value)!r}")
    return value.rstrip("/")


class Settings(BaseSettings):
    """Product settings. Each field ``x`` is read from ``UMI_X``."""

    model_config = SettingsConfigDict(env_prefix="UMI_", extra="ignore", env_ignore_empty=True)

    # --- infrastructure ---------------------------------------------------
    broker_url: str = DEFAULT_BROKER_URL
    database_url: str = DEFAULT_DATABASE_URL
    #: Queue-name prefix; lets several deployments (or test runs) share one vhost.
    queue_prefix: str = "umi"
    #: Quorum queues need RabbitMQ >= 3.8; classic durable queues otherwise.
    quorum_queues: bool = True
    #: Deliveries of one message before the broker dead-letters it (poison-message cap).
    delivery_limit: int = Field(default=5, ge=1)
    #: How long a worker retries a job in place (backoff) while the database or broker is
    #: unreachable before it gives the message back to the queue (which spends a delivery).
    #: The message stays unacked meanwhile, so this stays under RabbitMQ's 30-minute consumer timeout.
    infra_retry_s: float = Field(default=60.0, ge=0, le=1500)
    #: Celery task events (``task-sent``, ``task-started``, …) for Flower or ``celery events``;
    #: off by default: every step would cost an event message more.
    task_events: bool = False

    # --- SGLang servers per LLM role (comma-separated replicas, see shared/replicas.py) ----
    planner_llm_url: str = "http://127.0.0.1:30001"
    caller_llm_url: str = "http://127.0.0.1:30002"
    summarizer_llm_url: str = "http://127.0.0.1:30003"
    #: Each role's URL is one SGLang router (sgl-router / SGLang Model Gateway): the task id goes
    #: as its ``X-SMG-Routing-Key`` header and ``/tokenize`` (which a router does not serve) is never asked.
    llm_router: bool = False
    #: How a role's replicas are chosen: ``task`` (every step of a task on the same replica,
    #: rendezvous hashing on the task id) or ``round_robin`` (each request on the next; for comparisons).
    llm_routing: Literal["task", "round_robin"] = "task"
    #: How often each replica's ``GET /health`` is asked (where a role has several).
    llm_health_interval_s: float = Field(default=5.0, gt=0)
    #: Sent as ``Authorization: Bearer`` when the SGLang servers run with ``--api-key``.
    llm_api_key: SecretStr | None = None
    llm_connect_timeout_s: float = Field(default=5.0, gt=0)
    llm_read_timeout_s: float = Field(default=120.0, gt=0)
    llm_max_retries: int = Field(default=4, ge=0)
    llm_backoff_s: float = Field(default=0.5, ge=0)

    # --- generation (α-UMi defaults, see shared/llm.py) ----------------------
    temperature: float = Field(default=0.5, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=512, ge=1)
    #: The models' context window (Llama-2: 4096); longer prompts are cut from the left.
    context_length: int = Field(default=4096, ge=16)
    #: Constrained decoding (planner ends with a Next marker, caller names a listed tool).
    constrained: bool = True

    # --- tasks ---------------------------------------------------------------
    max_steps: int = Field(default=12, ge=1)
    task_timeout_s: float = Field(default=600.0, gt=0)
    #: How often the gateway ends tasks that are past their deadline with no step coming.
    sweep_interval_s: float = Field(default=15.0, gt=0)
    worker_concurrency: int = Field(default=32, ge=1)
    #: Port of a worker's Prometheus ``/metrics`` (0: not served); the gateway serves its own on its HTTP port.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    # --- tools ---------------------------------------------------------------
    tools_mirror: Path | None = None
    #: Folder of ToolBench tool JSON files (``<Category>/<tool>.json``) for real HTTP calls.
    tools_http_catalog: Path | None = None
    #: StableToolBench-compatible ``/virtual`` endpoint.
    tools_virtual_url: str | None = None
    tools_virtual_key: SecretStr | None = None
    tools_rapidapi_key: SecretStr | None = None
    tools_timeout_s: float = Field(default=30.0, gt=0)
    #: Hosts (names or IPs) a tool may reach even though they are private/loopback.
    tools_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    tools_max_retries: int = Field(default=2, ge=0)
    tools_backoff_s: float = Field(default=0.5, ge=0)
    #: Lease on a running tool call, renewed every third of it; a copy of the job takes
    #: the call over only once the lease lapsed (its worker died).
    tools_lease_s: float = Field(default=30.0, gt=0)

    # --- ingress: gateway and AMQP ---------------------------------------------
    gateway_url: str = "http://127.0.0.1:8000"
    #: API keys required (``Authorization: Bearer`` over HTTP, ``x-api-key`` over AMQP). ``off``
    #: puts every task in the ``default`` tenant; only for a machine nobody else reaches.
    auth: bool = True
    #: The API key ``umi submit`` and the Python client send (``umi keys create`` prints one).
    api_key: SecretStr | None = None
    #: Per-tenant request rate (requests per second, sustained) and burst, unless the tenant has its own.
    tenant_rate_per_s: float = Field(default=50.0, gt=0)
    tenant_burst: int = Field(default=100, ge=1)
    #: Per-tenant tasks not yet ended (queued or running), unless the tenant has its own.
    tenant_max_in_flight: int = Field(default=1000, ge=1)
    #: Largest request body the gateway reads (bytes); a larger one is refused with 413 unread.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: How often the relay looks for unpublished first jobs (the outbox), step events and task ends.
    relay_interval_s: float = Field(default=0.2, gt=0)
    #: How long a publish from the request path may wait for the broker before the outbox takes over.
    publish_timeout_s: float = Field(default=2.0, gt=0)
    #: How often an open ``GET /v1/tasks/{id}/events`` stream looks for new steps in the database.
    events_poll_interval_s: float = Field(default=0.25, gt=0)
    #: Seconds without an event after which the stream sends a keep-alive comment (proxies close idle streams).
    events_keepalive_s: float = Field(default=15.0, gt=0)
    #: On shutdown, how long the gateway lets open requests finish before cutting them. Event streams
    #: never finish by themselves; their clients resume on another replica with ``Last-Event-ID``.
    shutdown_grace_s: float = Field(default=5.0, ge=0)

    @field_validator("tools_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in {"amqp", "amqps", "pyamqp", "memory"}:
            raise ValueError(f"must be an amqp:// (RabbitMQ) or memory:// URL, got scheme {scheme!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme.startswith("postgres"):
            # One driver everywhere: psycopg 3.
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if not scheme.startswith("sqlite"):
            raise ValueError(f"must be a sqlite:/// or postgresql:// URL, got scheme {scheme!r}")
        return value

    @field_validator("planner_llm_url", "caller_llm_url", "summarizer_llm_url")
    @classmethod
    def _check_llm_urls(cls, value: str) -> str:
        urls = [url.strip() for url in value.split(",")]
        if not all(urls):
            raise ValueError("must be one or more comma-separated http(s)://host:port URLs, got an empty entry")
        checked = [_http_url(url) for url in urls]
        if len(set(checked)) != len(checked):
            raise ValueError("lists a replica twice")
        return ",".join(checked)

    @field_validator("gateway_url", "tools_virtual_url")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @model_validator(mode="after")
    def _check_context(self) -> Settings:
        try:
            prompt_budget(self.context_length, self.max_new_tokens)
        except PromptDoesNotFit as exc:
            raise ValueError(f"UMI_MAX_NEW_TOKENS / UMI_CONTEXT_LENGTH: {exc}") from exc
        return self

    @model_validator(mode="after")
    def _check_mirror(self) -> Settings:
        if self.tools_mirror is not None and not self.tools_mirror.is_file():
            raise ValueError(f"UMI_TOOLS_MIRROR: file not found: {self.tools_mirror}")
        return self

    @model_validator(mode="after")
    def _check_router(self) -> Settings:
        if self.llm_router:
            for role in LLMRole:
                if len(self.llm_urls(role)) > 1:
                    raise ValueError(f"UMI_{role.value.upper()}_LLM_URL: UMI_LLM_ROUTER=true takes one router URL per role, got several")
        return self

    def llm_urls(self, role: LLMRole) -> list[str]:
        """The base URLs of ``role``'s SGLang replicas (one entry: one server, or a router)."""
        return self.llm_url(role).split(",")

    def llm_url(self, role: LLMRole) -> str:
        """``role``'s ``UMI_<ROLE>_LLM_URL``: its replicas' base URLs, comma-separated."""
        return {
            LLMRole.PLANNER: self.planner_llm_url,
            LLMRole.CALLER: self.caller_llm_url,
            LLMRole.SUMMARIZER: self.summarizer_llm_url,
        }[role]


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (plus overrides), with readable errors."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = f"UMI_{field.upper()}" if err["loc"] else "settings"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings object (read once)."""
    return load_settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and ``umi up`` change the environment)."""
    get_settings.cache_clear()
