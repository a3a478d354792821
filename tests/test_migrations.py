"""The schema is owned by migrations, and the migrations match the SQLModel tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import shared.models  # noqa: F401  (registers the tables)
from shared.db import SchemaOutOfDate, ensure_schema_current, get_engine, upgrade_schema


def _diff(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), SQLModel.metadata))


def test_migrated_postgres_matches_the_models(postgres_url: str) -> None:
    ensure_schema_current(postgres_url)
    assert _diff(postgres_url) == []


def test_sqlite_is_migrated_from_nothing_and_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    with pytest.raises(SchemaOutOfDate, match="umi db upgrade"):
        ensure_schema_current(url)
    upgrade_schema(url)
    upgrade_schema(url)  # idempotent
    ensure_schema_current(url)
    assert _diff(url) == []
