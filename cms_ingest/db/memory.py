"""The storage ports in memory: no SQL, no I/O, the same semantics as PostgreSQL.

For direct, fast tests of the runtime parts (`tests/test_storage_conformance.py` proves it
behaves as the PostgreSQL adapter does). One `MemoryStorage` holds every table, so commits are
fenced by the same leases it hands out. Time comes from `clock` (a `ManualClock` in tests), so
expiry is tested without sleeping. `unavailable = True` makes every call raise
`DatabaseUnavailable`, as an unreachable database does.

Each method runs without awaiting anything, so it is one transaction: everything is checked
before anything changes, and a failed commit leaves no trace.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.db.storable import EXPIRED_ERROR as EXPIRED_ERROR  # noqa: PLC0414 (tests use)
from cms_ingest.db.storable import (
    NO_MEDIA_NOTE,
    storable_commit,
    storable_health,
    storable_json,
    storable_note,
    storable_result,
    storable_utc,
)
from cms_ingest.domain import (
    Acquired,
    Action,
    ActionState,
    Alarm,
    CommHistory,
    CommitResult,
    CommitTerms,
    DaemonIdentity,
    Delivery,
    ForwarderLease,
    Heartbeat,
    InsertedAlarm,
    LeaseRow,
    MediaJob,
    MediaKind,
    MediaState,
    OpenOutage,
    OutboxStats,
    PollCommit,
    RouteFilter,
    SiteHealth,
)

DAEMON_HISTORY = timedelta(days=1)  # daemons gone this long are forgotten (as in PostgreSQL)


class ManualClock:
    """A clock that moves only when told: `clock()` is now, `advance(s)` moves it on."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _AlarmRow:
    id: int
    alarm: Alarm
    received_at: datetime
    group_id: int | None = None
    repeat_count: int = 0


@dataclass(slots=True)
class _MediaRow:
    id: int
    alarm_id: int
    site_id: str
    kind: MediaKind
    state: MediaState
    locator: Mapping[str, Any]
    last_error: str | None
    deadline_at: datetime
    next_attempt_at: datetime
    updated_at: datetime
    attempts: int = 0
    claimed_until: datetime | None = None
    path: str | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None


@dataclass(slots=True)
class _ActionRow:
    id: int
    site_id: str
    kind: str
    target: str
    params: dict[str, Any]
    requested_by: str | None
    requested_at: datetime
    not_after: datetime | None
    next_attempt_at: datetime
    state: str = ActionState.QUEUED.value
    attempts: int = 0
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    claimed_until: datetime | None = None
    claimed_by: str | None = None


@dataclass(slots=True)
class _SiteState:
    site_id: str
    vendor: str
    updated_at: datetime
    cursor: Any = None
    cursor_updated_at: datetime | None = None
    last_poll_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0


@dataclass(slots=True)
class _Lease:
    site_id: str
    expires_at: datetime
    owner: str | None = None
    epoch: int = 0
    acquired_at: datetime | None = None


@dataclass(slots=True)
class _DeliveryRow:
    id: int
    forwarder: str
    alarm_id: int
    created_at: datetime
    state: str = "pending"
    seq: int | None = None
    attempts: int = 0
    first_sent_at: datetime | None = None
    finished_at: datetime | None = None
    last_answer: str | None = None
    last_error: str | None = None


@dataclass(slots=True)
class _ForwarderLease:
    forwarder: str
    expires_at: datetime
    owner: str | None = None
    epoch: int = 0
    next_seq: int = 1


@dataclass(slots=True)
class _Daemon:
    identity: DaemonIdentity
    heartbeat_at: datetime
    expires_at: datetime


def _before(moment: datetime | None, now: datetime) -> bool:
    """SQL's `moment < now()`: false for NULL."""
    return moment is not None and moment < now


