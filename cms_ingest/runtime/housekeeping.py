"""Housekeeping, every few seconds, as a supervised task of its own.

It is also the daemon's look at its database: a query that fails marks the daemon not ready
(`/readyz` 503), one that succeeds again marks it ready. Each round: the media and action
queue depths exported, the held sites' health written to `site_state`, systemd's STATUS
line refreshed, and vendor clients replaced by a restart closed once no action can still
run on them. At stop, the health is written one last time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.httpserver import Readiness
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.tasks import sleep_or_stop
from cms_ingest.storage_ports import SiteHealthRecords

log = structlog.get_logger("cms_ingest.housekeeping")

HOUSEKEEPING_INTERVAL_S = 5.0
RETIRE_MARGIN_S = 10.0  # beyond the longest an action may run on a replaced client


class Housekeeping:
    def __init__(
        self,
        store: SiteHealthRecords,
        sites: SiteRegistry,
        pollers: PollerSet,
        readiness: Readiness,
        *,
        actions_may_run_s: float,
        report_status: Callable[[], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self._sites = sites
        self._pollers = pollers
        self._readiness = readiness
        # A replaced client is closed once no action attempt can still be running on it.
        self._retire_after_s = actions_may_run_s + RETIRE_MARGIN_S
        self._report_status = report_status

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            await self.once()
            await self._sites.close_retired(self._retire_after_s)
            if await sleep_or_stop(HOUSEKEEPING_INTERVAL_S, stop):
                await self._flush_health()
                return

    async def once(self) -> None:
        try:
            depths = await self._store.queue_depths()
            self._metrics.media_queue.set(depths["media"])
            self._metrics.action_queue.set(depths["actions"])
            await self._flush_health()
            self._database_reachable()
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="housekeeping").inc()
            self._database_unreachable(exc)
        self._report_status()

    async def _flush_health(self) -> None:
        await self._store.record_health(self._pollers.health_snapshots())

    def _database_reachable(self) -> None:
        if not self._readiness.database_ok:
            log.info("database_reachable_again")
        self._readiness.database_ok = True
        self._readiness.reason = ""

    def _database_unreachable(self, exc: Exception) -> None:
        if self._readiness.database_ok:
            log.error("database_unreachable", error=str(exc))
        self._readiness.database_ok = False
        self._readiness.reason = f"database: {exc}"
