"""What the runtime needs from storage, as narrow Protocols grouped by job (the ports).

Two adapters implement every port with the same semantics: PostgreSQL (`db.store.Store` and
`db.leases.LeaseStore`) and in memory (`db.memory.MemoryStorage`, for fast direct tests of the
runtime parts). `tests/test_storage_conformance.py` runs one suite against both.

Contracts every adapter keeps:
- a failure of the database itself raises `db.errors.DatabaseUnavailable`; anything else is
  a bug and propagates unchanged;
- every text and JSON value is cleaned where it is written (`db.storable`), once;
- `commit_polls` writes a site's alarms, their media rows and its cursor all or nothing, never
  an alarm twice (unique per site and `source_id`), and refuses (fences) a site whose lease
  moved past the epoch in its terms;
- claims (media, actions) last `claim_s` seconds; a claim not renewed in time can be claimed
  again; `site_ids` restricts a claim to those sites plus sites no daemon has a lease row for.

This module imports only the domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from cms_ingest.domain import (
    Acquired,
    Action,
    ActionState,
    CommHistory,
    CommitResult,
    CommitTerms,
    DaemonIdentity,
    Delivery,
    ForwarderLease,
    Heartbeat,
    LeaseRow,
    MediaJob,
    MediaState,
    OutboxStats,
    PollCommit,
    SiteHealth,
)


class PollCommits(Protocol):
    """Poll results and cursors: what pollers resume from, and the atomic commit."""

    async def load_cursors(
        self, site_ids: Iterable[str]
    ) -> dict[str, Mapping[str, Any] | None]: ...

    async def supervision_states(self, site_ids: Iterable[str]) -> dict[str, CommHistory]: ...

    async def commit_polls(
        self, commits: Sequence[PollCommit], terms: Mapping[str, CommitTerms]
    ) -> CommitResult: ...


class MediaQueue(Protocol):
    """Pending media rows: claimed (the claim renewed while the work runs), retried later,
    settled, or handed back."""

    async def claim_media(
        self, *, limit: int, claim_s: float, site_ids: Sequence[str] | None = None
    ) -> list[MediaJob]: ...

    async def extend_media_claims(self, media_ids: Sequence[int], *, claim_s: float) -> None:
        """Keep these rows claimed `claim_s` seconds from now, while their work runs; a row no
        longer claimed (handed back, retried later, its claim run out) or no longer pending
        (settled meanwhile) is left alone."""
        ...

    async def media_retry_later(
        self,
        media_id: int,
        *,
        delay_s: float,
        note: str | None,
        locator: Mapping[str, Any] | None = None,
    ) -> None: ...

    async def media_ready(
        self, media_id: int, *, path: str, content_type: str, size_bytes: int, sha256: str
    ) -> None: ...

    async def media_final(self, media_id: int, state: MediaState, reason: str) -> None: ...

    async def release_media(self, media_ids: Sequence[int]) -> None: ...


class ActionQueue(Protocol):
    """Operators' actions as the action worker runs them."""

    async def claim_actions(
        self, *, limit: int, claim_s: float, owner: str, site_ids: Sequence[str] | None = None
    ) -> list[Action]: ...

    async def extend_action_claim(self, action_id: int, *, claim_s: float, owner: str) -> None: ...

    async def finish_action(
        self,
        action_id: int,
        state: ActionState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool: ...

    async def requeue_action(
        self,
        action_id: int,
        *,
        delay_s: float,
        error: str,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool: ...

    async def expire_actions(self) -> int: ...

    async def stale_running_actions(
        self, site_ids: Sequence[str] | None = None
    ) -> list[Action]: ...


class ActionRequests(Protocol):
    """What an operator's software does: queue an action and read its row (CLI, demo)."""

    async def enqueue_action(
        self,
        *,
        site_id: str,
        kind: str,
        target: str,
        params: Mapping[str, Any],
        requested_by: str | None,
        not_after: datetime | None = None,
    ) -> int: ...

    async def action_row(self, action_id: int) -> dict[str, Any] | None: ...


class SiteHealthRecords(Protocol):
    """Per-site health written a few times a minute, and the queues' depths for the gauges."""

    async def record_health(self, reports: Sequence[SiteHealth]) -> None: ...

    async def queue_depths(self) -> dict[str, int]: ...


class SiteLeases(Protocol):
    """Which daemon polls which site: membership, leases by epoch, hand-off and take-over."""

    async def ensure_sites(self, site_ids: Iterable[str]) -> None: ...

    async def heartbeat(
        self,
        me: DaemonIdentity,
        ttl_s: float,
        held: Mapping[str, int],
        *,
        fresh_s: float | None = None,
    ) -> Heartbeat:
        """Announce `me`, renew the leases it holds, and list the live daemons: those not
        expired and, with `fresh_s`, whose last heartbeat is at most that old (a daemon that
        stopped renewing is counted out before its leases expire)."""
        ...

    async def acquire(
        self, me: str, ttl_s: float, candidates: Sequence[str], limit: int
    ) -> list[Acquired]:
        """Every one of `candidates` whose lease another daemon let expire, plus up to
        `limit` free ones (or left by an earlier process of ours); each at a new epoch."""
        ...

    async def release(
        self, me: str, leases: Mapping[str, int], *, leaving: bool = False
    ) -> set[str]: ...

    async def announce(self, me: str) -> None: ...

    async def local_daemons(self, host: str, boot_id: str) -> list[tuple[str, int]]: ...

    async def expire_daemons(self, daemon_ids: Sequence[str]) -> int: ...

    async def lease_rows(self, site_ids: Sequence[str]) -> dict[str, LeaseRow]: ...


class Outbox(Protocol):
    """The forwarding outbox as a forwarder's sender works it. Delivery rows are written by
    `commit_polls` with their alarms (per the adapter's forwarder routes); a forwarder is sent
    for by the one holder of its lease; `next_deliveries` gives a row its sequence number once
    (fenced by the lease's epoch); `delivered` only after an ACK."""

    async def acquire_forwarder(
        self, name: str, me: str, ttl_s: float
    ) -> ForwarderLease | None: ...

    async def renew_forwarder(self, name: str, lease: ForwarderLease, ttl_s: float) -> bool: ...

    async def release_forwarder(self, name: str, lease: ForwarderLease) -> None: ...

    async def next_deliveries(
        self, name: str, lease: ForwarderLease, *, limit: int
    ) -> list[Delivery]: ...

    async def delivery_attempted(self, delivery_id: int, *, error: str) -> None: ...

    async def delivery_finished(
        self, delivery_id: int, *, delivered: bool, answer: str, error: str | None = None
    ) -> bool: ...

    async def outbox_stats(self, names: Sequence[str]) -> dict[str, OutboxStats]: ...


class Storage(PollCommits, MediaQueue, ActionQueue, SiteHealthRecords, Protocol):
    """Everything the runtime's workers need from storage, leases aside."""
