"""The daemon: assembles the database, the sites and the runtime parts, and orders their
start and stop. The parts do the work: the lease keeper decides which sites this daemon
holds and the poller set runs their pollers, the reloader applies SIGHUPs, housekeeping
keeps readiness and health; each runs as a supervised task.

Start: HTTP endpoints first (so /healthz answers while the database comes up), then the
database (embedded when no `database_url`), migrations, the shared workers, and the lease
keeper, which starts one poller per site whose lease this daemon holds (all of them when it
runs alone). Stop (SIGTERM/SIGINT): pollers, then the alarm writer drains what they handed
it, the leases are released for the other daemons, then media and actions settle or release
their rows; well inside 15 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Any

import aiohttp
import structlog

from cms_ingest.config import AppConfig
from cms_ingest.db.engine import MigrationNeeded, create_engine, embedded_postgres, migrate
from cms_ingest.db.leases import LEASES_CHANNEL, LeaseStore
from cms_ingest.db.notify import Listener
from cms_ingest.db.outbox import DELIVERIES_CHANNEL, OutboxStore
from cms_ingest.db.store import Store
from cms_ingest.domain import SiteLease
from cms_ingest.eventloop import running_loop_name
from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.actions import ActionWorker
from cms_ingest.runtime.forwarder import ForwarderSender
from cms_ingest.runtime.housekeeping import Housekeeping
from cms_ingest.runtime.httpserver import Readiness, make_app, serve
from cms_ingest.runtime.leases import LeaseKeeper, local_identity
from cms_ingest.runtime.looplag import LoopLagMonitor
from cms_ingest.runtime.media import MediaFetcher
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.reload import ConfigReloader
from cms_ingest.runtime.sdnotify import SystemdNotifier
from cms_ingest.runtime.sites import SiteRegistry, SiteRuntime
from cms_ingest.runtime.tasks import TaskSupervisor, sleep_or_stop
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.sitehttp import connection_limit, new_client_session, raise_open_files_limit

log = structlog.get_logger("cms_ingest.daemon")

STARTUP_RETRY = RetryPolicy(base=1.0, factor=2.0, cap=15.0, jitter=0.2)
# Open files besides the sites' connections: the database pool, LISTEN, /metrics clients, logs,
# media files being written.
OPEN_FILES_RESERVE = 200


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
    def __init__(
        self,
        config: AppConfig,
        url: str,
        *,
        building_sites: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.url = url
        # Entered while every configured site's client is built (the CLI keeps the garbage
        # collector out of it and hides the result from it: see `cli.sites_frozen_once_built`).
        self._building_sites = building_sites or contextlib.nullcontext
        self.readiness = Readiness()
        # This daemon's metrics: every part that counts is handed this one object.
        self.metrics = Metrics()
        self.supervisor = TaskSupervisor(metrics=self.metrics)
        # A frozen daemon's transaction is ended well before its leases expire.
        idle_s = max(2.0, config.lease_ttl / 2)
        # The forwarders' filters: a commit queues their deliveries in its own transaction.
        routes = [forwarder.route() for forwarder in config.forwarders]
        self.store = Store(create_engine(url, idle_in_transaction_s=idle_s), routes=routes)
        self.identity = local_identity(config.instance_id)
        self.notifier = SystemdNotifier.from_environment()
        self.reloader = ConfigReloader(
            config, self.notifier, self._status_line, metrics=self.metrics
        )
        # Built once the database is ready:
        self.sites: SiteRegistry | None = None
        self.pollers: PollerSet | None = None
        self.keeper: LeaseKeeper | None = None
        self.forwarders: list[ForwarderSender] = []
        self._sites_built = asyncio.Event()
        self._started = False

    def _open_files_for_sites(self) -> int:
        """The session's connection limit, with the open-files limit raised to carry it
        (said once at start when the service manager's hard limit is too low)."""
        connections = connection_limit(len(self.config.sites))
        wanted = connections + OPEN_FILES_RESERVE
        soft, hard = raise_open_files_limit(wanted)
        if soft >= wanted:
            return connections
        log.warning(
            "open_files_limit_low",
            limit=soft,
            hard_limit=hard,
            wanted=wanted,
            sites=len(self.config.sites),
            note="raise LimitNOFILE (systemd) or --ulimit nofile (Docker); the session keeps "
            "fewer connections than sites, and polls wait for one",
        )
        return max(100, soft - OPEN_FILES_RESERVE)

    @property
    def config(self) -> AppConfig:
        """The running config (the reloader's: a reload may have changed its sites)."""
        return self.reloader.config

    async def run(self, stop: asyncio.Event) -> None:
        session = new_client_session(connections=self._open_files_for_sites())
        try:
            self.supervisor.start("http", self._serve_http)
            self.supervisor.start("watchdog", self._watchdog)
            self.supervisor.start("loop_lag", LoopLagMonitor(metrics=self.metrics).run)
            self.supervisor.start("reload", self.reloader.run)
            if not await self._prepare_database(stop):
                return
            with self._building_sites():
                sites = await SiteRegistry.built_in_slices(
                    self.config, session, self.supervisor, metrics=self.metrics
                )
            self._start_parts(sites)
            self._started = True
            self.notifier.ready(self._status_line())
            log.info(
                "started",
                sites=len(self.config.sites),
                listen=self.config.listen,
                instance=self.identity.daemon_id,
                event_loop=running_loop_name(),
            )
            await stop.wait()
        finally:
            self.notifier.stopping()
            await self._shutdown(session)

    # ------------------------------------------------------------------ start

    async def _serve_http(self, stop: asyncio.Event) -> None:
        app = make_app(self.readiness, self.status, metrics=self.metrics)
        await serve(app, self.config.listen_host, self.config.listen_port, stop)

    async def _watchdog(self, stop: asyncio.Event) -> None:
        await self.notifier.run_watchdog(stop, self._healthy)

    def _healthy(self) -> bool:
        """For systemd's watchdog: the event loop turns (or this would not run) and, once
        started, the alarm writer and the lease keeper are alive (the supervisor restarts
        them when they die; a daemon where they stay dead is better restarted whole)."""
        return not self._started or {"writer", "leases"} <= set(self.supervisor.names)

    async def _prepare_database(self, stop: asyncio.Event) -> bool:
        """Migrate, retrying while the database is not reachable yet."""
        failures = 0
        while not stop.is_set():
            try:
                await migrate(self.store.engine)
                self.readiness.mark_ready()
                return True
            except MigrationNeeded as exc:  # waits for `cms-ingest migrate` as the migrator
                failures += 1
                self.readiness.reason = str(exc)
                if failures == 1:
                    log.error("database_migration_needed", error=str(exc))
                self.notifier.status("waiting for `cms-ingest migrate` (schema behind the code)")
            except Exception as exc:  # the database may simply not be up yet
                failures += 1
                self.readiness.reason = f"database: {exc}"
                if failures == 1 or failures % 10 == 0:
                    log.warning("database_unavailable", error=str(exc), attempt=failures)
                self.notifier.status(f"waiting for the database (attempt {failures})")
            await sleep_or_stop(STARTUP_RETRY.delay(failures), stop)
        return False

    def _start_parts(self, sites: SiteRegistry) -> None:
        """Build the parts over the sites and start them, the lease keeper last: it starts
        the pollers, which commit through the writer."""
        config = self.config
        metrics = self.metrics

        # The writer commits under the leases the poller set holds and wakes the media
        # fetcher, which serves those sites; the pollers commit through the writer. So the
        # writer is built first and reaches the other two through these.
        def media_added() -> None:
            media.wake()

        def sites_taken() -> None:  # their queued media and actions are ours to claim now
            media.wake()
            actions.wake()

        def lease_of(site_id: str) -> SiteLease | None:
            return pollers.lease_of(site_id)

        def media_deadline_of(site_id: str) -> float:
            return pollers.media_deadline_of(site_id)

        writer = AlarmWriter(
            self.store,
            on_media_added=media_added,
            lease_of=lease_of,
            media_deadline_of=media_deadline_of,
            metrics=metrics,
        )
        pollers = PollerSet(
            self.supervisor,
            sites,
            self.store,
            writer,
            daemon_id=self.identity.daemon_id,
            media_deadline_s=config.media.deadline_s,
            flood=config.flood,
            metrics=metrics,
            on_sites_taken=sites_taken,
        )
        media = MediaFetcher(
            self.store,
            sites,
            root=config.data_dir / "media",
            config=config.media,
            held=pollers.held_ids,
            metrics=metrics,
        )
        actions = ActionWorker(
            self.store, sites, config=config.actions, held=pollers.held_ids, metrics=metrics
        )
        keeper = LeaseKeeper(
            LeaseStore(self.store.engine),
            self.identity,
            config.lease_ttl,
            pollers,
            metrics=metrics,
        )
        housekeeping = Housekeeping(
            self.store,
            sites,
            pollers,
            self.readiness,
            actions_may_run_s=max(
                config.actions.running_timeout_s, config.actions.attempt_timeout_s
            ),
            report_status=lambda: self.notifier.status(self._status_line()),
            metrics=metrics,
        )
        outbox = OutboxStore(self.store.engine)
        self.forwarders = [
            ForwarderSender(
                forwarder,
                outbox,
                owner=self.identity.daemon_id,
                lease_ttl_s=config.lease_ttl,
                metrics=metrics,
            )
            for forwarder in config.forwarders
        ]
        self.sites, self.pollers, self.keeper = sites, pollers, keeper
        self.reloader.sites_running(sites, keeper)
        self._sites_built.set()
        self.supervisor.start("writer", writer.run)
        self.supervisor.start("media", media.run)
        self.supervisor.start("actions", actions.run)
        self.supervisor.start("listener", self._listener(keeper, actions).run)
        self.supervisor.start("housekeeping", housekeeping.run)
        for sender in self.forwarders:
            self.supervisor.start(f"forwarder:{sender.config.name}", sender.run)
        self.supervisor.start("leases", keeper.run)

    def _listener(self, keeper: LeaseKeeper, actions: ActionWorker) -> Listener:
        """LISTEN: another daemon's lease notice wakes the keeper, a queued action the
        action worker (and every reconnect too: a notice may have been missed)."""

        def on_notify(channel: str, _payload: str) -> None:
            if channel == LEASES_CHANNEL:
                keeper.kick()
            elif channel == DELIVERIES_CHANNEL:
                for sender in self.forwarders:
                    sender.wake()
            else:
                actions.wake()

        return Listener(
            self.url,
            ["cms_actions", LEASES_CHANNEL, DELIVERIES_CHANNEL],
            on_notify=on_notify,
            on_connect=actions.wake,
        )

    # ------------------------------------------------------------------ reload (SIGHUP)

    def request_reload(self) -> None:
        """SIGHUP: reload the config file; reloads asked for during one run once more after."""
        self.reloader.request()

    def _status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status cms-ingest` shows."""
        held = len(self.pollers.held) if self.pollers is not None else 0
        text = f"{len(self.config.sites)} site(s) configured, {held} held by this daemon"
        if not self.readiness.database_ok:
            text += "; database unreachable"
        return text

    # ------------------------------------------------------------------ stop

    async def _shutdown(self, session: aiohttp.ClientSession) -> None:
        """Ordered: nothing new is polled, what was polled is committed, the leases go to
        the other daemons at once, then the queues settle. The `stopped` line says how long
        each step took (a slow stop under systemd's timeout is found there)."""
        phases = _PhaseClock()
        # The lease keeper and the pollers stop together: a keeper tick under way (slow
        # with thousands of sites polling) must not keep every poller polling meanwhile.
        keeper_stopped = asyncio.ensure_future(self.supervisor.stop_tasks(["leases"], timeout=2.0))
        if self.pollers is not None:
            await self.pollers.halt()  # from now on it starts none, whatever the keeper takes
        await keeper_stopped
        phases.done("pollers")
        await self.supervisor.stop_tasks(["writer"], timeout=2.0)
        phases.done("writer")
        if self.keeper is not None:
            await self.keeper.release_all(reason="shutdown")
        phases.done("leases")
        # With the queues, the forwarders: one cut short mid-message leaves its row pending,
        # resent later with the same sequence number.
        senders = [f"forwarder:{sender.config.name}" for sender in self.forwarders]
        await self.supervisor.stop_tasks(["media", "actions", *senders], timeout=6.0)
        phases.done("queues")
        await self.supervisor.stop_all(timeout=2.0)
        phases.done("tasks")
        if self.sites is not None:
            await self.sites.close()
        phases.done("sites")
        await session.close()  # every site's keep-alive connection
        phases.done("connections")
        await self.store.engine.dispose()
        phases.done("database")
        log.info("stopped", took_s=phases.took)

    async def first_polls(self) -> None:
        """Until every configured site was polled once (the demo and tests start there)."""
        await self._sites_built.wait()
        assert self.sites is not None
        await asyncio.gather(*(site.health.polled.wait() for site in self.sites))

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        held = self.pollers.held if self.pollers is not None else {}
        return {
            "ready": self.readiness.ready,
            "instance": self.identity.daemon_id,
            "live_daemons": self.keeper.live if self.keeper else [],
            "sites_owned": len(held),
            "tasks": self.supervisor.names,
            "sites": [_site_status(site, site.config.id in held) for site in self.sites or []],
            "forwarders": [sender.status() for sender in self.forwarders],
        }


def _site_status(site: SiteRuntime, held: bool) -> dict[str, Any]:
    """A site in `/status`: its health only when this daemon holds it (another daemon's
    view of it is that daemon's)."""
    health = site.health
    return {
        "site_id": site.config.id,
        "vendor": site.config.vendor,
        "owned": held,
        "up": health.up if held else None,
        "consecutive_failures": health.consecutive_failures if held else 0,
        "last_success_at": health.last_success_at if held else None,
        "last_error": health.last_error if held else None,
        "clock_skew_s": site.problems.skew_s,
        "bad_input": site.problems.kinds_seen,
    }


async def run_daemon(
    config: AppConfig,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[Daemon], None] | None = None,
    building_sites: Callable[[], AbstractContextManager[None]] | None = None,
) -> None:
    """Run until `stop` is set (by default: until SIGTERM/SIGINT)."""
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)  # before the embedded database starts: it is stopped too
    async with database_url(config) as url:
        daemon = Daemon(config, url, building_sites=building_sites)
        if own_signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.request_reload)
        if on_started is not None:
            on_started(daemon)
        await daemon.run(stop)


class _PhaseClock:
    """Seconds each step of a sequence took, by name."""

    def __init__(self) -> None:
        self.took: dict[str, float] = {}
        self._since = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.took[phase] = round(now - self._since, 3)
        self._since = now
