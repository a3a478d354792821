"""What the ingress does with one message from ``umi.ingress``: accept it as a task, or refuse it.

:func:`handle_ingress_message` is the whole decision, free of broker code: it reads the
database and submits the task, and says what the consumer must do with the message
(:class:`Accepted`: ack it; :class:`Refused`: dead-letter it with the reason, answer the
error on ``reply_to``, then ack it). The checks, in order, each naming what is wrong:

1. the body is at most ``UMI_MAX_BODY_BYTES`` (``too_large``);
2. the ``message_id`` property, the idempotency key, is present and at most 255
   characters (``invalid_message_id``); ``reply_to``, if given, is not one of the system's
   own queues (``invalid_reply_to``: such a message is not answered, only dead-lettered);
3. with ``UMI_AUTH`` on, the header ``x-api-key`` is a live key (``unauthenticated``);
4. the body is a UTF-8 JSON :class:`~shared.schemas.IngressEnvelope` (``invalid_envelope``,
   the pydantic errors in ``detail``, each with its ``loc``);
5. a task the tenant already submitted under this ``message_id`` is accepted again as it is
   (a redelivered duplicate: one task); the same key for another request is refused
   (``idempotency_key_reused``);
6. the tenant's request rate and tasks in flight (``rate_limited``, with ``retry_after_s``);
7. the task is stored and its first job handed on (:func:`shared.tasks.submit_task`);
   a task that cannot be stored as sent is refused (``invalid_task``).

A malformed message does not count against the tenant's rate: it is refused before the
rate is taken, and a redelivered duplicate is never refused for a rate it already paid.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from sqlalchemy.exc import DataError

from shared import admission, crud, tenants
from shared.context_window import PromptDoesNotFit
from shared.db import session_scope
from shared.envelope import describe_validation_error
from shared.metrics import DeadLetterKind
from shared.models import Tenant
from shared.pipeline import Runtime
from shared.schemas import ErrorBody, ErrorDetail, IngressEnvelope, TaskOrigin
from shared.settings import Settings
from shared.tasks import IdempotencyKeyReused, OverLimit, accept_task, request_fingerprint

__all__ = [
    "API_KEY_HEADER",
    "Accepted",
    "IngressOutcome",
    "IngressProperties",
    "MAX_PROPERTY_CHARS",
    "Refused",
    "handle_ingress_message",
    "ingress_properties",
]

logger = logging.getLogger(__name__)

#: The AMQP header carrying the tenant's API key.
API_KEY_HEADER = "x-api-key"
#: ``message_id``, ``correlation_id`` and ``reply_to`` are stored with the task (``TaskOrigin``).
MAX_PROPERTY_CHARS = 255


class IngressProperties(BaseModel):
    """The AMQP properties and header the ingress reads; the API key is a secret (never shown)."""

    model_config = ConfigDict(frozen=True)

    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    api_key: SecretStr | None = None

    @property
    def reply_correlation_id(self) -> str | None:
        """What a reply carries as its ``correlation_id``: the message's, else its ``message_id``."""
        return self.correlation_id or self.message_id


