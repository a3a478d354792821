"""Database engine, sessions and schema migrations (Alembic, in ``shared/migrations``).

SQLite is the embedded default; PostgreSQL (psycopg 3) is the production store.
The schema is owned by migrations: ``umi db upgrade`` applies them, and every
service refuses to start against a database whose schema is behind.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

__all__ = [
    "POOL_MAX_OVERFLOW",
    "POOL_SIZE",
    "SchemaOutOfDate",
    "autocommit_scope",
    "ensure_schema_current",
    "get_engine",
    "session_scope",
    "upgrade_schema",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the newest migration."""


#: A process's PostgreSQL pool: at most POOL_SIZE + POOL_MAX_OVERFLOW connections (compose.yaml sizes
#: the server's max_connections with it, docs/operations.md).
POOL_SIZE, POOL_MAX_OVERFLOW = 20, 40


@functools.cache
def get_engine(database_url: str, *, pre_ping: bool = True) -> Engine:
    """One pooled engine per database URL (and ping choice) per process.

    ``pre_ping`` tests each pooled connection with a round trip before use, so a request
    after a PostgreSQL restart does not fail on a stale connection. Role workers turn it
    off: they retry transient database errors in place (``shared/worker.py``), so a stale
    connection costs one retry after a restart instead of a round trip on every transaction
    (SQLAlchemy then recycles the whole pool on the first disconnect it sees).
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Workers run many threads; size the pool for them and survive server restarts.
    return create_engine(
        database_url, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW, pool_pre_ping=pre_ping, pool_recycle=1800
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@functools.cache
def _autocommit(engine: Engine) -> Engine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def autocommit_scope(engine: Engine) -> Iterator[Session]:
    """A session whose every statement is its own transaction (autocommit): no ``BEGIN`` and
    ``COMMIT`` round trips.

    For reads that need neither a lock nor one snapshot across statements (under PostgreSQL's
    READ COMMITTED a transaction's statements see separate snapshots anyway), and for a write
    that is one statement. A statement's write is committed when it returns, so several writes
    that must stand or fall together belong in :func:`session_scope`.
    """
    with Session(_autocommit(engine), expire_on_commit=False) as session:
        yield session


def _alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_schema(database_url: str) -> None:
    """Apply all migrations (idempotent)."""
    command.upgrade(_alembic_config(database_url), "head")


def ensure_schema_current(database_url: str) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the newest migration."""
    head = ScriptDirectory.from_config(_alembic_config(database_url)).get_current_head()
    with get_engine(database_url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none'}, the code needs {head}: run `umi db upgrade`"
        )
