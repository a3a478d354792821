"""Every Prometheus metric of the product, defined once (prometheus-client).

Each process exports its own metrics: a role worker on ``UMI_METRICS_PORT``
(:func:`serve_metrics`, started before it consumes), the gateway at ``/metrics`` on
its HTTP port (:func:`exposition`; under ``umi up`` that includes the embedded workers,
which share the process). A scrape of every process, summed, counts each event once:

* a **job** (queue wait, in progress, retries, dead letters) is counted by the worker
  that took it;
* a **stored step** (``umi_step_duration_seconds``) by the worker whose transaction
  stored it (:func:`observe_stored_step`, called by :func:`shared.pipeline.store_step`);
* a **relay publish** (``umi_relay_published_total``) by the process whose relay got the
  broker's confirm (at least once: a relay that dies before its mark publishes again);
* a **task end** (``umi_tasks_total`` and the task histograms) by whichever process
  commits the transaction that ends it — a worker, or the gateway's cancel or
  sweep — seen by a SQLAlchemy session hook, so every ``lifecycle.finish``
  is counted once it is committed and never twice (a task ends once).

The workers run Celery's **threads** pool: one process, no fork, so the plain default
registry is correct and prometheus-client's multiprocess mode is not needed (a
``prefork`` pool would lose its children's samples; umi never starts one).

LLM requests are not streamed, so there is no time-to-first-token histogram: the
SGLang servers' own ``sglang:time_to_first_token_seconds`` measures it.
The meaning of each metric is tabled in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest, start_http_server
from sqlalchemy import event, func, inspect, select
from sqlalchemy.orm import Session

from shared.lifecycle import TERMINAL_STATUSES, TaskStatus
from shared.models import Step, Task
from shared.roles import LLMRole
from shared.settings import ConfigurationError

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "DeadLetterKind",
    "EVENT_STREAMS_OPEN",
    "LLM_REQUEST_DURATION",
    "LLM_TOKENS",
    "RetryKind",
    "PUBLISHED_AT_HEADER",
    "StepPhase",
    "step_phase",
    "exposition",
    "job_in_progress",
    "observe_dead_letter",
    "observe_queue_wait",
    "observe_retries",
    "observe_stored_step",
    "observe_tool_call",
    "initialize_ingress_metrics",
    "initialize_role_metrics",
    "initialize_tool_metrics",
    "serve_metrics",
    "RelayKind",
    "initialize_relay_metrics",
    "observe_outbox_deferred",
    "observe_relay_error",
    "observe_relay_published",
    "set_relay_backlog",
]

logger = logging.getLogger(__name__)

#: Seconds, 10 ms to 10 min: a queue wait or tool call of milliseconds up to a long LLM step.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Steps per task: α-UMi tasks take a handful (planner, caller, tools, …, summarizer).
STEP_COUNT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50)
#: The Celery message header carrying the publish time (Unix seconds); messages without it are not timed.
PUBLISHED_AT_HEADER = "umi_published_at"
#: The content type of :func:`exposition`.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RetryKind(StrEnum):
    """What was tried again (the ``kind`` of ``umi_retries_total``)."""

    #: The database or broker was unreachable; the handler ran again in place.
    IN_PLACE = "in_place"
    #: The in-place budget ran out; the message went back to its queue.
    REQUEUE = "requeue"
    #: The broker delivered a message again (its earlier delivery was not acked).
    REDELIVERED = "redelivered"
    #: An SGLang request was sent again (connection error, timeout, 5xx, 408/429).
    LLM = "llm"
    #: A tool backend was called again.
    TOOL = "tool"


class DeadLetterKind(StrEnum):
    """Why a message was dead-lettered, as a fixed set (the ``reason`` of ``umi_dead_letters_total``).

    The full reason text travels with the dead letter itself (``umi dead-letters list``).
    """

    #: Not a umi task message: shape, size, content type, encoding or unknown task.
    MALFORMED = "malformed"
    #: A task message whose job does not validate.
    INVALID_JOB = "invalid_job"
    #: A job for another role than the worker's.
    WRONG_ROLE = "wrong_role"
    #: A valid job the stored trajectory refuses (unknown task, impossible step).
    IMPOSSIBLE_STEP = "impossible_step"
    #: AMQP ingress: an envelope or task that does not validate, or an idempotency key reused.
    INVALID_ENVELOPE = "invalid_envelope"
    #: AMQP ingress: no live API key in ``x-api-key``.
    UNAUTHENTICATED = "unauthenticated"
    #: AMQP ingress: over the tenant's request rate or tasks in flight.
    RATE_LIMITED = "rate_limited"


class StepPhase(StrEnum):
    """The parts of handling a job that are the system's own cost, around the model or tool call
    (that call is ``umi_step_duration_seconds``; the wait before it is ``umi_queue_wait_seconds``)."""

    #: ``open_step``: the task and its steps read from the database.
    READ = "read"
    #: The prompt rendered and the SGLang request built (LLM roles).
    PREPARE = "prepare"
    #: The step stored with its task's update, committed.
    STORE = "store"
    #: The follow-up job published and confirmed by the broker.
    PUBLISH = "publish"


#: Seconds, 0.25 ms to 1 s: a phase is a few database or broker round trips.
PHASE_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)
STEP_PHASE_DURATION = Histogram(
    "umi_step_phase_seconds",
    "Wall time of each phase of handling a job: read, prepare, store, publish (the system's own cost).",
    ["role", "phase"],
    buckets=PHASE_BUCKETS,
)
STEP_PHASE_CPU = Counter(
    "umi_step_phase_cpu_seconds_total", "CPU time the handling thread spent in each phase of handling jobs.", ["role", "phase"]
)
QUEUE_WAIT = Histogram(
    "umi_queue_wait_seconds", "Time from a job's publish to a worker starting it.", ["role"], buckets=DURATION_BUCKETS
)
STEP_DURATION = Histogram(
    "umi_step_duration_seconds",
    "Work time of each stored step (its latency_s: LLM requests or the tool call); "
    "outcome: continued, or the status the step ended its task with.",
    ["role", "outcome"],
    buckets=DURATION_BUCKETS,
)
LLM_REQUEST_DURATION = Histogram(
    "umi_llm_request_duration_seconds",
    "Duration of each SGLang /generate request (all its HTTP attempts); outcome ok or error.",
    ["role", "outcome"],
    buckets=DURATION_BUCKETS,
)
LLM_TOKENS = Counter(
    "umi_llm_tokens_total", "Tokens of the SGLang requests, by kind: prompt, completion, cached (prompt tokens from the prefix cache).", ["role", "kind"]
)
LLM_REPLICA_REQUESTS = Counter(
    "umi_llm_replica_requests_total",
    "HTTP attempts of SGLang requests per replica (host:port) of a role; outcome ok or error.",
    ["role", "replica", "outcome"],
)
LLM_REPLICA_UP = Gauge(
    "umi_llm_replica_up", "1 while a role's SGLang replica (host:port) is taken as healthy, 0 while it is skipped.", ["role", "replica"]
)
TOOL_CALL_DURATION = Histogram(
    "umi_tool_call_duration_seconds",
    "Duration of each tool call run (all its backend attempts); outcome ok or error.",
    ["tool_backend", "outcome"],
    buckets=DURATION_BUCKETS,
)
TASKS = Counter("umi_tasks_total", "Tasks ended, by terminal status.", ["status"])
TASK_DURATION = Histogram(
    "umi_task_duration_seconds", "Time from a task's creation to its end.", buckets=DURATION_BUCKETS
)
TASK_STEPS = Histogram(
    "umi_task_steps", "Steps stored for a task when it ends (step 0, the query, included).", buckets=STEP_COUNT_BUCKETS
)
RETRIES = Counter("umi_retries_total", "Retries, by kind (in_place, requeue, redelivered, llm, tool).", ["role", "kind"])
DEAD_LETTERS = Counter(
    "umi_dead_letters_total",
    "Messages dead-lettered, by reason kind (malformed, invalid_job, wrong_role, impossible_step; "
    "the ingress also invalid_envelope, unauthenticated, rate_limited).",
    ["role", "reason"],
)
JOBS_IN_PROGRESS = Gauge("umi_jobs_in_progress", "Jobs a worker is running now.", ["role"])
EVENT_STREAMS_OPEN = Gauge("umi_event_streams_open", "Server-sent event streams (GET /v1/tasks/{id}/events) open now.")


class RelayKind(StrEnum):
    """What the relay published (the ``kind`` of ``umi_relay_published_total``) or where it failed."""

    #: A task's first planner job, left to the outbox by its request path.
    OUTBOX = "outbox"
    #: A stored step on ``umi.events`` (``task.<id>.step``).
    STEP = "step"
    #: A task's final state on ``umi.events`` (``task.<id>.end``).
    END = "end"
    #: A task's final state to its AMQP ``reply_to``.
    REPLY = "reply"


RELAY_PUBLISHED = Counter(
    "umi_relay_published_total", "Messages the relay published, broker-confirmed, by kind (outbox, step, end, reply).", ["kind"]
)
RELAY_ERRORS = Counter(
    "umi_relay_errors_total", "Relay passes that failed (broker or database away), by kind of work (outbox, step, end).", ["kind"]
)
OUTBOX_DEFERRED = Counter(
    "umi_outbox_deferred_total", "Tasks accepted whose first job the request path could not publish (the relay publishes it)."
)
OUTBOX_BACKLOG = Gauge("umi_outbox_backlog", "Active tasks whose first job the broker has not confirmed yet (database-wide).")
RELAY_LAG = Gauge("umi_relay_lag_seconds", "Age of the oldest stored step whose event is not published yet (0: none; database-wide).")


def initialize_role_metrics(role: str) -> None:
    """Create ``role``'s labelled series at zero before its worker consumes.

    A series that appears only at its first event hides that event from ``rate()`` and
    ``increase()`` (there is no earlier sample to compare with) and from alerts, so each
    worker exports every series it can move, at 0, from its start.
    """
    QUEUE_WAIT.labels(role=role)
    JOBS_IN_PROGRESS.labels(role=role)
    for phase in StepPhase:
        if phase is not StepPhase.PREPARE or role in {llm_role.value for llm_role in LLMRole}:
            STEP_PHASE_DURATION.labels(role=role, phase=phase.value)
            STEP_PHASE_CPU.labels(role=role, phase=phase.value)
    for outcome in ("continued", *(status.value for status in TERMINAL_STATUSES)):
        STEP_DURATION.labels(role=role, outcome=outcome)
    for kind in RetryKind:
        RETRIES.labels(role=role, kind=kind.value)
    for reason in DeadLetterKind:
        DEAD_LETTERS.labels(role=role, reason=reason.value)
    if role in {llm_role.value for llm_role in LLMRole}:
        for outcome in ("ok", "error"):
            LLM_REQUEST_DURATION.labels(role=role, outcome=outcome)
        for kind in ("prompt", "completion", "cached"):
            LLM_TOKENS.labels(role=role, kind=kind)
    for status in TERMINAL_STATUSES:
        TASKS.labels(status=status.value)


def initialize_tool_metrics(backends: list[str]) -> None:
    """Create the tool-call series of each configured backend at zero (the tools worker, at start)."""
    for backend in backends:
        for outcome in ("ok", "error"):
            TOOL_CALL_DURATION.labels(tool_backend=backend, outcome=outcome)


def initialize_relay_metrics() -> None:
    """Create the relay's labelled series at zero (a process that runs a relay calls it at start)."""
    for kind in RelayKind:
        RELAY_PUBLISHED.labels(kind=kind.value)
        if kind is not RelayKind.REPLY:  # replies are published in the end pass
            RELAY_ERRORS.labels(kind=kind.value)


