"""The planner worker service: consumes only the ``umi.planner`` queue and calls the planner's SGLang server.

Run it with ``umi worker planner [--concurrency N]``, or with the plain ``celery`` command on
the module-level ``app`` (``celery -A services.planner.worker worker -Q umi.planner -P threads``);
start more processes to scale it.
"""

from __future__ import annotations

from celery import Celery

from services.planner.handler import handle_planner_job
from shared.llm_step import grammar_backend_check
from shared.roles import LLMRole, StepRole
from shared.settings import Settings, get_settings
from shared.worker import create_worker_app, module_app

ROLE = StepRole.PLANNER


def create_app(settings: Settings | None = None) -> Celery:
    """The planner worker's Celery app, consuming ``umi.planner``."""
    return create_worker_app(
        ROLE, handle_planner_job, settings or get_settings(), start_up=grammar_backend_check(LLMRole.PLANNER)
    )


#: The module-level Celery app (``celery -A services.planner.worker``), built from the
#: environment on first use; importing this module reads no settings.
app: Celery
__getattr__ = module_app(create_app)
