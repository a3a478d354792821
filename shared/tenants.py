"""Tenants and their API keys: create, revoke, and find the tenant a key belongs to.

A key is ``umi_`` plus 32 random bytes (URL-safe base64), shown once at creation. Only
its SHA-256 is stored: the key is random and long, so a fast hash is as safe as a slow
one here (slow password hashes exist for guessable secrets) and keeps every request's
lookup one indexed equality. Keyword-only, each function takes a session, none commits.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass, fields

from sqlmodel import Session, col, select

from shared.models import DEFAULT_TENANT_ID, DEFAULT_TENANT_NAME, ApiKey, Tenant, utcnow

__all__ = [
    "DEFAULT_TENANT_ID",
    "DEFAULT_TENANT_NAME",
    "IssuedKey",
    "TenantLimits",
    "TENANT_NAME_PATTERN",
    "authenticate",
    "create_api_key",
    "get_or_create_tenant",
    "hash_api_key",
    "list_api_keys",
    "revoke_api_key",
]

KEY_PREFIX = "umi_"
#: Tenant names: lower-case letters, digits, ``.``, ``_`` and ``-``; they appear in logs and metrics.
TENANT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def hash_api_key(key: str) -> str:
    """The stored form of ``key`` (hex SHA-256)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: ``key`` is shown once and never stored."""

    key: str
    record: ApiKey
    tenant: Tenant


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created if missing (``ValueError`` for a name that is not allowed)."""
    if not TENANT_NAME_PATTERN.match(name):
        raise ValueError(f"tenant name {name!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    tenant = session.exec(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        tenant = Tenant(id=DEFAULT_TENANT_ID if name == DEFAULT_TENANT_NAME else uuid.uuid4(), name=name)
        session.add(tenant)
        session.flush()
    return tenant


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's own limits; ``None`` leaves that limit as it is (new tenants: the ``UMI_TENANT_*`` default)."""

    rate_per_s: float | None = None
    burst: int | None = None
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.given().items():
            if not value > 0:
                raise ValueError(f"{name} must be greater than 0, not {value!r}")

    def given(self) -> dict[str, float | int]:
        """The limits that are set, by name."""
        return {field.name: value for field in fields(self) if (value := getattr(self, field.name)) is not None}


def create_api_key(*, session: Session, tenant_name: str, limits: TenantLimits | None = None) -> IssuedKey:
    """A new key for tenant ``tenant_name`` (created if missing), setting the given ``limits`` on the tenant."""
    tenant = get_or_create_tenant(session=session, name=tenant_name)
    for name, value in (limits or TenantLimits()).given().items():
        setattr(tenant, name, value)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(tenant_id=tenant.id, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_api_key(key))
    session.add(record)
    session.flush()
    return IssuedKey(key=key, record=record, tenant=tenant)


def revoke_api_key(*, session: Session, key_or_id: str) -> ApiKey | None:
    """Revoke a key given as the key itself or its id; returns it (None if unknown). Idempotent."""
    record = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key_or_id))).first()
    if record is None:
        try:
            record = session.get(ApiKey, uuid.UUID(key_or_id))
        except ValueError:
            record = None
    if record is not None and record.revoked_at is None:
        record.revoked_at = utcnow()
    return record


def list_api_keys(*, session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    """Every key (optionally one tenant's) with its tenant, oldest first."""
    statement = select(ApiKey, Tenant).join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id)).order_by(col(ApiKey.created_at))
    if tenant_name is not None:
        statement = statement.where(Tenant.name == tenant_name)
    return [(key, tenant) for key, tenant in session.exec(statement)]


def authenticate(*, session: Session, key: str) -> Tenant | None:
    """The tenant whose live (unrevoked) key ``key`` is; ``None`` for an unknown or revoked key."""
    row = session.exec(
        select(Tenant)
        .join(ApiKey, col(ApiKey.tenant_id) == col(Tenant.id))
        .where(ApiKey.key_hash == hash_api_key(key), col(ApiKey.revoked_at).is_(None))
    ).first()
    return row