def observe_relay_published(kind: RelayKind, count: int = 1) -> None:
    """Add ``count`` broker-confirmed relay publishes of ``kind``."""
    if count > 0:
        RELAY_PUBLISHED.labels(kind=kind.value).inc(count)


def observe_relay_error(kind: RelayKind) -> None:
    """Count one failed relay pass of ``kind``."""
    RELAY_ERRORS.labels(kind=kind.value).inc()


def observe_outbox_deferred() -> None:
    """Count one accepted task whose first job was left to the relay."""
    OUTBOX_DEFERRED.inc()


def set_relay_backlog(*, outbox: int, lag_s: float) -> None:
    """Set the outbox backlog and the step-event lag the relay measured this round."""
    OUTBOX_BACKLOG.set(outbox)
    RELAY_LAG.set(max(0.0, lag_s))


def initialize_ingress_metrics() -> None:
    """Create the AMQP ingress consumer's series (``role="ingress"``) at zero: its dead letters by kind."""
    for reason in DeadLetterKind:
        DEAD_LETTERS.labels(role="ingress", reason=reason.value)


@contextmanager
def step_phase(role: str, phase: StepPhase) -> Iterator[None]:
    """Time one phase of handling a job: its wall time and the CPU time of this thread."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        STEP_PHASE_DURATION.labels(role=role, phase=phase.value).observe(time.perf_counter() - started)
        STEP_PHASE_CPU.labels(role=role, phase=phase.value).inc(time.thread_time() - cpu_started)


def observe_queue_wait(role: str, published_at: Any) -> None:
    """Record a job's wait from ``published_at`` (the header's Unix seconds) to now; a missing or bad value is skipped.

    Publisher and worker may run on different hosts: a skewed clock never gives a negative wait.
    """
    if isinstance(published_at, bool) or not isinstance(published_at, (int, float)):
        return  # an older message, or a header someone else wrote
    QUEUE_WAIT.labels(role=role).observe(max(0.0, time.time() - float(published_at)))


def job_in_progress(role: str) -> Any:
    """A context manager counting the job in ``umi_jobs_in_progress{role}`` while it runs."""
    return JOBS_IN_PROGRESS.labels(role=role).track_inprogress()


def observe_retries(role: str, kind: RetryKind, count: int = 1) -> None:
    """Add ``count`` retries of ``kind`` (nothing when ``count`` is 0)."""
    if count > 0:
        RETRIES.labels(role=role, kind=kind.value).inc(count)


def observe_dead_letter(role: str, kind: DeadLetterKind) -> None:
    """Count one dead-lettered message."""
    DEAD_LETTERS.labels(role=role, reason=kind.value).inc()


def observe_stored_step(role: str, latency_s: float | None, end_status: TaskStatus | None) -> None:
    """Count one stored step of ``role`` (called once its transaction committed)."""
    outcome = "continued" if end_status is None else end_status.value
    STEP_DURATION.labels(role=role, outcome=outcome).observe(latency_s or 0.0)


def observe_llm_request(role: str, duration_s: float, *, ok: bool) -> None:
    """Count one SGLang /generate request."""
    LLM_REQUEST_DURATION.labels(role=role, outcome="ok" if ok else "error").observe(duration_s)


def observe_llm_tokens(role: str, *, prompt: int, completion: int, cached: int) -> None:
    """Add one request's tokens."""
    for kind, count in (("prompt", prompt), ("completion", completion), ("cached", cached)):
        LLM_TOKENS.labels(role=role, kind=kind).inc(count)


