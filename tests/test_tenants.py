"""Tenants and API keys: ``umi keys create|revoke|list`` as a subprocess against real PostgreSQL.

The key is printed once (stdout, alone); the database holds only its SHA-256, and no
output but that one line, nor any log, ever shows it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid

import psycopg
import pytest
from sqlmodel import Session, select

from shared import tenants
from shared.db import get_engine
from shared.models import ApiKey, Tenant
from tests.conftest import UMI


def umi_keys(postgres_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UMI_DATABASE_URL": postgres_url}
    return subprocess.run([str(UMI), "keys", *args], capture_output=True, text=True, env=env, timeout=60)


def tenant_name() -> str:
    return f"acme-{uuid.uuid4().hex[:8]}"


def database_dump(postgres_url: str) -> str:
    """Every row of the key and tenant tables as text."""
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        rows = [
            *connection.execute("SELECT * FROM umi_api_key").fetchall(),
            *connection.execute("SELECT * FROM umi_tenant").fetchall(),
        ]
    return repr(rows)


def test_a_created_key_is_printed_once_alone_and_stored_only_as_its_hash(postgres_url: str) -> None:
    name = tenant_name()
    created = umi_keys(postgres_url, "create", "--tenant", name, "--rate-per-s", "2.5", "--burst", "7", "--max-in-flight", "3")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("umi_") and len(key) > 40
    assert key not in created.stderr and name in created.stderr

    assert key not in database_dump(postgres_url)
    with Session(get_engine(postgres_url)) as session:
        tenant = session.exec(select(Tenant).where(Tenant.name == name)).one()
        record = session.exec(select(ApiKey).where(ApiKey.tenant_id == tenant.id)).one()
        assert record.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key.startswith(record.prefix)
        assert (tenant.rate_per_s, tenant.burst, tenant.max_in_flight) == (2.5, 7, 3)
        assert tenants.authenticate(session=session, key=key).id == tenant.id

    listed = umi_keys(postgres_url, "list", "--tenant", name)
    assert listed.returncode == 0, listed.stderr
    assert str(record.id) in listed.stdout and record.prefix in listed.stdout and name in listed.stdout
    assert key not in listed.stdout + listed.stderr


def test_a_key_revoked_by_id_or_by_itself_no_longer_authenticates(postgres_url: str) -> None:
    name = tenant_name()
    by_id_key = umi_keys(postgres_url, "create", "--tenant", name).stdout.strip()
    by_key_key = umi_keys(postgres_url, "create", "--tenant", name).stdout.strip()
    with Session(get_engine(postgres_url)) as session:
        by_id = session.exec(select(ApiKey).where(ApiKey.key_hash == tenants.hash_api_key(by_id_key))).one()

    revoked = umi_keys(postgres_url, "revoke", str(by_id.id))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    revoked = umi_keys(postgres_url, "revoke", by_key_key)
    assert revoked.returncode == 0, revoked.stderr
    assert by_key_key not in revoked.stdout + revoked.stderr

    with Session(get_engine(postgres_url)) as session:
        assert tenants.authenticate(session=session, key=by_id_key) is None
        assert tenants.authenticate(session=session, key=by_key_key) is None
    listed = umi_keys(postgres_url, "list", "--tenant", name).stdout.splitlines()[1:]
    assert len(listed) == 2 and all(not line.endswith(" -") for line in listed)  # both show a revocation time

    unknown = umi_keys(postgres_url, "revoke", "umi_no-such-key")
    assert unknown.returncode == 2 and "no such key" in unknown.stderr


def test_bad_key_options_are_refused_naming_what_is_wrong(postgres_url: str) -> None:
    bad_name = umi_keys(postgres_url, "create", "--tenant", "Not A Name")
    assert bad_name.returncode == 2 and "--tenant" in bad_name.stderr and bad_name.stdout == ""
    zero_burst = umi_keys(postgres_url, "create", "--tenant", tenant_name(), "--burst", "0")
    assert zero_burst.returncode == 2 and "--burst" in zero_burst.stderr and zero_burst.stdout == ""
    not_a_rate = umi_keys(postgres_url, "create", "--tenant", tenant_name(), "--rate-per-s", "fast")
    assert not_a_rate.returncode == 2 and "--rate-per-s" in not_a_rate.stderr


def test_a_tenant_limit_must_be_positive() -> None:
    assert tenants.TenantLimits(burst=5).given() == {"burst": 5}
    with pytest.raises(ValueError, match="max_in_flight"):
        tenants.TenantLimits(max_in_flight=0)


def test_a_second_key_keeps_the_tenant_and_limits_it_does_not_name(postgres_url: str) -> None:
    name = tenant_name()
    assert umi_keys(postgres_url, "create", "--tenant", name, "--burst", "9", "--max-in-flight", "4").returncode == 0
    assert umi_keys(postgres_url, "create", "--tenant", name, "--max-in-flight", "6").returncode == 0
    with Session(get_engine(postgres_url)) as session:
        tenant = session.exec(select(Tenant).where(Tenant.name == name)).one()
        assert (tenant.burst, tenant.max_in_flight) == (9, 6)
        assert len(tenants.list_api_keys(session=session, tenant_name=name)) == 2
