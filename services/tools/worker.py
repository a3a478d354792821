"""The tools worker service: consumes only the ``umi.tools`` queue and calls the tools (HTTP APIs, the mirror, Python functions).

Run it with ``umi worker tools [--concurrency N]``, or with the plain ``celery`` command on
the module-level ``app`` (``celery -A services.tools.worker worker -Q umi.tools -P threads``);
start more processes to scale it.
"""

from __future__ import annotations

from celery import Celery

from services.tools.errors import ToolSetupError
from services.tools.handler import handle_tools_job, tool_executor
from shared.metrics import initialize_tool_metrics
from shared.pipeline import Runtime
from shared.roles import StepRole
from shared.settings import ConfigurationError, Settings, get_settings
from shared.worker import create_worker_app, module_app

ROLE = StepRole.TOOLS


def check_tools(rt: Runtime) -> None:
    """Build the tool executor before consuming: a bad mirror or catalog stops the worker at start."""
    try:
        executor = tool_executor(rt)
    except ToolSetupError as exc:
        raise ConfigurationError(f"the tools worker cannot start: {exc}") from None
    # Calls are counted per backend: export each configured backend's series at zero from the start.
    initialize_tool_metrics([backend.name for backend in executor.backends])


def create_app(settings: Settings | None = None) -> Celery:
    """The tools worker's Celery app, consuming ``umi.tools``."""
    return create_worker_app(ROLE, handle_tools_job, settings or get_settings(), start_up=check_tools)


#: The module-level Celery app (``celery -A services.tools.worker``), built from the
#: environment on first use; importing this module reads no settings.
app: Celery
__getattr__ = module_app(create_app)