def observe_replica_request(role: str, replica: str, *, ok: bool) -> None:
    """Count one HTTP attempt on one SGLang replica."""
    LLM_REPLICA_REQUESTS.labels(role=role, replica=replica, outcome="ok" if ok else "error").inc()


def set_replica_up(role: str, replica: str, up: bool) -> None:
    """Record whether a replica is taken as healthy."""
    LLM_REPLICA_UP.labels(role=role, replica=replica).set(1 if up else 0)


def observe_tool_call(backend: str | None, duration_s: float, *, ok: bool) -> None:
    """Count one tool call run (``backend`` None: refused before any backend, e.g. an unknown tool)."""
    TOOL_CALL_DURATION.labels(tool_backend=backend or "none", outcome="ok" if ok else "error").observe(duration_s)


# --- task ends: counted when the transaction that ends a task commits ---------------
_ENDED = "umi_metrics_task_ends"


@event.listens_for(Session, "after_flush")
def _collect_task_ends(session: Session, _flush_context: Any) -> None:
    for obj in (*session.new, *session.dirty):
        if not isinstance(obj, Task):
            continue
        history = inspect(obj).attrs.status.history
        if not any(status in TERMINAL_STATUSES for status in history.added):
            continue
        # The steps flushed in this transaction (a final answer) are already counted here.
        steps = session.connection().scalar(select(func.count()).select_from(Step).where(Step.task_id == obj.id))
        duration = (obj.finished_at - obj.created_at).total_seconds() if obj.finished_at and obj.created_at else 0.0
        session.info.setdefault(_ENDED, []).append((TaskStatus(obj.status), duration, int(steps or 0)))


