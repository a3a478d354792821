"""Celery glue shared by the four role workers: the step task, its runtime, and how to run it.

Each ``services/<role>/worker.py`` calls :func:`create_worker_app` with its
handler; the app consumes only that role's queue. A message reaches the step task
only once the consumer has checked its shape (:mod:`shared.envelope`); the task
validates the job, runs the handler (:func:`run_job`) and turns what happens into
broker actions:

* a malformed job or an impossible step → the whole message to the dead-letter
  queue, with the reason;
* the database or broker unreachable → the handler is retried in place with
  backoff (the message stays unacked) for up to ``UMI_INFRA_RETRY_S``; only then
  is it given back with ``Reject(requeue=True)``, which spends one of the quorum
  queue's deliveries;
* any other error → the task ends at once, ``failed`` / ``internal_error``, with
  the error bounded and redacted.

A worker that stops on an unrecoverable error exits non-zero (:func:`run_worker`).
Each job is counted in :mod:`shared.metrics` (queue wait, in progress, retries and
dead letters by kind); the start-up serves them on ``UMI_METRICS_PORT``.

The plain ``celery`` command runs a role exactly as ``umi worker`` does, because
what a role worker does before it consumes hangs on Celery's own worker signals
(:func:`prepare_worker`, a unique node name, only the role's queue)::

    celery -A services.caller.worker worker -Q umi.caller -P threads -c 32
    umi worker caller --concurrency 32 -- --max-tasks-per-child 100   # the same, options passed on
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import click
import stamina
from celery import Celery, signals
from celery.app import trace
from celery.bin.celery import celery as celery_command
from celery.exceptions import Reject
from celery.utils.nodenames import default_nodename
from celery.worker.request import Request
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.message import Message
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from shared.celery_app import create_celery_app, dead_letter_message, worker_node_name
from shared.db import SchemaOutOfDate, ensure_schema_current
from shared.dispatch import CeleryDispatcher
from shared.envelope import describe_validation_error
from shared.lifecycle import EndReason
from shared.metrics import (
    PUBLISHED_AT_HEADER,
    DeadLetterKind,
    RetryKind,
    initialize_role_metrics,
    job_in_progress,
    observe_queue_wait,
    observe_retries,
    serve_metrics,
)
from shared.pipeline import JobOutcome, PoisonJob, Runtime, end_task
from shared.redaction import bound_text, secrets_redactor
from shared.roles import StepRole
from shared.schemas import StepJob
from shared.settings import ConfigurationError, Settings
from shared.topology import Topology, task_name

__all__ = [
    "InfrastructureUnavailable",
    "StartUp",
    "StepHandler",
    "create_worker_app",
    "is_transient",
    "module_app",
    "prepare_worker",
    "run_job",
    "run_worker",
    "start_worker_thread",
    "worker_arguments",
]

logger = logging.getLogger(__name__)

StepHandler = Callable[..., JobOutcome]
#: A role's start-up check: builds its resources from the runtime; raises ``ConfigurationError``.
StartUp = Callable[[Runtime], None]
#: The request attribute that hands the step task the message as received.
RECEIVED_MESSAGE = "umi_message"
#: Backoff of the in-place retries: 0.1 s doubling up to 2 s, with up to 0.5 s of jitter.
INFRA_WAIT_INITIAL_S, INFRA_WAIT_MAX_S, INFRA_WAIT_JITTER_S = 0.1, 2.0, 0.5


class InfrastructureUnavailable(Exception):
    """The database or broker stayed unreachable for the whole in-place retry budget."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database or broker is unreachable for now (retrying may help).

    Data errors (a value PostgreSQL refuses, a constraint) are not transient: retrying
    them cannot help.
    """
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError))
    return isinstance(exc, (PoolTimeoutError, DisconnectionError, KombuOperationalError, ConnectionError, TimeoutError))


def run_job(handler: StepHandler, job: StepJob, rt: Runtime, *, redelivered: bool) -> JobOutcome:
    """Run ``handler`` on ``job``: transient failures retried in place, anything unknown ends the task.

    Handlers are idempotent, so a retry is what a redelivery would be, without spending
    one of the queue's deliveries; a retry counts as redelivered (this copy may have left
    a tool-call claim behind). Raises :class:`~shared.pipeline.PoisonJob` (dead-letter
    the message) and :class:`InfrastructureUnavailable` (give it back to the queue).
    """
    try:
        return _retrying_in_place(job, rt, lambda attempt: handler(job, rt, redelivered=redelivered or attempt > 1))
    except PoisonJob:
        raise
    except InfrastructureUnavailable:
        raise
    except Exception as exc:
        error = f"{job.role.value} worker: {_describe(exc)}"  # end_task masks and bounds it
        logger.error(
            "task %s step %d: unexpected error, ending the task: %s",
            job.task_id, job.step_index, bound_text(secrets_redactor(rt.settings)(traceback.format_exc())),
        )
        return _retrying_in_place(
            job,
            rt,
            lambda _attempt: end_task(job, rt, reason=EndReason.INTERNAL_ERROR, error=error),
        )


def _retrying_in_place(job: StepJob, rt: Runtime, call: Callable[[int], JobOutcome]) -> JobOutcome:
    """``call(attempt)`` until it returns, retrying transient failures for ``UMI_INFRA_RETRY_S``."""
    budget = rt.settings.infra_retry_s
    try:
        for attempt in stamina.retry_context(
            on=is_transient,
            attempts=None,
            timeout=budget,
            wait_initial=INFRA_WAIT_INITIAL_S,
            wait_max=INFRA_WAIT_MAX_S,
            wait_jitter=INFRA_WAIT_JITTER_S,
        ):
            with attempt:
                if attempt.num > 1:
                    observe_retries(job.role.value, RetryKind.IN_PLACE)
                    logger.warning("database or broker unreachable; attempt %d (retrying for %.0fs)", attempt.num, budget)
                return call(attempt.num)
    except Exception as exc:
        if is_transient(exc):
            raise InfrastructureUnavailable(f"still unreachable after {budget:.0f}s: {_describe(exc)}") from exc
        raise
    raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover


def _describe(exc: BaseException) -> str:
    """``Type: message``; for a database error the driver's own, without SQLAlchemy's statement and parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    return f"{type(exc).__name__}: {exc}"


