"""LISTEN on PostgreSQL channels with one dedicated asyncpg connection, reconnecting."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog
from sqlalchemy.engine import make_url

from cms_ingest.db.engine import plain_url

log = structlog.get_logger("cms_ingest.notify")

APPLICATION_NAME = "cms-ingest-listen"  # its row in pg_stat_activity
PROBE_INTERVAL_S = 5.0  # how often an idle LISTEN connection proves it is still useful
# What losing or not finding the server raises: OSError (refused, reset), PostgresError
# (shutting down, starting up), InterfaceError (used after the connection closed) and
# InternalClientError (TargetServerAttributeNotMatched: no host is read-write right now,
# as in the seconds of a failover).
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_PRIMARY_ONLY = ("read-write", "primary")


def reconnect_delay(failures: int) -> float:
    """Seconds before reconnecting after `failures` failed connections in a row: doubling from
    1 s up to 30 s, minus up to 30 % at random so daemons that lost the server together do
    not all come back at once. (The rest of the daemon uses `cms_ingest.retry`; `db` imports
    nothing of ours but the domain.)"""
    ceiling = min(30.0, 2.0 ** min(failures - 1, 5))
    return ceiling * (1.0 - 0.3 * random.random())


class NotPrimary(Exception):
    """The server we listen on became read-only: NOTIFYs now come from another one."""


class Listener:
    """Calls `on_notify(channel, payload)` for every NOTIFY; `on_connect()` after each (re)connect.

    `on_connect` lets the consumer sweep for anything it missed while disconnected.
    """

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._url = plain_url(url)
        # Only with target_session_attrs asking for the primary can a reconnect find it.
        self._primary_only = make_url(self._url).query.get("target_session_attrs") in _PRIMARY_ONLY
        self._channels = list(channels)
        self._on_notify = on_notify
        self._on_connect = on_connect

    def _callback(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self._on_notify(channel, payload)

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._listen(stop)
                failures = 0
            except (*CONNECTION_ERRORS, NotPrimary) as exc:
                failures += 1
                log.warning("listen_connection_lost", error=str(exc), failures=failures)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=reconnect_delay(failures or 1))

    async def _listen(self, stop: asyncio.Event) -> None:
        connection: asyncpg.Connection = await asyncpg.connect(
            self._url, timeout=10, server_settings={"application_name": APPLICATION_NAME}
        )
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _c: lost.set())
        try:
            for channel in self._channels:
                await connection.add_listener(channel, self._callback)
            if self._on_connect is not None:
                self._on_connect()
            while not stop.is_set() and not lost.is_set():
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
                # Wake now and then to prove the connection still answers, and still
                # reaches the primary: writers NOTIFY on the primary only.
                await asyncio.wait(
                    waiters, timeout=PROBE_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in waiters:
                    waiter.cancel()
                if not stop.is_set() and not lost.is_set():
                    await self._probe(connection)
        finally:
            if not connection.is_closed():
                await connection.close(timeout=2)

    async def _probe(self, connection: asyncpg.Connection) -> None:
        if not self._primary_only:
            await connection.execute("SELECT 1", timeout=10)
            return
        writable = await connection.fetchval(
            "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'",
            timeout=10,
        )
        if not writable:
            raise NotPrimary("the server is read-only now; looking for the primary again")