@event.listens_for(Session, "after_commit")
def _count_task_ends(session: Session) -> None:
    for status, duration, steps in session.info.pop(_ENDED, ()):
        TASKS.labels(status=status.value).inc()
        TASK_DURATION.observe(max(0.0, duration))
        TASK_STEPS.observe(steps)


@event.listens_for(Session, "after_rollback")
def _forget_task_ends(session: Session) -> None:
    session.info.pop(_ENDED, None)


# --- exposition ----------------------------------------------------------------------
_served_port: int | None = None
_serve_lock = threading.Lock()


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve this process's metrics over HTTP at ``/metrics`` on ``port`` (0: not at all).

    Once per process (the embedded workers share it); a port already taken raises ``ConfigurationError``.
    """
    global _served_port
    if port == 0:
        return
    with _serve_lock:
        if _served_port == port:
            return
        if _served_port is not None:
            raise RuntimeError(f"metrics are already served on port {_served_port}, not {port}")
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            raise ConfigurationError(f"UMI_METRICS_PORT: cannot serve metrics on {host}:{port}: {exc}") from exc
        _served_port = port
    logger.info("metrics served at http://%s:%d/metrics", host, port)


def exposition() -> bytes:
    """This process's metrics in the Prometheus text format (the gateway's ``/metrics``)."""
    return generate_latest(REGISTRY)
