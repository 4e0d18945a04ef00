"""The lease keeper: which of the configured sites this daemon polls.

Every few seconds it heartbeats, renews the leases it holds, and compares what it holds with
its fair share of the sites among the live daemons:
- a lease found gone (another daemon took it while we were paused or cut off) stops that
  site's poller at once; its commits were refused anyway (fencing, in the commit);
- above its share it hands sites over gracefully: poller stopped, its last commit done, then
  the lease released, so the next daemon starts from the committed cursor;
- below its share it takes free leases, each at a new epoch, and starts pollers;
- whatever its share, it takes every lease another daemon let expire (dead, frozen, cut
  off), so those sites are polled again within lease_ttl plus one tick.
While the database is unreachable the leases cannot be renewed: past 80 % of `lease_ttl`
the keeper stops its pollers itself, since another daemon may take them when they expire.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.domain import DaemonIdentity, Heartbeat
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.tasks import wake_or_stop
from cms_ingest.storage_ports import SiteLeases

log = structlog.get_logger("cms_ingest.leases")

# A silent daemon's leases are looked at this long after they expire (the two clocks: ours
# and the database's, which judges expiry).
ORPHAN_MARGIN_S = 0.05
SELF_FENCE_AT = 0.8  # of lease_ttl without a renewal: stop polling before anyone may take over


class Pollers(Protocol):
    """What the keeper drives: the pollers of the sites this daemon holds (`PollerSet`,
    which owns `held`)."""

    @property
    def held(self) -> Mapping[str, int]:
        """site_id -> lease epoch of every site whose poller runs."""
        ...

    def configured(self) -> list[str]: ...

    async def start(self, leases: Mapping[str, int], *, overdue: Iterable[str] = ()) -> set[str]:
        """Start pollers under these leases (`overdue`: taken over from a dead daemon,
        polled first); returns the sites actually started."""
        ...

    async def stop(self, site_ids: Iterable[str]) -> None:
        """Stop these sites' pollers and wait until their last commit is done."""
        ...


def fair_share(sites: int, live: Sequence[str], me: str) -> int:
    """This daemon's number of sites: an even split, the remainder going to the first ids,
    so every daemon computes the same split from the same membership."""
    members = sorted(set(live) | {me})
    base, extra = divmod(sites, len(members))
    return base + (1 if members.index(me) < extra else 0)


def local_identity(instance_id: str | None) -> DaemonIdentity:
    host = socket.gethostname()
    pid = os.getpid()
    return DaemonIdentity(
        daemon_id=instance_id or f"{host}:{pid}",
        host=host,
        pid=pid,
        boot_id=_boot_id(),
        version=_version(),
    )


