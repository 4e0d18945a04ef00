"""Alembic environment for cms-ingest.

Two ways in: the daemon (`cms-ingest migrate`, `run`) hands over an open connection in
`config.attributes["connection"]`; the plain `alembic` command line uses `sqlalchemy.url`
(or $CMS_INGEST_DATABASE_URL) with the async driver.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from cms_ingest.db.schema import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    url = os.environ.get("CMS_INGEST_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set CMS_INGEST_DATABASE_URL or sqlalchemy.url")
    from cms_ingest.db.engine import async_url

    return async_url(url)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_offline()
else:
    run_online()