def ingress_properties(properties: dict[str, Any], headers: dict[str, Any] | None) -> IngressProperties:
    """The :class:`IngressProperties` of a message as the broker delivered it (properties, headers).

    A header value that is not text (bytes are decoded as UTF-8) counts as no key; a property
    that is not text counts as absent, so the checks refuse it by name.
    """
    key = (headers or {}).get(API_KEY_HEADER)
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return IngressProperties(
        message_id=_text(properties.get("message_id")),
        correlation_id=_text(properties.get("correlation_id")),
        reply_to=_text(properties.get("reply_to")),
        api_key=SecretStr(key) if isinstance(key, str) and key else None,
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


class Accepted(BaseModel):
    """The message is a task: stored (``duplicate``: it already was); ack the message."""

    outcome: Literal["accepted"] = "accepted"
    task_id: uuid.UUID
    tenant_id: uuid.UUID
    duplicate: bool = False


class Refused(BaseModel):
    """The message is refused: dead-letter it with ``reason``, answer ``error`` on ``reply_to``, ack it."""

    outcome: Literal["refused"] = "refused"
    #: The dead letter's ``x-umi-dead-letter-reason``: the error's type and message.
    reason: str
    #: ``umi_dead_letters_total{role="ingress", reason=<kind>}``.
    kind: DeadLetterKind
    error: ErrorBody
    #: Where to answer ``error`` (None: nowhere) and the ``correlation_id`` the answer carries.
    reply_to: str | None = None
    correlation_id: str | None = None


IngressOutcome = Accepted | Refused


def _refused(kind: DeadLetterKind, type_: str, message: str, *, detail: list[dict[str, object]] | None = None,
             retry_after_s: float | None = None) -> Refused:
    error = ErrorDetail(type=type_, message=message, detail=detail, retry_after_s=retry_after_s)
    return Refused(reason=f"{type_}: {message}", kind=kind, error=ErrorBody(error=error))


def _validation_detail(exc: ValidationError) -> list[dict[str, object]]:
    """Pydantic's errors without the input (it may be huge or unprintable): ``loc``, ``msg``, ``type``."""
    return [
        {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def handle_ingress_message(body: bytes, properties: IngressProperties, runtime: Runtime) -> IngressOutcome:
    """Accept ``body`` as a task of the tenant ``properties`` authenticate, or say why not.

    Commits the task before returning :class:`Accepted`, so the caller may ack the message
    then (at least once: a copy redelivered before the ack finds the task and is accepted
    as a duplicate). Database or broker outages propagate (the message should be retried);
    bad input never raises, it is :class:`Refused`, with the address to answer it at.
    """
    outcome = _decide(body, properties, runtime)
    if isinstance(outcome, Refused) and _answerable(properties, runtime.settings):
        return outcome.model_copy(update={"reply_to": properties.reply_to, "correlation_id": properties.reply_correlation_id})
    return outcome


def _answerable(properties: IngressProperties, settings: Settings) -> bool:
    """Whether a reply may go to the message's ``reply_to``: given, and not a refused one."""
    return properties.reply_to is not None and _reply_to_problem(properties.reply_to, settings) is None


def _reply_to_problem(reply_to: str, settings: Settings) -> str | None:
    if len(reply_to) > MAX_PROPERTY_CHARS:
        return f"the reply_to property has {len(reply_to)} characters; at most {MAX_PROPERTY_CHARS}"
    if reply_to == settings.queue_prefix or reply_to.startswith(f"{settings.queue_prefix}."):
        # Replies (and the final state) would land on umi's own queues, e.g. a role queue.
        return f"reply_to {reply_to!r} names one of this system's own queues; use a queue of your own"
    return None


def _decide(body: bytes, properties: IngressProperties, runtime: Runtime) -> IngressOutcome:
    settings = runtime.settings
    if len(body) > settings.max_body_bytes:
        return _refused(
            DeadLetterKind.MALFORMED, "too_large",
            f"the body has {len(body)} bytes; at most {settings.max_body_bytes} (UMI_MAX_BODY_BYTES) are accepted",
        )
    message_id = properties.message_id
    if message_id is None:
        return _refused(
            DeadLetterKind.MALFORMED, "invalid_message_id",
            "the message_id property is required: it is the task's idempotency key (a redelivered copy is one task)",
        )
    refusal = _check_properties(properties, settings)
    if refusal is not None:
        return refusal
    tenant = _tenant(properties, runtime)
    if tenant is None:
        return _refused(
            DeadLetterKind.UNAUTHENTICATED, "unauthenticated", f"a live API key is required in the header {API_KEY_HEADER!r}"
        )
    try:
        text = body.decode("utf-8")  # strict: an encoded surrogate is refused too
    except UnicodeDecodeError as exc:
        return _refused(DeadLetterKind.INVALID_ENVELOPE, "invalid_envelope", f"the body is not UTF-8: {exc}")
    try:
        envelope = IngressEnvelope.model_validate_json(text)
    except ValidationError as exc:
        return _refused(
            DeadLetterKind.INVALID_ENVELOPE, "invalid_envelope",
            f"the body is not a valid ingress envelope: {describe_validation_error(exc)}",
            detail=_validation_detail(exc),
        )
    origin = TaskOrigin(
        tenant_id=tenant.id,
        idempotency_key=message_id,
        request_fingerprint=request_fingerprint(envelope.task),
        reply_to=properties.reply_to,
        correlation_id=properties.reply_correlation_id,
    )
    with session_scope(runtime.engine) as session:
        known = crud.get_task_by_idempotency_key(session=session, tenant_id=tenant.id, key=message_id)
        # A redelivered copy already paid for its request; the in-flight limit is checked with the insert.
        limited = None if known is not None else admission.take_request(session=session, tenant=tenant, settings=settings)
    if limited is not None:
        return _rate_limited(limited)
    try:
        submission = accept_task(
            engine=runtime.engine,
            dispatcher=runtime.dispatcher,
            settings=settings,
            task_in=envelope.task,
            origin=origin,
            limit_in_flight=tenant,
        )
    except OverLimit as exc:
        return _rate_limited(exc.refusal)
    except IdempotencyKeyReused as exc:
        return _refused(DeadLetterKind.INVALID_ENVELOPE, "idempotency_key_reused", f"message_id: {exc}")
    except PromptDoesNotFit as exc:
        return _refused(
            DeadLetterKind.INVALID_ENVELOPE, "invalid_task", str(exc),
            detail=[{"loc": ["task", "max_new_tokens"], "msg": str(exc), "type": "value_error"}],
        )
    except DataError as exc:
        # A value the database refuses that the envelope's validators let through: nothing was
        # stored, and a retry cannot help. The driver's message, not the statement.
        cause = exc.orig if exc.orig is not None else exc
        return _refused(DeadLetterKind.INVALID_ENVELOPE, "invalid_task", f"the task cannot be stored: {cause}")
    task = submission.task
    return Accepted(task_id=task.id, tenant_id=tenant.id, duplicate=not submission.created)


def _check_properties(properties: IngressProperties, settings: Settings) -> Refused | None:
    """Lengths (AMQP's short strings hold 255 bytes; another transport may pass longer ones), and ``reply_to``."""
    if properties.reply_to is not None and (problem := _reply_to_problem(properties.reply_to, settings)) is not None:
        return _refused(DeadLetterKind.MALFORMED, "invalid_reply_to", problem)
    for name in ("message_id", "correlation_id"):
        value = getattr(properties, name)
        if value is not None and len(value) > MAX_PROPERTY_CHARS:
            return _refused(
                DeadLetterKind.MALFORMED, f"invalid_{name}", f"the {name} property has {len(value)} characters; at most {MAX_PROPERTY_CHARS}"
            )
    return None


def _tenant(properties: IngressProperties, runtime: Runtime) -> Tenant | None:
    """The tenant the message's key belongs to (the default tenant with ``UMI_AUTH=off``)."""
    with session_scope(runtime.engine) as session:
        if not runtime.settings.auth:
            tenant: Tenant | None = tenants.get_or_create_tenant(session=session, name=tenants.DEFAULT_TENANT_NAME)
        elif properties.api_key is None:
            return None
        else:
            tenant = tenants.authenticate(session=session, key=properties.api_key.get_secret_value())
        if tenant is not None:
            session.expunge(tenant)
        return tenant


def _rate_limited(refusal: admission.Refusal) -> Refused:
    """The refusal of a tenant over its request rate or tasks in flight: nothing stored, retry later."""
    return _refused(
        DeadLetterKind.RATE_LIMITED, "rate_limited",
        f"too many requests: {refusal.reason}; retry after {refusal.retry_after_s:.1f}s",
        retry_after_s=round(refusal.retry_after_s, 3),
    )