def _version() -> str:
    try:
        return importlib.metadata.version("cms-ingest")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a former process of ours (a container restarted under the same pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


class LeaseKeeper:
    """Holds this daemon's fair share of the site leases and drives the pollers to match.

    Its lock makes every change of what is held (a tick, a release, a reconfiguration,
    shutdown) happen one at a time; nothing outside the keeper takes it."""

    def __init__(
        self,
        store: SiteLeases,
        me: DaemonIdentity,
        ttl_s: float,
        pollers: Pollers,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self.me = me
        self._ttl_s = ttl_s
        self._pollers = pollers
        self.live: list[str] = []
        self._orphans_in_s: float | None = None
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        # After taking over expired leases, no rebalancing hand-off for a while: a daemon
        # that froze a moment ago still looks live and would be handed sites it never takes.
        self._hold_surplus_until = 0.0
        self._renewed_at: float | None = None  # monotonic time of the last good heartbeat
        self._db_failing = False
        self._rows_needed = True  # lease rows must exist for newly configured sites
        self._server_started_at: datetime | None = None
        # Read at each scrape from this keeper: the gauges belong to this daemon's metrics.
        self._metrics.sites_owned.set_function(lambda: len(self._pollers.held))
        self._metrics.daemons_live.set_function(lambda: len(self.live))

    @property
    def interval_s(self) -> float:
        return min(2.0, self._ttl_s / 3)

    @property
    def fresh_s(self) -> float:
        """A daemon whose last heartbeat is older than this no longer counts as live for the
        split, though its leases have not expired yet: one frozen or dying after another
        died would otherwise keep a share of the dead one's sites, and those would wait for
        its leases to expire too (two lease periods). Two missed beats and a half, at
        least a third of the TTL (5 s for the default 15 s)."""
        return max(2.5 * self.interval_s, self._ttl_s / 3)

    @property
    def _held(self) -> Mapping[str, int]:
        return self._pollers.held

    def kick(self) -> None:
        """Look again now (another daemon released sites or joined, or the config changed)."""
        self._kick.set()

    def sites_changed(self) -> None:
        self._rows_needed = True
        self.kick()

    async def run(self, stop: asyncio.Event) -> None:
        await self._forget_dead_local_daemons()
        while not stop.is_set():
            async with self._lock:
                await self._tick()
            await wake_or_stop(self._kick, stop, self._next_tick_in_s())

    def _next_tick_in_s(self) -> float:
        """The tick interval, or sooner: just after a silent daemon's leases expire, so its
        sites are polled again within lease_ttl of its last beat, not a tick later."""
        orphans_in_s = self._orphans_in_s
        if orphans_in_s is None:
            return self.interval_s
        return min(self.interval_s, max(0.0, orphans_in_s) + ORPHAN_MARGIN_S)

    async def _forget_dead_local_daemons(self) -> None:
        """A daemon of this machine that died (a crash, SIGKILL, a restart) left leases that
        would block its sites for lease_ttl; its process is provably gone, so free them now."""
        try:
            local = await self._store.local_daemons(self.me.host, self.me.boot_id)
            dead = [d for d, pid in local if d != self.me.daemon_id and _process_gone(pid)]
            freed = await self._store.expire_daemons(dead)
        except DatabaseUnavailable as exc:
            log.warning("dead_daemon_check_failed", error=str(exc))
            return
        if dead:
            log.info("previous_daemon_gone", daemons=dead, leases_freed=freed)

    async def _tick(self) -> None:
        try:
            if self._rows_needed:
                await self._store.ensure_sites(self._pollers.configured())
                self._rows_needed = False
            beat = await self._store.heartbeat(
                self.me, self._ttl_s, dict(self._held), fresh_s=self.fresh_s
            )
        except DatabaseUnavailable as exc:
            await self._database_failed(exc)
            return
        if self._renewed_at is None:
            await self._announce()  # the others rebalance now rather than at their next tick
        self._database_back()
        self._renewed_at = time.monotonic()
        await self._drop_lost(beat)
        await self._follow_server(beat.server_started_at)
        self.live = beat.live
        self._orphans_in_s = beat.orphans_in_s
        share = fair_share(len(self._pollers.configured()), beat.live, self.me.daemon_id)
        if len(self._held) > share and time.monotonic() >= self._hold_surplus_until:
            await self._hand_off(len(self._held) - share)
        # Also at or above its share: the leases another daemon let expire are taken at
        # once, whoever is live, so a dead or frozen daemon's sites never wait for a third
        # one (the surplus is handed on gracefully once `fresh_s` has passed, when a daemon
        # frozen meanwhile no longer counts as live).
        await self._acquire(max(0, share - len(self._held)))

    async def _announce(self) -> None:
        try:
            await self._store.announce(self.me.daemon_id)
        except DatabaseUnavailable as exc:
            log.warning("daemon_announce_failed", error=str(exc))

    async def _follow_server(self, started_at: datetime) -> None:
        """A database restarted or failed over may have lost its last commits (a crashed
        primary with asynchronous replication): the pollers' cursors in memory could be past
        what is stored. Restart them from the stored cursors; the unique key absorbs the
        overlap, so nothing is lost and nothing doubled. A site not restarted is no longer
        held: its lease is not renewed, expires, and is taken again."""
        before, self._server_started_at = self._server_started_at, started_at
        if before is None or before == started_at or not self._held:
            return
        log.warning(
            "database_server_changed",
            sites=len(self._held),
            note="restarted or failed over: pollers resume from the committed cursors",
        )
        leases = dict(self._held)
        await self._pollers.stop(leases)
        await self._pollers.start(leases)

    async def _drop_lost(self, beat: Heartbeat) -> None:
        lost = [site for site, epoch in self._held.items() if beat.renewed.get(site) != epoch]
        if not lost:
            return
        self._metrics.leases_lost.inc(len(lost))
        log.warning(
            "leases_lost",
            sites=len(lost),
            examples=sorted(lost)[:10],
            note="another daemon took them while this one could not renew; polling stopped",
        )
        await self._pollers.stop(lost)

    async def _hand_off(self, count: int) -> None:
        sites = sorted(self._held)[-count:]
        await self._release(sites, reason="rebalance")

    async def release(self, site_ids: Iterable[str], *, reason: str) -> None:
        """Hand these sites over: pollers stopped (their last commit done), then their
        leases given up at once for the other daemons."""
        async with self._lock:
            await self._release(site_ids, reason=reason)

    async def release_all(self, *, reason: str) -> None:
        """Shutdown: every lease released and the membership left, in one transaction."""
        async with self._lock:
            await self._release(list(self._held), reason=reason, leaving=True)

    async def reconfigure(
        self,
        *,
        removed: Iterable[str],
        changed: Iterable[str],
        apply: Callable[[], Awaitable[None]],
    ) -> None:
        """A reload: the leases of removed sites are released; changed sites held here are
        stopped, `apply` swaps the configuration, and they start again under the same
        leases from their committed cursors (a site that fails to start is released)."""
        async with self._lock:
            await self._release(removed, reason="removed from the config")
            restart = {site: self._held[site] for site in changed if site in self._held}
            await self._pollers.stop(restart)  # the leases stay ours
            await apply()
            started = await self._pollers.start(restart)
            failed = {site: epoch for site, epoch in restart.items() if site not in started}
            await self._give_up(failed, reason="restart failed")
        self.sites_changed()

    async def _release(
        self, site_ids: Iterable[str], *, reason: str, leaving: bool = False
    ) -> None:
        leases = {site: self._held[site] for site in site_ids if site in self._held}
        if not leases and not leaving:
            return
        await self._pollers.stop(list(leases))
        await self._give_up(leases, reason=reason, leaving=leaving)

    async def _give_up(
        self, leases: Mapping[str, int], *, reason: str, leaving: bool = False
    ) -> None:
        """Release leases whose pollers are stopped (and, when leaving, the membership)."""
        if not leases and not leaving:
            return
        try:
            released = await self._store.release(self.me.daemon_id, leases, leaving=leaving)
        except DatabaseUnavailable as exc:
            log.warning("lease_release_failed", error=str(exc), note="they expire by themselves")
            return
        self._metrics.lease_handoffs.inc(len(released))
        log.info("leases_released", reason=reason, sites=len(released))

    async def _acquire(self, count: int) -> None:
        candidates = [site for site in self._pollers.configured() if site not in self._held]
        try:
            taken = await self._store.acquire(self.me.daemon_id, self._ttl_s, candidates, count)
        except DatabaseUnavailable as exc:
            await self._database_failed(exc)
            return
        if not taken:
            return
        leases = {lease.site_id: lease.epoch for lease in taken}
        overdue = [lease.site_id for lease in taken if lease.previous_owner]
        started = await self._pollers.start(leases, overdue=overdue)
        not_started = {site: epoch for site, epoch in leases.items() if site not in started}
        if not_started:  # their cursors could not be loaded: let them go for another try
            try:
                await self._store.release(self.me.daemon_id, not_started)
            except DatabaseUnavailable as exc:
                log.warning("lease_release_failed", error=str(exc))
        takeovers = sorted({lease.previous_owner for lease in taken if lease.previous_owner})
        taken_over = sum(1 for lease in taken if lease.previous_owner)
        self._metrics.lease_takeovers.inc(taken_over)
        if taken_over:
            self._hold_surplus_until = time.monotonic() + self.fresh_s
        log.info(
            "leases_acquired",
            sites=len(started),
            taken_over=taken_over,
            from_daemons=takeovers,
            live_daemons=len(self.live),
        )

    async def _database_failed(self, exc: DatabaseUnavailable) -> None:
        self._metrics.db_errors.labels(operation="leases").inc()
        if not self._db_failing:
            self._db_failing = True
            log.error("lease_renewal_failed", error=str(exc), held=len(self._held))
        silent_for = time.monotonic() - (self._renewed_at or 0.0)
        if self._held and silent_for > SELF_FENCE_AT * self._ttl_s:
            log.warning(
                "leases_abandoned",
                sites=len(self._held),
                note="not renewed for too long; polling stopped until the database is back",
            )
            await self._pollers.stop(list(self._held))

    def _database_back(self) -> None:
        if self._db_failing:
            self._db_failing = False
            log.info("lease_renewal_recovered", held=len(self._held))
