"""The daemon: wires the database, the sites and the runtime parts, and shuts down in order.

Start: HTTP endpoints first (so /healthz answers while the database comes up), then the
database (embedded when no `database_url`), migrations, cursors, and finally one poller per
site. Stop (SIGTERM/SIGINT): pollers, then the alarm writer drains what they handed it, then
media and actions settle or release their rows; well inside 10 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog

from cms_ingest import metrics
from cms_ingest.config import AppConfig
from cms_ingest.db.engine import create_engine, embedded_postgres, migrate
from cms_ingest.db.notify import Listener
from cms_ingest.db.store import Store
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.actions import ActionWorker
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.runtime.httpserver import Readiness, make_app, serve
from cms_ingest.runtime.media import MediaFetcher
from cms_ingest.runtime.poller import SitePoller
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.supervision import OpenOutage, Supervision
from cms_ingest.runtime.supervisor import Supervisor, sleep_or_stop
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.sitehttp import new_client_session
from cms_ingest.vendors import OPTIONS_MODELS

log = structlog.get_logger("cms_ingest.daemon")

STARTUP_RETRY = RetryPolicy(base=1.0, factor=2.0, cap=15.0, jitter=0.2)
HOUSEKEEPING_INTERVAL_S = 5.0
T = TypeVar("T")


@contextlib.asynccontextmanager
async def database_url(config: AppConfig) -> AsyncIterator[str]:
    """The configured database, or an embedded one under data_dir for the daemon's lifetime."""
    if config.database_url is not None:
        yield config.database_url.get_secret_value()
        return
    log.info("embedded_database_starting", data_dir=str(config.data_dir))
    async with embedded_postgres(config.data_dir) as url:
        yield url


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop)


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    log.info("stopping", signal=signal.Signals(signum).name)
    stop.set()