class _RuntimeHolder:
    """One runtime per worker process, built on first use (threads share it)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()

    def get(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                # No pre-ping: run_job retries a stale connection's error in place (shared/db.py).
                self._runtime = Runtime(settings=self._settings, dispatcher=CeleryDispatcher(self._app), pre_ping=False)
            return self._runtime


class StepRequest(Request):
    """Celery's request, also handing the step task the message as received.

    So a job the task refuses is dead-lettered whole (body, content type, headers),
    not rebuilt from its decoded argument.
    """

    def __init__(self, message: Message, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self._request_dict[RECEIVED_MESSAGE] = message


def create_worker_app(
    role: StepRole, handler: StepHandler, settings: Settings, *, start_up: StartUp | None = None
) -> Celery:
    """The Celery app of one role's worker, with its step task registered.

    ``start_up`` checks the role's configuration before the worker consumes anything
    (:func:`run_worker` and :func:`start_worker_thread` call it): it builds the role's
    resources from the runtime and raises ``ConfigurationError`` naming what is wrong.
    """
    app = create_celery_app(settings, name=f"umi.{role.value}")
    # Defaults of a plain `celery worker` (its -P / -c override them); the role marks the app
    # for the worker signals below.
    app.conf.update(worker_pool="threads", worker_concurrency=settings.worker_concurrency, umi_role=role)
    runtime = _RuntimeHolder(app, settings)

    def start() -> None:
        if start_up is not None:
            start_up(runtime.get())
        else:
            runtime.get()
        initialize_role_metrics(role.value)
        serve_metrics(settings.metrics_port)

    app.conf.umi_start_up = start

    def dead_letter(request: Any, reason: str, kind: DeadLetterKind) -> str:
        message = getattr(request, RECEIVED_MESSAGE, None)
        if message is None:  # run eagerly (task.apply): there is no message to park
            raise PoisonJob(reason)
        try:
            dead_letter_message(app, message, reason, kind=kind)
        except Exception as exc:
            # Cannot park it now: give it back; it is refused again on its next delivery.
            raise Reject(f"could not dead-letter: {exc}", requeue=True) from exc
        return "dead_lettered"

    class AppStepRequest(StepRequest):
        def on_accepted(self, pid: int, time_accepted: float) -> None:
            # Called in the pool's thread just before the task is traced, which looks its name up in the
            # thread's current app (else the process default): this one, with several apps in one process.
            app.set_current()
            super().on_accepted(pid, time_accepted)

    # shared=False: this app only (by default Celery adds the task to every app finalized later, where
    # the name runs the first app's step with its runtime: `umi up` and tests build several apps).
    @app.task(name=task_name(role), bind=True, acks_late=True, reject_on_worker_lost=True, Request=AppStepRequest, shared=False)
    def step(self: Any, payload: Any) -> str:
        observe_queue_wait(role.value, getattr(self.request, PUBLISHED_AT_HEADER, None))
        with job_in_progress(role.value):
            return run_step(self.request, payload)

    def run_step(request: Any, payload: Any) -> str:
        try:
            job = StepJob.model_validate(payload)
        except ValidationError as exc:
            return dead_letter(request, f"invalid {role.value} job: {describe_validation_error(exc)}", DeadLetterKind.INVALID_JOB)
        if job.role is not role:
            return dead_letter(request, f"a {role.value} worker cannot run a {job.role.value} job", DeadLetterKind.WRONG_ROLE)
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        if redelivered:
            observe_retries(role.value, RetryKind.REDELIVERED)
        try:
            outcome = run_job(handler, job, runtime.get(), redelivered=redelivered)
        except PoisonJob as exc:
            return dead_letter(request, str(exc), DeadLetterKind.IMPOSSIBLE_STEP)
        except InfrastructureUnavailable as exc:
            logger.warning("task %s step %d: %s; giving the message back", job.task_id, job.step_index, exc)
            observe_retries(role.value, RetryKind.REQUEUE)
            raise Reject(str(exc), requeue=True) from exc
        logger.info("task %s step %d (%s): %s", job.task_id, job.step_index, role.value, outcome)
        return outcome.value

    return app


def module_app(create_app: Callable[[], Celery]) -> Callable[[str], Celery]:
    """A worker module's ``__getattr__`` giving it a module-level ``app``, built on first use.

    ``celery -A services.<role>.worker`` finds ``app`` there; importing the module reads no
    settings and needs no broker.
    """
    cache: list[Celery] = []

    def __getattr__(name: str) -> Celery:
        if name != "app":
            raise AttributeError(name)
        if not cache:
            cache.append(create_app())
        return cache[0]

    return __getattr__


def _start_up(app: Celery) -> None:
    """Run the role's start-up check (builds the runtime and the role's resources), then serve its metrics
    on ``UMI_METRICS_PORT`` (if set) before anything is consumed."""
    app.conf.umi_start_up()


def prepare_worker(app: Celery) -> None:
    """What a role worker does before it consumes, however it is started; once per app.

    Refuses an outdated schema (``SchemaOutOfDate``), declares the whole topology, and
    runs the role's start-up check (``ConfigurationError`` naming what is wrong).
    """
    if getattr(app.conf, "umi_prepared", False):
        return
    settings: Settings = app.conf.umi_settings
    ensure_schema_current(settings.database_url)
    with app.connection_for_write() as connection:
        Topology(settings).declare(connection)  # the whole topology, before consuming
    _start_up(app)
    app.conf.umi_prepared = True


def _stop_at_start(app: Celery, exc: Exception) -> None:
    """Stop a worker whose configuration cannot work: the message on stderr, exit code 2."""
    print(f"{app.main} worker: {exc}", file=sys.stderr)
    raise SystemExit(2) from exc


@signals.celeryd_init.connect
def _on_worker_init(sender: str, instance: Any, **_: Any) -> None:
    """``celery worker`` (and ``umi worker``) of a role app: prepare it and give it a unique node name."""
    app = instance.app
    role: StepRole | None = getattr(app.conf, "umi_role", None)
    if role is None:  # not a role worker's app
        return
    try:
        prepare_worker(app)
    except (ConfigurationError, SchemaOutOfDate) as exc:
        _stop_at_start(app, exc)
    except Exception:
        # Celery would log a signal handler's error and start the worker anyway, unchecked.
        logger.exception("%s worker: cannot start", role.value)
        raise SystemExit(1) from None
    if instance.hostname == default_nodename(None):  # no -n given
        # A restarted container keeps its host name; the broker may still hold its dead
        # self's node queues (RESOURCE_LOCKED), so each process names itself anew.
        instance.hostname = worker_node_name(role)
        trace.setup_worker_optimizations(app, instance.hostname)


@signals.celeryd_after_setup.connect
def _on_worker_setup(sender: str, instance: Any, **_: Any) -> None:
    """A role worker consumes its own queue only: the default without ``-Q``; another queue is refused."""
    app = instance.app
    role: StepRole | None = getattr(app.conf, "umi_role", None)
    if role is None:
        return
    own = Topology(app.conf.umi_settings).queue_name(role)
    queues = app.amqp.queues
    selected = set(queues.consume_from)
    if selected == set(queues):  # no -Q: Celery would consume every queue of the topology
        queues.select([own])
    elif selected != {own}:
        _stop_at_start(
            app, ConfigurationError(f"a {role.value} worker consumes only {own} (-Q {own}), not {', '.join(sorted(selected))}")
        )


def worker_arguments(role: StepRole, settings: Settings, *, concurrency: int, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments ``umi worker <role>`` runs with."""
    return [
        "worker",
        "--queues", Topology(settings).queue_name(role),
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "--loglevel", loglevel.upper(),
        # No peer-to-peer chatter between workers: they share nothing but the queues.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def run_worker(
    app: Celery,
    role: StepRole,
    settings: Settings,
    *,
    concurrency: int,
    loglevel: str = "INFO",
    celery_args: Sequence[str] = (),
) -> int:
    """Run the worker in the foreground (``umi worker <role>``) until SIGTERM/SIGINT; its exit code.

    It is Celery's own ``celery worker`` command on ``app`` with :func:`worker_arguments`
    and then ``celery_args`` (any further ``celery worker`` option; a later one wins).
    The role's start-up check runs first (its ``ConfigurationError`` propagates). The
    code is 0 after a warm shutdown and non-zero when the worker stopped on an
    unrecoverable error, so a supervisor sees the failure.
    """
    prepare_worker(app)
    argv = [*worker_arguments(role, settings, concurrency=concurrency, loglevel=loglevel), *celery_args]
    celery_command.params[0].default = app  # the command's -A, as Celery.start() sets it
    try:
        code = celery_command.main(args=argv, prog_name="celery", standalone_mode=False)
    except click.ClickException as exc:  # a forwarded option Celery does not know
        exc.show()
        return exc.exit_code
    finally:
        celery_command.params[0].default = None
    return int(code or 0)


def start_worker_thread(app: Celery, role: StepRole, settings: Settings, *, concurrency: int) -> Callable[[], None]:
    """Run the worker inside this process (embedded mode); returns a function that stops it."""
    _start_up(app)
    queue = Topology(settings).queue_name(role)
    controller = app.WorkController(
        hostname=worker_node_name(role),
        queues=[queue],
        pool_cls="threads",
        concurrency=concurrency,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel=logging.WARNING,
    )
    thread = threading.Thread(target=controller.start, name=f"worker:{role.value}", daemon=True)
    thread.start()

    def stop() -> None:
        controller.stop(in_sighandler=False)
        thread.join(10)

    return stop
