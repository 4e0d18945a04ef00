"""The daemon: wires the database, the sites and the runtime parts, and shuts down in order.

Start: HTTP endpoints first (so /healthz answers while the database comes up), then the
database (embedded when no `database_url`), migrations, the shared workers, and the lease
keeper, which starts one poller per site whose lease this daemon holds (all of them when it
runs alone). Stop (SIGTERM/SIGINT): pollers, then the alarm writer drains what they handed
it, the leases are released for the other daemons, then media and actions settle or release
their rows; well inside 15 seconds. SIGHUP reloads the config file (`reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from cms_ingest import metrics
from cms_ingest.config import AppConfig, ConfigError, ConfigProblem, SiteConfig
from cms_ingest.configcheck import load_checked
from cms_ingest.db.engine import MigrationNeeded, create_engine, embedded_postgres, migrate
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.db.leases import LEASES_CHANNEL, LeaseStore
from cms_ingest.db.notify import Listener
from cms_ingest.db.store import Store
from cms_ingest.domain import SiteLease
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.actions import ActionWorker
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.runtime.httpserver import Readiness, make_app, serve
from cms_ingest.runtime.leases import LeaseKeeper, local_identity
from cms_ingest.runtime.looplag import LoopLagMonitor
from cms_ingest.runtime.media import MediaFetcher
from cms_ingest.runtime.poller import SitePoller
from cms_ingest.runtime.sdnotify import SystemdNotifier
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.supervision import OpenOutage, Supervision
from cms_ingest.runtime.supervisor import Supervisor, sleep_or_stop
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.sitehttp import new_client_session
from cms_ingest.vendors import OPTIONS_MODELS

log = structlog.get_logger("cms_ingest.daemon")

STARTUP_RETRY = RetryPolicy(base=1.0, factor=2.0, cap=15.0, jitter=0.2)
HOUSEKEEPING_INTERVAL_S = 5.0


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


# Settings a reload cannot change in a running daemon: a changed value is reported and
# kept as it was until the next restart. Everything under `sites` (and `defaults`, which
# is merged into the sites) is applied live.
RESTART_ONLY_SETTINGS = (
    "database_url",
    "data_dir",
    "listen",
    "log_level",
    "log_format",
    "media",
    "actions",
    "flood",
    "lease_ttl",
    "instance_id",
)


class Daemon:
    def __init__(self, config: AppConfig, url: str) -> None:
        self.config = config
        self.url = url
        self.readiness = Readiness()
        self.supervisor = Supervisor()
        # A frozen daemon's transaction is ended well before its leases expire.
        idle_s = max(2.0, config.lease_ttl / 2)
        self.store = Store(create_engine(url, idle_in_transaction_s=idle_s))
        self.identity = local_identity(config.instance_id)
        self.notifier = SystemdNotifier.from_environment()
        self.sites: SiteRegistry | None = None
        self.keeper: LeaseKeeper | None = None
        self._writer: AlarmWriter | None = None
        self._sites_built = asyncio.Event()
        self._started = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False

    async def run(self, stop: asyncio.Event) -> None:
        session = new_client_session()
        try:
            self.supervisor.start("http", self._serve_http)
            self.supervisor.start("watchdog", self._watchdog)
            self.supervisor.start("loop_lag", LoopLagMonitor().run)
            if not await self._prepare_database(stop):
                return
            self.sites = SiteRegistry(self.config, session)
            self._sites_built.set()
            self._start_parts(self.sites)
            self._started = True
            self.notifier.ready(self._status_line())
            log.info(
                "started",
                sites=len(self.sites),
                listen=self.config.listen,
                instance=self.identity.daemon_id,
            )
            await stop.wait()
        finally:
            self.notifier.stopping()
            await self._shutdown()
            await session.close()
            await self.store.engine.dispose()

    # ------------------------------------------------------------------ start

    async def _serve_http(self, stop: asyncio.Event) -> None:
        app = make_app(self.readiness, self.status)
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
        media = MediaFetcher(
            self.store, sites, root=self.config.data_dir / "media", config=self.config.media
        )
        actions = ActionWorker(self.store, sites, config=self.config.actions)
        self._writer = AlarmWriter(
            self.store,
            on_media_added=media.wake,
            lease_of=self._lease_of,
            media_deadline_of=self._media_deadline_of,
        )
        self.keeper = LeaseKeeper(
            LeaseStore(self.store.engine), self.identity, self.config.lease_ttl, control=self
        )
        keeper = self.keeper

        def on_notify(channel: str, _payload: str) -> None:
            if channel == LEASES_CHANNEL:
                keeper.kick()
            else:
                actions.wake()

        listener = Listener(
            self.url, ["cms_actions", LEASES_CHANNEL], on_notify=on_notify, on_connect=actions.wake
        )
        self.supervisor.start("writer", self._writer.run)
        self.supervisor.start("media", media.run)
        self.supervisor.start("actions", actions.run)
        self.supervisor.start("listener", listener.run)
        self.supervisor.start("housekeeping", self._housekeeping)
        self.supervisor.start("leases", keeper.run)

    def _lease_of(self, site_id: str) -> SiteLease | None:
        """The lease this daemon polls `site_id` under, None when it does not hold it. Read
        from the lease keeper, which keeps a site until its poller has stopped."""
        epoch = self.keeper.held.get(site_id) if self.keeper is not None else None
        return None if epoch is None else SiteLease(self.identity.daemon_id, epoch)

    def _media_deadline_of(self, site_id: str) -> float:
        site = self.sites.get(site_id) if self.sites is not None else None
        deadline = site.config.media_deadline_s if site is not None else None
        return deadline or self.config.media.deadline_s

    # ------------------------------------------------------------------ sites (SiteControl)

    def configured(self) -> list[str]:
        return [site.id for site in self.config.sites]

    async def start_sites(self, leases: dict[str, int]) -> set[str]:
        """Pollers for sites whose lease we just took, each from its committed cursor (read
        now: the previous holder may have advanced it a moment ago)."""
        assert self.sites is not None
        ids = [site_id for site_id in leases if self.sites.get(site_id) is not None]
        try:
            cursors = await self.store.load_cursors(ids)
            supervision = await self.store.supervision_states(ids)
        except DatabaseUnavailable as exc:
            metrics.DB_ERRORS.labels(operation="start_sites").inc()
            log.warning("sites_not_started", sites=len(ids), error=str(exc))
            return set()
        for site_id in ids:
            self._start_poller(
                site_id, leases[site_id], cursors.get(site_id), supervision.get(site_id)
            )
        return set(ids)

    def _start_poller(
        self,
        site_id: str,
        epoch: int,
        cursor: Any,
        supervision: tuple[Any, Any] | None,
    ) -> None:
        assert self.sites is not None
        assert self._writer is not None
        site = self.sites.client_for_tenure(site_id)  # fresh client and health when reused
        last_success, outage = supervision or (None, None)
        poller = SitePoller(
            site,
            self._writer,
            cursor=cursor,
            supervision=Supervision(
                site_id=site_id,
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
        self.sites.owned[site_id] = epoch
        self.supervisor.start(f"poller:{site_id}", poller.run)

    async def stop_sites(self, site_ids: Iterable[str]) -> None:
        """Stop pollers and wait for their last commit; their health is written down and
        their per-site gauges withdrawn (the next holder exports them)."""
        assert self.sites is not None
        ids = list(site_ids)
        for site_id in ids:
            self.sites.owned.pop(site_id, None)
        await self.supervisor.stop_tasks([f"poller:{site_id}" for site_id in ids], timeout=3.0)
        snapshots = []
        for site_id in ids:
            site = self.sites.get(site_id)
            snapshot = site.health.snapshot() if site else None
            if snapshot is not None:
                snapshots.append(snapshot)
            metrics.forget_site(site_id)
        try:
            await self.store.record_health(snapshots)
        except DatabaseUnavailable as exc:
            log.warning("health_not_recorded", sites=len(snapshots), error=str(exc))

    # ------------------------------------------------------------------ reload (SIGHUP)

    def request_reload(self) -> None:
        """SIGHUP: reload the config file; reloads asked for during one run once more after."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.create_task(self._reload_loop(), name="reload")

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> bool:
        """Validate the whole file, then start, stop or restart only the sites that changed.
        An invalid file changes nothing. True when the new config was applied."""
        path = self.config.config_path
        log.info("config_reloading", path=str(path))
        self.notifier.reloading()
        try:
            return await self._reload_from(path)
        finally:
            # READY=1 only once the sites are started or stopped: systemd's reload ends here.
            self.notifier.ready(self._status_line())

    async def _reload_from(self, path: Path | None) -> bool:
        try:
            if path is None:
                raise ConfigError([ConfigProblem("", "the daemon was not started from a file")])
            new = await asyncio.to_thread(load_checked, path)
        except Exception as exc:  # ConfigError, or a loader bug that must not kill the reload
            if isinstance(exc, ConfigError):
                problems = [str(problem) for problem in exc.problems]
            else:
                problems = [f"the file could not be read: {type(exc).__name__}"]
            metrics.CONFIG_RELOADS.labels(outcome="invalid").inc()
            log.error(
                "config_reload_refused",
                path=str(path),
                problems=problems,
                note="the running config is kept",
                exc_info=not isinstance(exc, ConfigError),
            )
            return False
        try:
            await self._apply(new)
        except Exception:
            metrics.CONFIG_RELOADS.labels(outcome="failed").inc()
            log.exception("config_reload_failed")
            return False
        metrics.CONFIG_RELOADS.labels(outcome="applied").inc()
        return True

    def _status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status cms-ingest` shows."""
        held = len(self.sites.owned) if self.sites is not None else 0
        text = f"{len(self.config.sites)} site(s) configured, {held} held by this daemon"
        if not self.readiness.database_ok:
            text += "; database unreachable"
        return text

    async def _apply(self, new: AppConfig) -> None:
        kept = [
            name
            for name in RESTART_ONLY_SETTINGS
            if getattr(new, name) != getattr(self.config, name)
        ]
        if kept:
            log.warning(
                "config_reload_needs_restart",
                settings=kept,
                note="these keep their running values until cms-ingest restarts",
            )
        old = {site.id: site for site in self.config.sites}
        fresh = {site.id: site for site in new.sites}
        removed = sorted(old.keys() - fresh.keys())
        added = sorted(fresh.keys() - old.keys())
        changed = sorted(i for i in old.keys() & fresh.keys() if old[i] != fresh[i])
        if self.sites is None or self.keeper is None:  # still waiting for the database
            self.config = self.config.model_copy(update={"sites": new.sites})
        else:
            await self._apply_sites(new, fresh, removed, added, changed)
        log.info(
            "config_reloaded",
            added=added,
            removed=removed,
            changed=changed,
            unchanged=len(fresh) - len(added) - len(changed),
        )

    async def _apply_sites(
        self,
        new: AppConfig,
        fresh: dict[str, SiteConfig],
        removed: list[str],
        added: list[str],
        changed: list[str],
    ) -> None:
        assert self.sites is not None
        assert self.keeper is not None
        keeper = self.keeper
        async with keeper.lock:
            await keeper.release(removed, reason="removed from the config")
            restart = {
                site_id: keeper.held[site_id] for site_id in changed if site_id in keeper.held
            }
            await self.stop_sites(restart)  # the leases stay ours
            self.config = self.config.model_copy(update={"sites": new.sites})
            for site_id in removed:
                await self.sites.remove(site_id)
            for site_id in changed:
                await self.sites.replace(fresh[site_id])
            for site_id in added:
                self.sites.add(fresh[site_id])
            started = await self.start_sites(restart)
            await keeper.release([s for s in restart if s not in started], reason="restart failed")
        keeper.sites_changed()

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Readiness, queue gauges and site health persisted, every few seconds."""
        while True:
            await self._housekeeping_once()
            if self.sites is not None:  # an action may run on a replaced client this long
                await self.sites.close_retired(self.config.actions.running_timeout_s + 10)
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
        except DatabaseUnavailable as exc:
            metrics.DB_ERRORS.labels(operation="housekeeping").inc()
            if self.readiness.database_ok:
                log.error("database_unreachable", error=str(exc))
            self.readiness.database_ok = False
            self.readiness.reason = f"database: {exc}"
        self.notifier.status(self._status_line())

    async def _flush_health(self) -> None:
        if self.sites is None:
            return
        owned = [self.sites.by_id[site_id] for site_id in list(self.sites.owned)]
        snapshots = [s for s in (site.health.snapshot() for site in owned) if s]
        await self.store.record_health(snapshots)

    # ------------------------------------------------------------------ stop

    async def _shutdown(self) -> None:
        """Ordered: nothing new is polled, what was polled is committed, the leases go to
        the other daemons at once, then the queues settle."""
        await self.supervisor.stop_tasks(["leases"], timeout=2.0)
        await self.supervisor.stop_matching("poller:", timeout=3.0)
        await self.supervisor.stop_tasks(["writer"], timeout=2.0)
        if self.keeper is not None:
            await self.keeper.release_all(reason="shutdown")
        await self.supervisor.stop_tasks(["media", "actions"], timeout=6.0)
        await self.supervisor.stop_all(timeout=2.0)
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self.sites is not None:
            await self.sites.close()
        log.info("stopped")

    async def first_polls(self) -> None:
        """Until every configured site was polled once (the demo and tests start there)."""
        await self._sites_built.wait()
        assert self.sites is not None
        await asyncio.gather(*(site.health.polled.wait() for site in self.sites))

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        sites = []
        owned = self.sites.owned if self.sites is not None else {}
        for site in self.sites or []:
            health = site.health
            held = site.config.id in owned
            sites.append(
                {
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
            )
        return {
            "ready": self.readiness.ready,
            "instance": self.identity.daemon_id,
            "live_daemons": self.keeper.live if self.keeper else [],
            "sites_owned": len(owned),
            "tasks": self.supervisor.names,
            "sites": sites,
        }


async def run_daemon(
    config: AppConfig,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[Daemon], None] | None = None,
) -> None:
    """Run until `stop` is set (by default: until SIGTERM/SIGINT)."""
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)  # before the embedded database starts: it is stopped too
    async with database_url(config) as url:
        daemon = Daemon(config, url)
        if own_signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.request_reload)
        if on_started is not None:
            on_started(daemon)
        await daemon.run(stop)