class Daemon:
    def __init__(self, config: AppConfig, url: str) -> None:
        self.config = config
        self.url = url
        self.readiness = Readiness()
        self.supervisor = Supervisor()
        self.store = Store(create_engine(url))
        self.sites: SiteRegistry | None = None
        self._sites_built = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        session = new_client_session()
        try:
            self.supervisor.start("http", self._serve_http)
            if not await self._prepare_database(stop):
                return
            self.sites = SiteRegistry(self.config, session)
            self._sites_built.set()
            site_ids = [site.config.id for site in self.sites]
            cursors = await self._until_loaded(
                stop, "cursors", lambda: self.store.load_cursors(site_ids)
            )
            supervision = await self._until_loaded(
                stop, "supervision", lambda: self.store.supervision_states(site_ids)
            )
            if cursors is None or supervision is None:
                return
            self._start_parts(self.sites, cursors, supervision)
            log.info("started", sites=len(self.sites), listen=self.config.listen)
            await stop.wait()
        finally:
            await self._shutdown()
            await session.close()
            await self.store.engine.dispose()

    # ------------------------------------------------------------------ start

    async def _serve_http(self, stop: asyncio.Event) -> None:
        app = make_app(self.readiness, self.status)
        await serve(app, self.config.listen_host, self.config.listen_port, stop)

    async def _prepare_database(self, stop: asyncio.Event) -> bool:
        """Migrate, retrying while the database is not reachable yet."""
        failures = 0
        while not stop.is_set():
            try:
                await migrate(self.store.engine)
                self.readiness.mark_ready()
                return True
            except Exception as exc:  # the database may simply not be up yet
                failures += 1
                self.readiness.reason = f"database: {exc}"
                log.warning("database_unavailable", error=str(exc), attempt=failures)
                await sleep_or_stop(STARTUP_RETRY.delay(failures), stop)
        return False

    async def _until_loaded(
        self, stop: asyncio.Event, what: str, load: Callable[[], Awaitable[T]]
    ) -> T | None:
        """`load()`, retried with backoff while the database fails; None when stopping."""
        failures = 0
        while not stop.is_set():
            try:
                return await load()
            except Exception as exc:
                failures += 1
                log.warning("startup_load_failed", what=what, error=str(exc), attempt=failures)
                await sleep_or_stop(STARTUP_RETRY.delay(failures), stop)
        return None

    def _start_parts(
        self, sites: SiteRegistry, cursors: dict[str, Any], supervision: dict[str, Any]
    ) -> None:
        media = MediaFetcher(
            self.store, sites, root=self.config.data_dir / "media", config=self.config.media
        )
        actions = ActionWorker(self.store, sites, config=self.config.actions)
        writer = AlarmWriter(self.store, on_media_added=media.wake)
        listener = Listener(
            self.url,
            ["cms_actions"],
            on_notify=lambda _channel, _payload: actions.wake(),
            on_connect=actions.wake,
        )
        self.supervisor.start("writer", writer.run)
        self.supervisor.start("media", media.run)
        self.supervisor.start("actions", actions.run)
        self.supervisor.start("listener", listener.run)
        self.supervisor.start("housekeeping", self._housekeeping)
        for site in sites:
            last_success, outage = supervision.get(site.config.id, (None, None))
            poller = SitePoller(
                site,
                writer,
                cursor=cursors.get(site.config.id),
                media_deadline_s=site.config.media_deadline_s or self.config.media.deadline_s,
                supervision=Supervision(
                    site_id=site.config.id,
                    timeout_s=site.config.supervision_timeout,
                    restore_after_s=OPTIONS_MODELS[site.config.vendor]
                    .model_validate(site.config.options)
                    .restore_after_s,
                    open_outage=OpenOutage(*outage) if outage else None,
                    last_success=last_success,
                ),
                flood=FloodTracker(
                    max_per_minute=self.config.flood.max_per_minute,
                    quiet_s=self.config.flood.quiet_s,
                    fetch_media=self.config.flood.fetch_media,
                ),
            )
            self.supervisor.start(f"poller:{site.config.id}", poller.run)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Readiness, queue gauges and site health persisted, every few seconds."""
        while True:
            await self._housekeeping_once()
            if await sleep_or_stop(HOUSEKEEPING_INTERVAL_S, stop):
                await self._flush_health()
                return

    async def _housekeeping_once(self) -> None:
        try:
            depths = await self.store.queue_depths()
            metrics.MEDIA_QUEUE.set(depths["media"])
            metrics.ACTION_QUEUE.set(depths["actions"])
            await self._flush_health()
            if not self.readiness.database_ok:
                log.info("database_reachable_again")
            self.readiness.database_ok = True
            self.readiness.reason = ""
        except Exception as exc:
            metrics.DB_ERRORS.labels(operation="housekeeping").inc()
            if self.readiness.database_ok:
                log.error("database_unreachable", error=str(exc))
            self.readiness.database_ok = False
            self.readiness.reason = f"database: {exc}"

    async def _flush_health(self) -> None:
        if self.sites is None:
            return
        snapshots = [s for s in (site.health.snapshot() for site in self.sites) if s]
        await self.store.record_health(snapshots)

    # ------------------------------------------------------------------ stop

    async def _shutdown(self) -> None:
        """Ordered: nothing new is polled, what was polled is committed, queues settle."""
        await self.supervisor.stop_matching("poller:", timeout=3.0)
        await self.supervisor.stop_tasks(["writer"], timeout=2.0)
        await self.supervisor.stop_tasks(["media", "actions"], timeout=6.0)
        await self.supervisor.stop_all(timeout=2.0)
        if self.sites is not None:
            await self.sites.close()
        log.info("stopped")

    async def first_polls(self) -> None:
        """Until every site was polled once (the demo and tests start from there)."""
        await self._sites_built.wait()
        assert self.sites is not None
        await asyncio.gather(*(site.health.polled.wait() for site in self.sites))

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        sites = []
        for site in self.sites or []:
            health = site.health
            sites.append(
                {
                    "site_id": site.config.id,
                    "vendor": site.config.vendor,
                    "up": health.up,
                    "consecutive_failures": health.consecutive_failures,
                    "last_success_at": health.last_success_at,
                    "last_error": health.last_error,
                    "clock_skew_s": site.problems.skew_s,
                }
            )
        return {"ready": self.readiness.ready, "tasks": self.supervisor.names, "sites": sites}


async def run_daemon(
    config: AppConfig,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[Daemon], None] | None = None,
) -> None:
    """Run until `stop` is set (by default: until SIGTERM/SIGINT)."""
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    async with database_url(config) as url:
        daemon = Daemon(config, url)
        if on_started is not None:
            on_started(daemon)
        await daemon.run(stop)
