"""Alembic environment: migrations run against ``sqlalchemy.url`` set by shared.db."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import shared.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from shared.db import get_engine

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    with get_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