@dataclass
class MemoryStorage:
    """Every storage port (`cms_ingest.storage_ports`) over plain Python objects."""

    clock: Callable[[], datetime] = _wall_clock
    rng: random.Random = field(default_factory=random.Random)
    unavailable: bool = False  # True: every call raises DatabaseUnavailable
    server_started_at: datetime = field(default_factory=_wall_clock)  # change it: a failover
    notices: list[str] = field(default_factory=list)  # `cms_leases` notifications sent
    alarms: dict[int, _AlarmRow] = field(default_factory=dict)
    media: dict[int, _MediaRow] = field(default_factory=dict)
    actions: dict[int, _ActionRow] = field(default_factory=dict)
    site_state: dict[str, _SiteState] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    daemons: dict[str, _Daemon] = field(default_factory=dict)
    routes: tuple[RouteFilter, ...] = ()  # the forwarders' filters (as Store's `routes`)
    deliveries: dict[int, _DeliveryRow] = field(default_factory=dict)
    forwarder_leases: dict[str, _ForwarderLease] = field(default_factory=dict)
    _by_source: dict[tuple[str, str], int] = field(default_factory=dict)
    _ids: dict[str, int] = field(default_factory=dict)

    def _reachable(self) -> datetime:
        """Now, unless the "database" is down."""
        if self.unavailable:
            raise DatabaseUnavailable(ConnectionRefusedError("in-memory storage is unavailable"))
        return self.clock()

    def _next_id(self, table: str) -> int:
        self._ids[table] = self._ids.get(table, 0) + 1
        return self._ids[table]

    def _of_sites(self, site_id: str, site_ids: Sequence[str] | None) -> bool:
        """The sites asked for, plus sites no daemon has a lease row for (as in SQL)."""
        return site_ids is None or site_id in site_ids or site_id not in self.leases

    # ------------------------------------------------------------------ poll commits

    async def ping(self) -> None:
        self._reachable()

    async def load_cursors(self, site_ids: Iterable[str]) -> dict[str, Mapping[str, Any] | None]:
        self._reachable()
        found = {site_id: state.cursor for site_id, state in self.site_state.items()}
        return {site_id: _copy(found.get(site_id)) for site_id in site_ids}

    async def supervision_states(self, site_ids: Iterable[str]) -> dict[str, CommHistory]:
        self._reachable()
        return {site_id: self._supervision_state(site_id) for site_id in site_ids}

    def _supervision_state(self, site_id: str) -> CommHistory:
        state = self.site_state.get(site_id)
        comm = [
            row
            for row in self.alarms.values()
            if row.alarm.site_id == site_id
            and row.alarm.event_type.value in ("comm_lost", "comm_restored")
        ]
        outage = None
        if comm:
            newest = max(comm, key=lambda row: row.id)
            silent = newest.alarm.raw.get("silent_since")
            if newest.alarm.event_type.value == "comm_lost" and silent:
                outage = OpenOutage(newest.alarm.source_id, datetime.fromisoformat(silent))
        return CommHistory(state.last_success_at if state else None, outage)

    async def commit_polls(
        self, commits: Sequence[PollCommit], terms: Mapping[str, CommitTerms]
    ) -> CommitResult:
        now = self._reachable()
        cleaned = [storable_commit(commit) for commit in commits]
        fenced = {c.site_id for c in cleaned if self._fenced(c.site_id, terms[c.site_id])}
        admitted = [commit for commit in cleaned if commit.site_id not in fenced]
        for commit in admitted:  # what PostgreSQL still refuses, before anything is written
            for alarm in commit.alarms:
                _check_storable_time(alarm.occurred_at)
        inserted: list[InsertedAlarm] = []
        for commit in admitted:
            inserted += self._write_commit(commit, terms[commit.site_id], now)
        return CommitResult(inserted, fenced)

    def _fenced(self, site_id: str, terms: CommitTerms) -> bool:
        """Whether the site's lease moved past the one its poll ran under (expiry alone does
        not fence: nobody else took it)."""
        if terms.lease is None:
            return False
        lease = self.leases.get(site_id)
        return lease is None or (lease.owner, lease.epoch) != terms.lease

    def _write_commit(
        self, commit: PollCommit, terms: CommitTerms, now: datetime
    ) -> list[InsertedAlarm]:
        inserted: list[InsertedAlarm] = []
        for alarm in commit.alarms:
            key = (alarm.site_id, alarm.source_id)
            if key in self._by_source:
                continue  # a replay: UNIQUE (site_id, source_id) absorbs it
            row = _AlarmRow(self._next_id("alarms"), alarm, now)
            self.alarms[row.id] = row
            self._by_source[key] = row.id
            inserted.append(InsertedAlarm(row.id, alarm.site_id, alarm.source_id))
            self._link_group(row)
            self._add_media(row, terms, now)
            for route in self.routes:
                if route.wants(alarm):
                    delivery = _DeliveryRow(
                        self._next_id("deliveries"), route.forwarder, row.id, now
                    )
                    self.deliveries[delivery.id] = delivery
        if commit.cursor is not None:
            state = self._state(commit.site_id, commit.vendor, now)
            state.cursor = _copy(commit.cursor)
            state.cursor_updated_at = state.updated_at = now
        return inserted

    def _link_group(self, row: _AlarmRow) -> None:
        """A flood member points at its burst's first alarm, whose repeat_count counts it."""
        if row.alarm.group_of is None:
            return
        head = self._by_source.get((row.alarm.site_id, row.alarm.group_of))
        if head is None:
            return
        row.group_id = head
        self.alarms[head].repeat_count += 1

    def _add_media(self, row: _AlarmRow, terms: CommitTerms, now: datetime) -> None:
        for request in row.alarm.media:
            media_id = self._next_id("media")
            self.media[media_id] = _MediaRow(
                id=media_id,
                alarm_id=row.id,
                site_id=row.alarm.site_id,
                kind=request.kind,
                state=MediaState.PENDING if request.available else MediaState.UNAVAILABLE,
                locator=_copy(dict(request.locator)),
                last_error=None if request.available else NO_MEDIA_NOTE,
                deadline_at=now + timedelta(seconds=terms.media_deadline_s),
                next_attempt_at=now,
                updated_at=now,
            )

    def _state(self, site_id: str, vendor: str, now: datetime) -> _SiteState:
        if site_id not in self.site_state:
            self.site_state[site_id] = _SiteState(site_id, vendor, now)
        return self.site_state[site_id]

    # ------------------------------------------------------------------ site health

    async def record_health(self, reports: Sequence[SiteHealth]) -> None:
        now = self._reachable()
        for report in map(storable_health, reports):
            state = self._state(report.site_id, report.vendor, now)
            state.last_poll_at = report.last_poll_at
            state.last_success_at = report.last_success_at or state.last_success_at
            state.consecutive_failures = report.consecutive_failures
            state.last_error = report.last_error
            state.updated_at = now

    async def queue_depths(self) -> dict[str, int]:
        self._reachable()
        open_states = (ActionState.QUEUED.value, ActionState.RUNNING.value)
        return {
            "media": sum(1 for row in self.media.values() if row.state is MediaState.PENDING),
            "actions": sum(1 for row in self.actions.values() if row.state in open_states),
        }

    # ------------------------------------------------------------------ media queue

    async def claim_media(
        self, *, limit: int, claim_s: float, site_ids: Sequence[str] | None = None
    ) -> list[MediaJob]:
        now = self._reachable()
        due = sorted(
            (
                row
                for row in self.media.values()
                if self._of_sites(row.site_id, site_ids)
                and row.state is MediaState.PENDING
                and row.next_attempt_at <= now
                and (row.claimed_until is None or row.claimed_until < now)
            ),
            key=lambda row: row.next_attempt_at,
        )[:limit]
        for row in due:
            row.claimed_until = now + timedelta(seconds=claim_s)
            row.updated_at = now
        return [self._job(row) for row in due]

    async def extend_media_claims(self, media_ids: Sequence[int], *, claim_s: float) -> None:
        now = self._reachable()
        for media_id in media_ids:
            row = self.media.get(media_id)
            if row is None or row.state is not MediaState.PENDING:
                continue
            if row.claimed_until is not None and row.claimed_until > now:  # still claimed
                row.claimed_until = now + timedelta(seconds=claim_s)

    def _job(self, row: _MediaRow) -> MediaJob:
        return MediaJob(
            id=row.id,
            alarm_id=row.alarm_id,
            site_id=row.site_id,
            kind=row.kind,
            locator=_copy(dict(row.locator)),
            attempts=row.attempts,
            deadline_at=row.deadline_at,
            occurred_at=self.alarms[row.alarm_id].alarm.occurred_at,
        )

    async def media_retry_later(
        self,
        media_id: int,
        *,
        delay_s: float,
        note: str | None,
        locator: Mapping[str, Any] | None = None,
    ) -> None:
        now = self._reachable()
        row = self.media.get(media_id)
        if row is None:
            return
        row.attempts += 1
        row.last_error = storable_note(note)
        row.next_attempt_at = now + timedelta(seconds=delay_s)
        row.claimed_until = None
        row.updated_at = now
        if locator is not None:
            row.locator = storable_json(locator)

    async def media_ready(
        self, media_id: int, *, path: str, content_type: str, size_bytes: int, sha256: str
    ) -> None:
        now = self._reachable()
        row = self.media.get(media_id)
        if row is None:
            return
        row.state = MediaState.READY
        row.path, row.content_type, row.size_bytes, row.sha256 = (
            path,
            content_type,
            size_bytes,
            sha256,
        )
        row.attempts += 1
        row.last_error = None
        row.claimed_until = None
        row.updated_at = now

    async def media_final(self, media_id: int, state: MediaState, reason: str) -> None:
        now = self._reachable()
        row = self.media.get(media_id)
        if row is None:
            return
        row.state = state
        row.last_error = storable_note(reason)
        row.attempts += 1
        row.claimed_until = None
        row.updated_at = now

    async def release_media(self, media_ids: Sequence[int]) -> None:
        self._reachable()
        for media_id in media_ids:
            if media_id in self.media:
                self.media[media_id].claimed_until = None

    # ------------------------------------------------------------------ actions

    async def enqueue_action(
        self,
        *,
        site_id: str,
        kind: str,
        target: str,
        params: Mapping[str, Any],
        requested_by: str | None,
        not_after: datetime | None = None,
    ) -> int:
        now = self._reachable()
        action_id = self._next_id("actions")
        self.actions[action_id] = _ActionRow(
            id=action_id,
            site_id=site_id,
            kind=kind,
            target=target,
            params=storable_json(dict(params)),
            requested_by=requested_by,
            requested_at=now,
            not_after=not_after,
            next_attempt_at=now,
        )
        return action_id

    async def action_row(self, action_id: int) -> dict[str, Any] | None:
        self._reachable()
        row = self.actions.get(action_id)
        return None if row is None else _copy(dataclasses.asdict(row))

    async def expire_actions(self) -> int:
        now = self._reachable()
        expired = [
            row
            for row in self.actions.values()
            if row.state == ActionState.QUEUED.value
            and row.not_after is not None
            and row.not_after <= now
        ]
        for row in expired:
            row.state = ActionState.EXPIRED.value
            row.finished_at = now
            row.error = EXPIRED_ERROR
        return len(expired)

    async def stale_running_actions(self, site_ids: Sequence[str] | None = None) -> list[Action]:
        now = self._reachable()
        return [
            _action(row)
            for row in self.actions.values()
            if self._of_sites(row.site_id, site_ids)
            and row.state == ActionState.RUNNING.value
            and _before(row.claimed_until, now)
        ]

    async def claim_actions(
        self, *, limit: int, claim_s: float, owner: str, site_ids: Sequence[str] | None = None
    ) -> list[Action]:
        now = self._reachable()
        due = [
            row
            for row in sorted(self.actions.values(), key=lambda row: row.id)
            if self._of_sites(row.site_id, site_ids)
            and row.state == ActionState.QUEUED.value
            and row.next_attempt_at <= now
            and (row.not_after is None or row.not_after > now)
        ][:limit]
        for row in due:
            row.state = ActionState.RUNNING.value
            row.attempts += 1
            row.started_at = row.started_at or now
            row.claimed_until = now + timedelta(seconds=claim_s)
            row.claimed_by = owner
        return [_action(row) for row in due]

    async def extend_action_claim(self, action_id: int, *, claim_s: float, owner: str) -> None:
        now = self._reachable()
        row = self.actions.get(action_id)
        if row is not None and row.claimed_by == owner:
            row.claimed_until = now + timedelta(seconds=claim_s)

    def _settleable(
        self, action_id: int, expected: ActionState, only_if_claim_expired: bool, now: datetime
    ) -> _ActionRow | None:
        row = self.actions.get(action_id)
        if row is None or row.state != expected.value:
            return None
        if only_if_claim_expired and not _before(row.claimed_until, now):
            return None
        return row

    async def finish_action(
        self,
        action_id: int,
        state: ActionState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool:
        now = self._reachable()
        row = self._settleable(action_id, expected, only_if_claim_expired, now)
        if row is None:
            return False
        row.state = state.value
        row.result = storable_result(result)
        row.error = storable_note(error)
        row.finished_at = now
        row.claimed_until = None
        return True

    async def requeue_action(
        self,
        action_id: int,
        *,
        delay_s: float,
        error: str,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool:
        now = self._reachable()
        row = self._settleable(action_id, expected, only_if_claim_expired, now)
        if row is None:
            return False
        row.state = ActionState.QUEUED.value
        row.error = storable_note(error)
        row.next_attempt_at = now + timedelta(seconds=delay_s)
        row.claimed_until = None
        row.claimed_by = None
        return True

    # ------------------------------------------------------------------ site leases

    async def ensure_sites(self, site_ids: Iterable[str]) -> None:
        now = self._reachable()
        for site_id in site_ids:
            self.leases.setdefault(site_id, _Lease(site_id, expires_at=now))

    async def heartbeat(
        self,
        me: DaemonIdentity,
        ttl_s: float,
        held: Mapping[str, int],
        *,
        fresh_s: float | None = None,
    ) -> Heartbeat:
        now = self._reachable()
        expires = now + timedelta(seconds=ttl_s)
        known = self.daemons.get(me.daemon_id)
        if known is None:
            self.daemons[me.daemon_id] = _Daemon(me, now, expires)
        else:
            known.heartbeat_at, known.expires_at = now, expires
        renewed: dict[str, int] = {}
        for site_id, epoch in held.items():
            lease = self.leases.get(site_id)
            if lease is not None and (lease.owner, lease.epoch) == (me.daemon_id, epoch):
                lease.expires_at = expires
                renewed[site_id] = epoch
        for daemon_id, daemon in list(self.daemons.items()):
            if daemon.expires_at < now - DAEMON_HISTORY:
                del self.daemons[daemon_id]
        stale_before = None if fresh_s is None else now - timedelta(seconds=fresh_s)
        live = sorted(
            d
            for d, daemon in self.daemons.items()
            if daemon.expires_at > now
            and (stale_before is None or daemon.heartbeat_at >= stale_before)
        )
        silent = [
            (daemon.expires_at - now).total_seconds()
            for d, daemon in self.daemons.items()
            if stale_before is not None
            and daemon.expires_at > now
            and daemon.heartbeat_at < stale_before
        ]
        return Heartbeat(
            renewed=renewed,
            live=live,
            server_started_at=self.server_started_at,
            orphans_in_s=min(silent, default=None),
        )

    async def acquire(
        self, me: str, ttl_s: float, candidates: Sequence[str], limit: int
    ) -> list[Acquired]:
        now = self._reachable()
        if limit < 0 or not candidates:
            return []
        wanted = set(candidates)
        orphaned = [
            lease
            for lease in self.leases.values()
            if lease.site_id in wanted and lease.owner not in (None, me) and lease.expires_at <= now
        ]
        free = [
            lease
            for lease in self.leases.values()
            if lease.site_id in wanted and lease.owner in (None, me)
        ]
        pick = orphaned + self.rng.sample(free, min(limit, len(free)))
        taken: list[Acquired] = []
        for lease in pick:
            previous = lease.owner
            lease.owner, lease.epoch = me, lease.epoch + 1
            lease.acquired_at, lease.expires_at = now, now + timedelta(seconds=ttl_s)
            taken.append(Acquired(lease.site_id, lease.epoch, previous if previous != me else None))
        return taken

    async def release(
        self, me: str, leases: Mapping[str, int], *, leaving: bool = False
    ) -> set[str]:
        now = self._reachable()
        if not leases and not leaving:
            return set()
        released: set[str] = set()
        for site_id, epoch in leases.items():
            lease = self.leases.get(site_id)
            if lease is not None and (lease.owner, lease.epoch) == (me, epoch):
                lease.owner, lease.expires_at = None, now
                released.add(site_id)
        if leaving:
            self.daemons.pop(me, None)
        self.notices.append(me)
        return released

    async def announce(self, me: str) -> None:
        self._reachable()
        self.notices.append(me)

    async def local_daemons(self, host: str, boot_id: str) -> list[tuple[str, int]]:
        now = self._reachable()
        return [
            (daemon_id, daemon.identity.pid)
            for daemon_id, daemon in self.daemons.items()
            if daemon.identity.host == host
            and daemon.identity.boot_id == boot_id
            and daemon.expires_at > now
        ]

    async def expire_daemons(self, daemon_ids: Sequence[str]) -> int:
        now = self._reachable()
        if not daemon_ids:
            return 0
        for daemon_id in daemon_ids:
            if daemon_id in self.daemons:
                self.daemons[daemon_id].expires_at = now
        freed = [
            lease
            for lease in self.leases.values()
            if lease.owner in daemon_ids and lease.expires_at > now
        ]
        for lease in freed:
            lease.expires_at = now
        return len(freed)

    async def lease_rows(self, site_ids: Sequence[str]) -> dict[str, LeaseRow]:
        now = self._reachable()
        return {
            lease.site_id: LeaseRow(
                lease.site_id,
                lease.owner,
                lease.epoch,
                lease.expires_at,
                lease.owner is not None and lease.expires_at > now,
            )
            for lease in self.leases.values()
            if lease.site_id in site_ids
        }

    # ------------------------------------------------------------------ forwarding outbox

    async def acquire_forwarder(self, name: str, me: str, ttl_s: float) -> ForwarderLease | None:
        now = self._reachable()
        lease = self.forwarder_leases.setdefault(name, _ForwarderLease(name, now))
        if lease.owner not in (None, me) and lease.expires_at >= now:
            return None
        if lease.owner != me:
            lease.epoch += 1
        lease.owner = me
        lease.expires_at = now + timedelta(seconds=ttl_s)
        return ForwarderLease(me, lease.epoch)

    def _forwarder_held(self, name: str, held: ForwarderLease) -> _ForwarderLease | None:
        lease = self.forwarder_leases.get(name)
        if lease is None or (lease.owner, lease.epoch) != (held.owner, held.epoch):
            return None
        return lease

    async def renew_forwarder(self, name: str, lease: ForwarderLease, ttl_s: float) -> bool:
        now = self._reachable()
        row = self._forwarder_held(name, lease)
        if row is None:
            return False
        row.expires_at = now + timedelta(seconds=ttl_s)
        return True

    async def release_forwarder(self, name: str, lease: ForwarderLease) -> None:
        now = self._reachable()
        row = self._forwarder_held(name, lease)
        if row is not None:
            row.owner, row.expires_at = None, now

    async def next_deliveries(
        self, name: str, lease: ForwarderLease, *, limit: int
    ) -> list[Delivery]:
        self._reachable()
        held = self._forwarder_held(name, lease)
        if held is None:
            return []
        rows = sorted(
            (r for r in self.deliveries.values() if r.forwarder == name and r.state == "pending"),
            key=lambda r: r.id,
        )[:limit]
        found: list[Delivery] = []
        for row in rows:
            if row.seq is None:
                row.seq, held.next_seq = held.next_seq, held.next_seq % 9999 + 1
            alarm = self.alarms[row.alarm_id]
            found.append(
                Delivery(
                    id=row.id,
                    forwarder=name,
                    alarm_id=row.alarm_id,
                    seq=row.seq,
                    attempts=row.attempts,
                    site_id=alarm.alarm.site_id,
                    event_type=alarm.alarm.event_type,
                    description=alarm.alarm.description,
                    camera_id=alarm.alarm.camera_id,
                    camera_name=alarm.alarm.camera_name,
                    occurred_at=alarm.alarm.occurred_at,
                    committed_at=alarm.received_at,
                )
            )
        return found

    async def delivery_attempted(self, delivery_id: int, *, error: str) -> None:
        now = self._reachable()
        row = self.deliveries.get(delivery_id)
        if row is not None and row.state == "pending":
            row.attempts += 1
            row.first_sent_at = row.first_sent_at or now
            row.last_error = storable_note(error)

    async def delivery_finished(
        self, delivery_id: int, *, delivered: bool, answer: str, error: str | None = None
    ) -> bool:
        now = self._reachable()
        row = self.deliveries.get(delivery_id)
        if row is None or row.state != "pending":
            return False
        row.state = "delivered" if delivered else "failed"
        row.attempts += 1
        row.first_sent_at = row.first_sent_at or now
        row.finished_at = now
        row.last_answer = storable_note(answer)
        row.last_error = storable_note(error)
        return True

    async def outbox_stats(self, names: Sequence[str]) -> dict[str, OutboxStats]:
        now = self._reachable()
        stats: dict[str, OutboxStats] = {}
        for name in names:
            rows = [r for r in self.deliveries.values() if r.forwarder == name]
            pending = [r for r in rows if r.state == "pending"]
            delivered = [r for r in rows if r.state == "delivered"]
            lease = self.forwarder_leases.get(name)
            live = lease is not None and lease.expires_at > now
            stats[name] = OutboxStats(
                len(pending),
                min((r.created_at for r in pending), default=None),
                len(delivered),
                sum(r.state == "failed" for r in rows),
                max((r.finished_at for r in delivered if r.finished_at), default=None),
                lease.owner if live and lease is not None else None,
            )
        return stats


def _check_storable_time(value: datetime) -> None:
    """PostgreSQL's driver refuses a time it cannot convert to UTC within timestamptz: a data
    error (ValueError), as `db.errors.is_data_error` sees it."""
    if storable_utc(value) is None:
        raise ValueError(f"time {value!r} cannot be stored as timestamptz")


def _copy(value: Any) -> Any:
    """A deep copy of plain JSON-like data, so callers never share the stored objects."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _action(row: _ActionRow) -> Action:
    return Action(
        id=row.id,
        site_id=row.site_id,
        kind=row.kind,
        target=row.target,
        params=_copy(row.params),
        attempts=row.attempts,
        not_after=row.not_after,
    )
