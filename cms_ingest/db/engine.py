"""Connecting to PostgreSQL: the configured server, or an embedded one; and migrating it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import cms_ingest

MIGRATION_LOCK_KEY = 0x636D_7369  # "cmsi": one migrator at a time across daemons


def async_url(url: str) -> str:
    """Any accepted PostgreSQL URL as SQLAlchemy's asyncpg URL."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"not a PostgreSQL URL: scheme {parsed.drivername!r}")


def plain_url(url: str) -> str:
    """The libpq/asyncpg form (postgresql://...) for asyncpg.connect (LISTEN)."""
    parsed = make_url(async_url(url))
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    # One small pool for the whole daemon: sites never get a connection each; their
    # commits are batched by the alarm writer.
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "cms-ingest"}, "timeout": 10},
    )


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """An embedded PostgreSQL under `data_dir/pgdata`, stopped on exit; yields its URL."""
    with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        import pgserver

    pgdata = data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = await asyncio.to_thread(
        pgserver.get_server,  # type: ignore[attr-defined]
        pgdata,
        cleanup_mode="stop",
    )
    try:
        yield str(server.get_uri())
    finally:
        await asyncio.to_thread(server.cleanup)


def migrations_dir() -> Path:
    """The alembic scripts: shipped inside the wheel, or the source tree's `migrations/`."""
    package = Path(cms_ingest.__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("alembic migrations not found next to the cms_ingest package")


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection) -> None:
    # A session-level lock, released only after the migration committed: the next
    # migrator then sees the finished schema and has nothing left to do.
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (safe when several daemons start at once)."""
    async with engine.connect() as connection:
        await connection.run_sync(_upgrade)
        await connection.commit()


def _current(connection: Connection) -> Any:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        revision = await connection.run_sync(_current)
    return None if revision is None else str(revision)
