"""The normalized vocabulary every part of cms-ingest speaks.

Vendors translate their payloads into these types; the database package stores them; the
runtime moves them around. This module imports nothing from the rest of the project so that
it can be read (and tested) on its own.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol


class EventType(enum.StrEnum):
    """`alarms.event_type`: the operator contract's taxonomy (section 4)."""

    INTRUSION = "intrusion"
    PERSON = "person"
    VEHICLE = "vehicle"
    MOTION = "motion"
    AUDIO = "audio"
    SABOTAGE = "sabotage"
    VIDEO_LOSS = "video_loss"
    INPUT = "input"
    ANALYTICS = "analytics"
    ARMED = "armed"
    DISARMED = "disarmed"
    CAMERA_OFFLINE = "camera_offline"
    CAMERA_ONLINE = "camera_online"
    COMM_LOST = "comm_lost"
    COMM_RESTORED = "comm_restored"
    SYSTEM = "system"
    OTHER = "other"


class MediaKind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    THUMBNAIL = "thumbnail"
    VIDEO = "video"


class MediaState(enum.StrEnum):
    PENDING = "pending"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    FAILED = "failed"


class ActionState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class MediaRequest:
    """A piece of media an alarm should get.

    `locator` is what the vendor needs later to find the media again (an alarm id, a
    relative path...). It is stored as JSON with the media row, never a full URL: media
    URLs are always rebuilt from the configured site URL.
    """

    kind: MediaKind
    locator: Mapping[str, Any] = field(default_factory=dict)
    available: bool = True  # False: the vendor says there is none (stored as `unavailable`)


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm, normalized. Becomes exactly one row of `alarms`."""

    site_id: str
    vendor: str
    source_id: str
    event_type: EventType
    vendor_event: str
    description: str
    occurred_at: datetime  # timezone-aware, the device's own time of the alarm
    camera_id: str | None = None
    camera_name: str | None = None
    armed: bool | None = None
    priority: int = 5
    raw: Mapping[str, Any] = field(default_factory=dict)
    media: tuple[MediaRequest, ...] = ()
    # Flood: the source_id of the burst's first alarm, which this one joins (same site).
    group_of: str | None = None

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None:
            raise ValueError(f"alarm {self.source_id}: occurred_at must be timezone-aware")
        if not 1 <= self.priority <= 9:
            raise ValueError(f"alarm {self.source_id}: priority {self.priority} not in 1..9")

    def changed(self, **changes: Any) -> Alarm:
        """`dataclasses.replace(self, **changes)` (checked alike), in 2.1 µs instead of 3.6:
        a storm copies every alarm once (its priority and flood marks)."""
        values = list(_alarm_values(self))
        for name, value in changes.items():
            values[_ALARM_FIELD_INDEX[name]] = value
        return Alarm(*values)


_ALARM_FIELDS = tuple(field.name for field in dataclasses.fields(Alarm))  # the init's order
_ALARM_FIELD_INDEX = {name: index for index, name in enumerate(_ALARM_FIELDS)}
_alarm_values = operator.attrgetter(*_ALARM_FIELDS)


# Priorities a CMS expects by default: what may be a person on site first, noise last.
DEFAULT_PRIORITIES: Mapping[EventType, int] = {
    EventType.INTRUSION: 1,
    EventType.SABOTAGE: 1,
    EventType.PERSON: 2,
    EventType.COMM_LOST: 2,
    EventType.VEHICLE: 3,
    EventType.INPUT: 3,
    EventType.ANALYTICS: 3,
    EventType.VIDEO_LOSS: 3,
    EventType.CAMERA_OFFLINE: 4,
    EventType.MOTION: 5,
    EventType.AUDIO: 5,
    EventType.OTHER: 6,
    EventType.ARMED: 7,
    EventType.DISARMED: 7,
    EventType.CAMERA_ONLINE: 8,
    EventType.COMM_RESTORED: 8,
    EventType.SYSTEM: 9,
}


def default_priority(event_type: EventType) -> int:
    return DEFAULT_PRIORITIES.get(event_type, 5)


@dataclass(frozen=True, slots=True)
class OpenOutage:
    """A site's outage whose comm_lost is stored and whose comm_restored is not."""

    source_id: str  # of the comm_lost alarm; comm_restored reuses its suffix
    silent_since: datetime  # the last successful poll before it


@dataclass(frozen=True, slots=True)
class CommHistory:
    """What is stored of a site's communication, read when a poller starts: its last
    successful poll, and the outage it is in (when its newest comm_* alarm is a comm_lost)."""

    last_success: datetime | None = None
    open_outage: OpenOutage | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """A row of `actions` as the action worker sees it."""

    id: int
    site_id: str
    kind: str
    target: str
    params: Mapping[str, Any]
    attempts: int
    not_after: datetime | None


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What the device answered to an action that it accepted."""

    result: Mapping[str, Any]


# ---------------------------------------------------------------------- storable text and JSON
# PostgreSQL refuses NUL and lone surrogates in text and jsonb, NaN and Infinity in jsonb, and
# Python will not even serialize an integer of thousands of digits. The store cleans every value
# it writes with these (once, where rows are built); vendors use them on what they keep in their
# cursors.

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"
# Length caps for device strings stored in columns (raw JSON strings get RAW_TEXT_LIMIT).
ID_LIMIT = 256
NAME_LIMIT = 512
DESCRIPTION_LIMIT = 2048
RAW_TEXT_LIMIT = 8192
MAX_JSON_DEPTH = 64  # real device answers nest a handful of levels
# Integers in stored JSON: jsonb takes far more than 64 bits, but Python will not print an
# integer of over 4300 digits (json.dumps raises) and jsonb's numeric has its own ceiling.
MAX_JSON_INT_BITS = 1024


def clean_text(value: str, limit: int) -> str:
    """A device string as PostgreSQL can store it: NUL and lone surrogates become U+FFFD, and
    at most `limit` characters (a longer one is cut and ends with "…")."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if value.isascii() and "\x00" not in value:  # the usual case: nothing to replace
        return value
    return _UNSTORABLE.sub(REPLACEMENT, value)


