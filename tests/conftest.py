"""Shared fixtures: a real PostgreSQL, a clean database per test, daemons and simulators.

The server is `CMS_INGEST_TEST_DATABASE_URL` when set (CI points it at the machine's
PostgreSQL), else an embedded one (pgserver) for the session. Each test gets its own database,
cloned from a template that was migrated once: clean state in a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from cms_ingest.db.engine import create_engine, migrate, plain_url
from cms_ingest.db.store import Store
from cms_ingest.eventloop import DEFAULT_EVENT_LOOP, loop_factory

ENV_URL = "CMS_INGEST_TEST_DATABASE_URL"
# The loop the in-process tests run on: the daemon's default (uvloop) unless set to "asyncio".
ENV_LOOP = "CMS_INGEST_TEST_EVENT_LOOP"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    kind = os.environ.get(ENV_LOOP, DEFAULT_EVENT_LOOP)
    if kind not in ("uvloop", "asyncio"):
        raise pytest.UsageError(f"{ENV_LOOP}={kind!r}: expected uvloop or asyncio")
    return {kind: loop_factory(kind)}


def with_database(url: str, name: str) -> str:
    return make_url(plain_url(url)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server_url() -> Any:
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    # Outside /tmp/pytest-of-<user>: see `outside_pytest_tmp` (another pytest session starting
    # meanwhile made the data directory unreachable for the server's own user, and its stop
    # failed at the end of the session).
    path = Path(tempfile.mkdtemp(prefix="cms-ingest-pg-"))
    path.chmod(0o755)
    server = pgserver.get_server(path / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(path, ignore_errors=True)


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(plain_url(url))


@pytest.fixture(scope="session")
async def template_db(pg_server_url: str) -> AsyncIterator[str]:
    name = f"cms_tpl_{uuid.uuid4().hex[:10]}"
    admin = await _admin(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(with_database(pg_server_url, name), pool_size=1)
    await migrate(engine)
    await engine.dispose()
    yield name
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@contextlib.asynccontextmanager
async def scratch_database(
    server_url: str, prefix: str, template: str | None = None
) -> AsyncIterator[str]:
    """A database of its own for one test, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin = await _admin(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
        yield with_database(server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    async with scratch_database(pg_server_url, "cms_t", template_db) as url:
        yield url


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A database with no schema at all (for migration tests)."""
    async with scratch_database(pg_server_url, "cms_e") as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, for assertions in SQL."""
    connection = await asyncpg.connect(plain_url(database_url))
    yield connection
    await connection.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(create_engine(database_url, pool_size=2))
    yield store
    await store.engine.dispose()


async def eventually(
    check: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Await `check()` until it returns something truthy; fail with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}; last={last!r}")


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    return tmp_path / "data" / "media"


@pytest.fixture
def outside_pytest_tmp() -> Iterator[Path]:
    """A directory of this test's own outside /tmp/pytest-of-<user>, removed afterwards.

    For an embedded PostgreSQL: under root pgserver runs it as another user, who must traverse
    the path to its data, and every pytest session starting meanwhile (an xdist worker,
    another developer's run) chmods /tmp/pytest-of-<user> back to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="cms-ingest-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
