"""The caller worker service: consumes only the ``umi.caller`` queue and calls the caller's SGLang server.

Run it with ``umi worker caller [--concurrency N]``, or with the plain ``celery`` command on
the module-level ``app`` (``celery -A services.caller.worker worker -Q umi.caller -P threads``);
start more processes to scale it.
"""

from __future__ import annotations

from celery import Celery

from services.caller.handler import handle_caller_job
from shared.llm_step import grammar_backend_check
from shared.roles import LLMRole, StepRole
from shared.settings import Settings, get_settings
from shared.worker import create_worker_app, module_app

ROLE = StepRole.CALLER


def create_app(settings: Settings | None = None) -> Celery:
    """The caller worker's Celery app, consuming ``umi.caller``."""
    return create_worker_app(
        ROLE, handle_caller_job, settings or get_settings(), start_up=grammar_backend_check(LLMRole.CALLER)
    )


#: The module-level Celery app (``celery -A services.caller.worker``), built from the
#: environment on first use; importing this module reads no settings.
app: Celery
__getattr__ = module_app(create_app)