def clean_json(value: Any, *, depth: int = MAX_JSON_DEPTH) -> Any:
    """Device JSON made storable as `jsonb`: strings (keys too) cleaned, non-finite numbers
    and integers of over MAX_JSON_INT_BITS bits None, containers nested past `depth` levels
    dropped (None)."""
    if isinstance(value, str):
        return clean_text(value, RAW_TEXT_LIMIT)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and value.bit_length() > MAX_JSON_INT_BITS:
        return None
    if isinstance(value, dict):
        if depth <= 0:
            return None
        return {
            clean_text(str(key), ID_LIMIT): clean_json(item, depth=depth - 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if depth <= 0:
            return None
        return [clean_json(item, depth=depth - 1) for item in value]
    return value


# ---------------------------------------------------------------------- storage vocabulary
# What the runtime and the storage ports (`cms_ingest.storage_ports`) exchange. Both adapters
# (`db.store`/`db.leases` over PostgreSQL, `db.memory` in memory) speak it.


class BadInputReporter(Protocol):
    """Where the store reports a device value it had to change to store it (the site's
    `SiteReporter` satisfies it)."""

    def bad_input(self, what: str, detail: str) -> None: ...


class SiteLease(NamedTuple):
    """The lease a site is polled under: the holding daemon and the lease's epoch."""

    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PollCommit:
    """One site's poll outcome to persist: its alarms and the cursor after them."""

    site_id: str
    vendor: str
    alarms: Sequence[Alarm]
    cursor: Mapping[str, Any] | None  # None: the site has no cursor yet (leave it so)
    # Where a value the database cannot take is reported (the site's bad-input reporter).
    problems: BadInputReporter | None = None


@dataclass(frozen=True, slots=True)
class CommitTerms:
    """What one site's commit is made under, known where commits are made (the alarm
    writer), not carried by every poll result."""

    media_deadline_s: float  # its media rows are given up this long after the alarm is stored
    lease: SiteLease | None = None  # the lease its poll ran under; None: not fenced (tools)


@dataclass(frozen=True, slots=True)
class InsertedAlarm:
    id: int
    site_id: str
    source_id: str


@dataclass(frozen=True, slots=True)
class CommitResult:
    inserted: list[InsertedAlarm]
    fenced: set[str]  # sites whose lease was lost: nothing of theirs was written


@dataclass(frozen=True, slots=True)
class MediaJob:
    id: int
    alarm_id: int
    site_id: str
    kind: MediaKind
    locator: Mapping[str, Any]
    attempts: int
    deadline_at: datetime
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class SiteHealth:
    site_id: str
    vendor: str
    last_poll_at: datetime
    last_success_at: datetime | None
    consecutive_failures: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DaemonIdentity:
    daemon_id: str
    host: str
    pid: int
    boot_id: str
    version: str


@dataclass(frozen=True, slots=True)
class Acquired:
    site_id: str
    epoch: int
    previous_owner: str | None  # another daemon's id: a take-over after its lease expired


@dataclass(frozen=True, slots=True)
class Heartbeat:
    renewed: dict[str, int]  # site_id -> epoch, of the leases still ours
    live: list[str]  # the live daemons' ids, sorted (ours included)
    server_started_at: datetime  # the database server's start: changes on restart or failover
    # Seconds until the first daemon that stopped beating (stale by `fresh_s`) expires, and
    # its leases with it: the lease keeper looks again then, not at its next tick. None:
    # every other daemon beats (or no `fresh_s` was given).
    orphans_in_s: float | None = None


@dataclass(frozen=True, slots=True)
class LeaseRow:
    site_id: str
    owner: str | None
    epoch: int
    expires_at: datetime
    live: bool  # held by someone and not expired


# ---------------------------------------------------------------------- forwarding (outbox)


@dataclass(frozen=True, slots=True)
class RouteFilter:
    """Which alarms a forwarder gets: of these sites and event types (None: all). The store
    writes a delivery row per matching forwarder in the transaction of the alarm."""

    forwarder: str
    sites: frozenset[str] | None = None
    event_types: frozenset[EventType] | None = None

    def wants(self, alarm: Alarm) -> bool:
        return (self.sites is None or alarm.site_id in self.sites) and (
            self.event_types is None or alarm.event_type in self.event_types
        )


class ForwarderLease(NamedTuple):
    """The lease a forwarder's deliveries are sent under (one daemon sends for it)."""

    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """A pending delivery as a sender sees it: the row, its sequence number (assigned
    before the first send and kept for every resend) and what it says about its alarm."""

    id: int
    forwarder: str
    alarm_id: int
    seq: int
    attempts: int
    site_id: str
    event_type: EventType
    description: str
    camera_id: str | None
    camera_name: str | None
    occurred_at: datetime
    committed_at: datetime  # the alarm's commit (received_at): where latency starts


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A forwarder's queue, for the gauges and `cms-ingest status`."""

    pending: int
    oldest_pending_at: datetime | None
    delivered: int
    failed: int
    last_delivered_at: datetime | None
    owner: str | None  # the daemon holding its lease, when live
