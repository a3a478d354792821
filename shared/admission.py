"""Per-tenant limits: request rate and tasks in flight, the same for every gateway replica.

The rate is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp,
the *theoretical arrival time*) stored per tenant in ``umi_tenant_rate`` and updated under
its row lock, so all replicas share one bucket. ``limits``/``slowapi`` keep their
counters in process memory or Redis; this product's shared state is PostgreSQL, so the
bucket lives there. Tasks in flight are counted from ``umi_task`` itself.

The in-flight limit is applied by :func:`shared.tasks.accept_task` under the tenant's row lock,
in the transaction that stores the task (an idempotent replay creates nothing and is never refused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from shared.lifecycle import ACTIVE_STATUSES
from shared.models import Task, Tenant, TenantRate
from shared.settings import Settings

__all__ = ["OverLimit", "Refusal", "check_in_flight", "take_request"]


@dataclass(frozen=True)
class Refusal:
    """Why a tenant must wait, and for how long (``Retry-After``)."""

    reason: str
    retry_after_s: float


def take_request(*, session: Session, tenant: Tenant, settings: Settings, now: float | None = None) -> Refusal | None:
    """Count one request of ``tenant`` against its rate; a :class:`Refusal` when over it (nothing counted).

    The caller commits: the row lock on the tenant's bucket is held until then.
    """
    rate = tenant.rate_per_s or settings.tenant_rate_per_s
    burst = tenant.burst or settings.tenant_burst
    interval = 1.0 / rate
    now = time.time() if now is None else now
    state = _locked_bucket(session, tenant)
    if state is None:
        # The tenant's first request: concurrent first requests (other replicas too) must not
        # collide on the insert, so create the row only where none exists, then lock it.
        insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(TenantRate).values(tenant_id=tenant.id, tat=now).on_conflict_do_nothing(index_elements=["tenant_id"]))
        state = _locked_bucket(session, tenant)
        assert state is not None
    tat = max(state.tat, now)
    allowed_at = tat + interval - burst * interval
    if allowed_at > now:
        return Refusal(reason=f"request rate over {rate:g}/s (burst {burst})", retry_after_s=allowed_at - now)
    state.tat = tat + interval
    session.flush()
    return None


def _locked_bucket(session: Session, tenant: Tenant) -> TenantRate | None:
    return session.exec(select(TenantRate).where(TenantRate.tenant_id == tenant.id).with_for_update()).first()


def check_in_flight(*, session: Session, tenant: Tenant, settings: Settings) -> Refusal | None:
    """A :class:`Refusal` when ``tenant`` already has its maximum of tasks not yet ended."""
    limit = tenant.max_in_flight or settings.tenant_max_in_flight
    in_flight = session.exec(
        select(func.count()).select_from(Task).where(Task.tenant_id == tenant.id, col(Task.status).in_(ACTIVE_STATUSES))
    ).one()
    if in_flight >= limit:
        # Tasks end within their deadline; a second is a fair first wait.
        return Refusal(reason=f"{in_flight} tasks in flight (limit {limit})", retry_after_s=1.0)
    return None


class OverLimit(Exception):
    """The tenant is over a limit; ``refusal`` says which and when to retry."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal
