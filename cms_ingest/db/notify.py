"""LISTEN on PostgreSQL channels with one dedicated asyncpg connection, reconnecting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from cms_ingest.db.engine import plain_url
from cms_ingest.retry import RetryPolicy

log = structlog.get_logger("cms_ingest.notify")

RECONNECT = RetryPolicy(base=1.0, factor=2.0, cap=30.0, jitter=0.3)


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
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                failures += 1
                log.warning("listen_connection_lost", error=str(exc), failures=failures)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RECONNECT.delay(failures or 1))

    async def _listen(self, stop: asyncio.Event) -> None:
        connection: asyncpg.Connection = await asyncpg.connect(self._url, timeout=10)
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _c: lost.set())
        try:
            for channel in self._channels:
                await connection.add_listener(channel, self._callback)
            if self._on_connect is not None:
                self._on_connect()
            while not stop.is_set() and not lost.is_set():
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
                # Wake now and then to prove the connection still answers.
                await asyncio.wait(waiters, timeout=15, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if not stop.is_set() and not lost.is_set():
                    await connection.execute("SELECT 1", timeout=10)
        finally:
            if not connection.is_closed():
                await connection.close(timeout=2)
