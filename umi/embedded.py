"""``umi up``: the whole system in one process, on a machine with no GPU and no broker.

SQLite, an in-process broker (kombu's ``memory://``), the four role workers and the
AMQP ingress consumer as threads, the SGLang simulator (one server per LLM role, clearly labelled) and
the mirror tools on the bundled example trajectories — each replaced by the
real thing when its ``UMI_*`` variable is set (``UMI_BROKER_URL``,
``UMI_DATABASE_URL``, ``UMI_<ROLE>_LLM_URL``, ``UMI_TOOLS_MIRROR``). The code
that runs is the same as in the multi-process deployment. With the in-process broker the
ingress takes only messages published inside this process; with ``UMI_BROKER_URL`` it
consumes the real ``umi.ingress`` queue.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import make_url

from shared.asgi import ServerThread
from shared.db import upgrade_schema
from shared.example_data import BUNDLED_TRAJECTORIES
from shared.roles import LLMRole
from shared.settings import Settings, load_settings
from shared.topology import QUEUE_ROLES
from shared.worker import start_worker_thread

__all__ = ["BUNDLED_TRAJECTORIES", "EmbeddedSystem", "embedded_settings"]

logger = logging.getLogger(__name__)

EMBEDDED_BROKER_URL = "memory://localhost/"


def embedded_settings(environ: dict[str, str] | None = None, **overrides: object) -> tuple[Settings, list[LLMRole]]:
    """Settings for ``umi up`` and the LLM roles that need a simulator (no URL configured)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    if "UMI_BROKER_URL" not in env:
        values["broker_url"] = EMBEDDED_BROKER_URL
    if "UMI_AUTH" not in env:
        values["auth"] = False  # a laptop's system; the gateway says so at start-up
    if "UMI_TOOLS_MIRROR" not in env:
        values["tools_mirror"] = BUNDLED_TRAJECTORIES
    simulated = [role for role in LLMRole if f"UMI_{role.value.upper()}_LLM_URL" not in env]
    values.update(overrides)
    return load_settings(**values), simulated


@dataclass
class EmbeddedSystem:
    """The running pieces of ``umi up``; :meth:`stop` shuts them down in reverse order."""

    settings: Settings
    simulators: dict[LLMRole, ServerThread] = field(default_factory=dict)
    gateway: ServerThread | None = None
    _stops: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        concurrency: int = 8,
        simulator_data: list[Path] | None = None,
        environ: dict[str, str] | None = None,
        with_gateway: bool = True,
        **overrides: object,
    ) -> EmbeddedSystem:
        """Start simulators, workers and (unless ``with_gateway=False``) the gateway.

        Returns once everything accepts work. ``overrides`` are settings fields.
        """
        from services.gateway.app import create_app as create_gateway
        from services.ingress.consumer import start_ingress_thread
        from services.simulator import SimulatorConfig
        from services.simulator import create_app as create_simulator

        settings, simulated = embedded_settings(environ, **overrides)
        system = cls(settings=settings)
        try:
            urls: dict[str, object] = {}
            for role in simulated:
                config = SimulatorConfig(data=simulator_data or [BUNDLED_TRAJECTORIES], role=role.value)
                server = ServerThread(create_simulator(config), host="127.0.0.1").start()
                system.simulators[role] = server
                system._stops.append(server.stop)
                urls[f"{role.value}_llm_url"] = server.url
            system.settings = settings = settings.model_copy(update=urls)
            upgrade_schema(settings.database_url)
            for role in QUEUE_ROLES:
                app = importlib.import_module(f"services.{role.value}.worker").create_app(settings)
                system._stops.append(start_worker_thread(app, role, settings, concurrency=concurrency))
            system._stops.append(start_ingress_thread(settings))
            if with_gateway:
                system.gateway = ServerThread(create_gateway(settings), host=host, port=port).start()
                system._stops.append(system.gateway.stop)
        except BaseException:
            system.stop()
            raise
        return system

    def describe(self) -> list[str]:
        """Human-readable lines saying what runs where."""
        lines = [f"gateway      {self.gateway.url if self.gateway else '-'}  (POST /v1/tasks, GET /v1/tasks/{{id}})"]
        for role in LLMRole:
            if role in self.simulators:
                lines.append(f"{role.value:<12} SGLang SIMULATOR at {self.simulators[role].url} (replays recorded data; not inference)")
            else:
                lines.append(f"{role.value:<12} SGLang server at {self.settings.llm_url(role)}")
        lines.append(f"broker       {maybe_sanitize_url(self.settings.broker_url)}")
        lines.append(f"database     {make_url(self.settings.database_url).render_as_string(hide_password=True)}")
        lines.append(f"tools        mirror of {self.settings.tools_mirror}" if self.settings.tools_mirror else "tools        no mirror")
        lines.append("workers      " + ", ".join(role.value for role in QUEUE_ROLES) + " (threads in this process)")
        if self.settings.broker_url == EMBEDDED_BROKER_URL:
            lines.append("ingress      umi.ingress on the in-process broker: only messages published inside this process "
                         "(set UMI_BROKER_URL for other backends)")
        else:
            lines.append(f"ingress      {self.settings.queue_prefix}.ingress (JSON tasks from any AMQP client; docs/ingress.md)")
        return lines

    def stop(self) -> None:
        """Stop everything that was started."""
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:  # keep stopping the rest
                logger.exception("error while stopping")


