"""The summarizer worker service: consumes only the ``umi.summarizer`` queue and calls the summarizer's SGLang server.

Run it with ``umi worker summarizer [--concurrency N]``, or with the plain ``celery`` command on
the module-level ``app`` (``celery -A services.summarizer.worker worker -Q umi.summarizer -P threads``);
start more processes to scale it.
"""

from __future__ import annotations

from celery import Celery

from services.summarizer.handler import handle_summarizer_job
from shared.roles import StepRole
from shared.settings import Settings, get_settings
from shared.worker import create_worker_app, module_app

ROLE = StepRole.SUMMARIZER


def create_app(settings: Settings | None = None) -> Celery:
    """The summarizer worker's Celery app, consuming ``umi.summarizer``."""
    return create_worker_app(ROLE, handle_summarizer_job, settings or get_settings())


#: The module-level Celery app (``celery -A services.summarizer.worker``), built from the
#: environment on first use; importing this module reads no settings.
app: Celery
__getattr__ = module_app(create_app)
