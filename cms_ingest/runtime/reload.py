"""Reloading the config file (SIGHUP), as a supervised task of its own.

A reload validates the whole file first: an invalid file changes nothing. Then only the
sites that changed are touched: added ones get a lease row and are taken by the keeper's
fair split, removed ones are stopped and their leases released, changed ones are restarted
under the leases they hold, from their committed cursors. Settings that only apply at start
are reported and kept. SIGHUPs arriving during a reload are coalesced into one more reload.

The reloader owns the running config: the daemon and its parts read it from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from cms_ingest.config import AppConfig, ConfigError, ConfigProblem, SiteConfig, load_checked
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.leases import LeaseKeeper
from cms_ingest.runtime.sdnotify import SystemdNotifier
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.tasks import wake_or_stop

log = structlog.get_logger("cms_ingest.reload")

# Settings a reload cannot change in a running daemon: a changed value is reported and
# kept as it was until the next restart. Everything under `sites` (and `defaults`, which
# is merged into the sites) is applied live.
RESTART_ONLY_SETTINGS = (
    "database_url",
    "data_dir",
    "listen",
    "log_level",
    "log_format",
    "event_loop",
    "media",
    "actions",
    "flood",
    "lease_ttl",
    "instance_id",
    "forwarders",  # the senders and the store's delivery routes are built at start
)

IDLE_WAIT_S = 3600.0  # the task wakes on a request or at stop; this only bounds a wait


@dataclass(frozen=True, slots=True)
class SiteChanges:
    """What a new config changes among the sites, by id (each list sorted)."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: int

    @classmethod
    def between(cls, old: list[SiteConfig], new: list[SiteConfig]) -> SiteChanges:
        before = {site.id: site for site in old}
        after = {site.id: site for site in new}
        changed = sorted(i for i in before.keys() & after.keys() if before[i] != after[i])
        return cls(
            added=sorted(after.keys() - before.keys()),
            removed=sorted(before.keys() - after.keys()),
            changed=changed,
            unchanged=len(before.keys() & after.keys()) - len(changed),
        )


@dataclass(frozen=True, slots=True)
class _RunningSites:
    sites: SiteRegistry
    keeper: LeaseKeeper


class ConfigReloader:
    def __init__(
        self,
        config: AppConfig,
        notifier: SystemdNotifier,
        status_line: Callable[[], str],
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config  # the running config
        self._metrics = metrics if metrics is not None else Metrics()
        self._notifier = notifier
        self._status_line = status_line
        self._wake = asyncio.Event()
        self._pending = False  # a request not yet taken up by a reload
        self._running: _RunningSites | None = None  # None while waiting for the database

    def sites_running(self, sites: SiteRegistry, keeper: LeaseKeeper) -> None:
        """From now on a reload changes the running sites, not only the config."""
        self._running = _RunningSites(sites, keeper)

    def request(self) -> None:
        """SIGHUP: reload soon; requests during a reload make one more reload after it."""
        self._pending = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The `reload` task: one reload per request, or per burst of requests."""
        while not stop.is_set():
            await wake_or_stop(self._wake, stop, IDLE_WAIT_S)
            if self._pending and not stop.is_set():
                self._pending = False
                await self.reload()

    async def reload(self) -> bool:
        """Validate the whole file, then start, stop or restart only the sites that changed.
        An invalid file changes nothing. True when the new config was applied."""
        path = self.config.config_path
        log.info("config_reloading", path=str(path))
        self._notifier.reloading()
        try:
            return await self._reload_from(path)
        finally:
            # READY=1 only once the sites are started or stopped: systemd's reload ends here.
            self._notifier.ready(self._status_line())

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
            self._metrics.config_reloads.labels(outcome="invalid").inc()
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
            self._metrics.config_reloads.labels(outcome="failed").inc()
            log.exception("config_reload_failed")
            return False
        self._metrics.config_reloads.labels(outcome="applied").inc()
        return True

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
        changes = SiteChanges.between(self.config.sites, new.sites)
        if self._running is None:  # still waiting for the database: the sites start later
            self._take_sites(new)
        else:
            await self._apply_sites(self._running, new, changes)
        log.info(
            "config_reloaded",
            added=changes.added,
            removed=changes.removed,
            changed=changes.changed,
            unchanged=changes.unchanged,
        )

    def _take_sites(self, new: AppConfig) -> None:
        self.config = self.config.model_copy(update={"sites": new.sites})

    async def _apply_sites(
        self, running: _RunningSites, new: AppConfig, changes: SiteChanges
    ) -> None:
        fresh = {site.id: site for site in new.sites}

        async def swap_sites() -> None:
            self._take_sites(new)
            for site_id in changes.removed:
                await running.sites.remove(site_id)
            for site_id in changes.changed:
                await running.sites.replace(fresh[site_id])
            for site_id in changes.added:
                running.sites.add(fresh[site_id])

        await running.keeper.reconfigure(
            removed=changes.removed, changed=changes.changed, apply=swap_sites
        )
