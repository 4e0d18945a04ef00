"""The poller set: the running pollers, and which sites this daemon holds.

Both facts live here and nowhere else. The lease keeper decides which sites this daemon
holds and drives the set through `start` (sites under their lease epochs) and `stop`; the
media fetcher, the action worker, housekeeping and `status` only read `held`.

A site is held from the moment its poller is started until `stop` is asked for it, so the
queues stop serving a site at once when it is being handed over; `stop` returns once the
poller's last commit is done, which is when its lease may be released. Until then the
writer still commits the site's polls under its lease (`lease_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from cms_ingest.config import FloodConfig
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.domain import CommHistory, SiteHealth, SiteLease
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.comm_loss import CommLossTracker
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.runtime.poller import SitePoller
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.tasks import Gate, Interrupt, TaskSupervisor, in_slices
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.storage_ports import PollCommits, SiteHealthRecords

log = structlog.get_logger("cms_ingest.pollers")

POLLER_PREFIX = "poller:"
STOP_TIMEOUT_S = 3.0  # a poller's last poll and commit; then its task is cancelled
# A poll still waiting for its device this long after the stop is cut short (the cursor stays
# where the last commit put it: the next holder asks again); one committing is waited for.
INTERRUPT_POLLS_AFTER_S = 0.2
# Sites started together (a daemon's start, a take-over) have their first polls spread so
# that at most this many begin per second: a first poll logs in and reads the device's
# cameras and settings (several requests), 10,000 at once saturate a core for seconds.
FIRST_POLLS_PER_S = 2000.0
# And at most this many first polls at once: a first poll costs ~1 ms of CPU, so 2,000 a
# second is more than a core can give; unbounded, the loop fell behind and turned in
# 0.25-1 s steps while a joining daemon took 5,000 sites. Bounded, a take-over goes as
# fast as the CPU allows and every other site's poll still runs on time.
FIRST_POLLS_AT_ONCE = 32


def task_name(site_id: str) -> str:
    return f"{POLLER_PREFIX}{site_id}"


class PollerStorage(PollCommits, SiteHealthRecords, Protocol):
    """What the poller set needs from storage: the stored cursors and comm histories its
    pollers start from, and the site health it writes down when they stop."""


class PollerSet:
    def __init__(
        self,
        tasks: TaskSupervisor,
        sites: SiteRegistry,
        store: PollerStorage,
        writer: AlarmWriter,
        *,
        daemon_id: str,
        media_deadline_s: float,
        flood: FloodConfig,
        metrics: Metrics | None = None,
        on_sites_taken: Callable[[], None] | None = None,
    ) -> None:
        """`on_sites_taken`: called once sites were started here, so the media fetcher
        and the action worker claim their queued rows now, not at their next sweep."""
        self._tasks = tasks
        self._on_sites_taken = on_sites_taken
        self._metrics = metrics if metrics is not None else Metrics()
        self._sites = sites
        self._store = store
        self._writer = writer
        self._daemon_id = daemon_id
        self._media_deadline_s = media_deadline_s  # unless the site sets its own
        self._flood = flood
        self._held: dict[str, int] = {}  # site_id -> lease epoch
        self._pollers: dict[str, SitePoller] = {}  # the running pollers, by site
        self._halted = False  # shutdown under way: no poller starts any more
        # Sites being stopped: no longer held, but their pollers' last commits are still
        # made under these epochs.
        self._stopping: dict[str, int] = {}
        self._first_polls = Gate(FIRST_POLLS_AT_ONCE)

    @property
    def held(self) -> Mapping[str, int]:
        """The sites this daemon holds, each with its lease epoch (read-only)."""
        return MappingProxyType(self._held)

    def held_ids(self) -> list[str]:
        return list(self._held)

    def lease_of(self, site_id: str) -> SiteLease | None:
        """The lease the site's polls are committed under; None once its poller has
        stopped or when this daemon never held it (the writer refuses such commits)."""
        epoch = self._held.get(site_id, self._stopping.get(site_id))
        return None if epoch is None else SiteLease(self._daemon_id, epoch)

    def media_deadline_of(self, site_id: str) -> float:
        """Seconds the site's media may take: its own setting, else the daemon's."""
        site = self._sites.get(site_id)
        own = site.config.media_deadline_s if site is not None else None
        return own or self._media_deadline_s

    def configured(self) -> list[str]:
        """Every configured site: those a poller could be started for."""
        return list(self._sites.by_id)

    async def start(self, leases: Mapping[str, int], *, overdue: Iterable[str] = ()) -> set[str]:
        """Pollers for sites whose lease was just taken, each from its committed cursor
        (read now: the previous holder may have advanced it a moment ago). Returns the
        sites started: none when their stored state could not be read, or once halted.
        `overdue`: sites taken over from a dead daemon, polled first (no 1 s spread)."""
        overdue = set(overdue)
        ids = [site_id for site_id in leases if self._sites.get(site_id) is not None]
        try:
            cursors = await self._store.load_cursors(ids)
            histories = await self._store.supervision_states(ids)
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="start_sites").inc()
            log.warning("sites_not_started", sites=len(ids), error=str(exc))
            return set()
        start_within_s = len(ids) / FIRST_POLLS_PER_S
        started: set[str] = set()
        async for part in in_slices(ids):
            if self._halted:  # shutting down: a last keeper tick's leases are given back
                break
            for site_id in part:
                self._held[site_id] = leases[site_id]
                poller = self._poller(
                    site_id,
                    cursors.get(site_id),
                    histories[site_id],
                    start_within_s,
                    overdue=site_id in overdue,
                )
                self._pollers[site_id] = poller
                self._tasks.start(task_name(site_id), poller.run)
                started.add(site_id)
        if started and self._on_sites_taken is not None:
            self._on_sites_taken()
        return started

    def _poller(
        self,
        site_id: str,
        cursor: Mapping[str, Any] | None,
        history: CommHistory,
        start_within_s: float,
        *,
        overdue: bool = False,
    ) -> SitePoller:
        site = self._sites.client_for_tenure(site_id)  # fresh client and health when reused
        return SitePoller(
            site,
            self._writer,
            cursor=cursor,
            comm_loss=CommLossTracker(
                site_id=site_id,
                timeout_s=site.config.supervision_timeout,
                restore_after_s=site.options.restore_after_s,
                history=history,
            ),
            flood=FloodTracker(
                max_per_minute=self._flood.max_per_minute,
                quiet_s=self._flood.quiet_s,
                fetch_media=self._flood.fetch_media,
            ),
            metrics=self._metrics,
            start_within_s=start_within_s,
            overdue=overdue,
            first_poll_gate=self._first_polls,
        )

    async def stop(self, site_ids: Iterable[str]) -> None:
        """Stop these sites' pollers and wait for their last commit; no longer held. Their
        clients' background tasks (a long-poll per logger) end with the tenure, their
        health is written down and their per-site gauges withdrawn (the next holder
        exports them)."""
        ids = list(site_ids)
        for site_id in ids:
            if site_id in self._held:
                self._stopping[site_id] = self._held.pop(site_id)
        try:
            await self._tasks.stop_tasks(
                [task_name(site_id) for site_id in ids],
                timeout=STOP_TIMEOUT_S,
                interrupt=self._polls_in_flight("hand-off"),
            )
        finally:
            for site_id in ids:
                self._stopping.pop(site_id, None)
                self._pollers.pop(site_id, None)
        snapshots: list[SiteHealth] = []
        async for part in in_slices(ids):
            for site_id in part:
                self._retire_vendor_tasks(site_id)
            snapshots += self.health_snapshots(part)
        await self._metrics.forget_sites_in_slices(ids)
        try:
            await self._store.record_health(snapshots)
        except DatabaseUnavailable as exc:
            log.warning("health_not_recorded", sites=len(snapshots), error=str(exc))

    def _retire_vendor_tasks(self, site_id: str) -> None:
        # Only polls open them; an action still running on the client needs none. A later
        # tenure of the site here gets a fresh client (`client_for_tenure`).
        runtime = self._sites.get(site_id)
        if runtime is not None:
            runtime.tasks.retire()

    async def halt(self) -> None:
        """Shutdown: every poller stopped at once, its last poll handed to the writer. The
        sites stay held until their leases are released, after the writer has drained."""
        self._halted = True  # nothing starts from now on, whatever a keeper tick took
        await self._tasks.stop_matching(
            POLLER_PREFIX,
            timeout=STOP_TIMEOUT_S,
            interrupt=self._polls_in_flight("shutdown"),
            gentle=False,  # every site stops: nothing else is held up, so at once
        )

    def _polls_in_flight(self, reason: str) -> Interrupt:
        """Stopping pollers: one still waiting for its device after a moment is cut short
        (nothing of that poll was committed, its cursor stays); one committing finishes."""

        def may(name: str) -> bool:
            poller = self._pollers.get(name.removeprefix(POLLER_PREFIX))
            return poller is None or not poller.committing

        return Interrupt(after_s=INTERRUPT_POLLS_AFTER_S, may=may, reason=reason)

    def health_snapshots(self, site_ids: Iterable[str] | None = None) -> list[SiteHealth]:
        """The health to write down of these sites (default: the held ones), each once it
        changed."""
        ids = self.held_ids() if site_ids is None else site_ids
        runtimes = (self._sites.get(site_id) for site_id in ids)
        snapshots = (runtime.health.snapshot() for runtime in runtimes if runtime is not None)
        return [snapshot for snapshot in snapshots if snapshot is not None]
