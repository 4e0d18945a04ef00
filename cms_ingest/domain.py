"""The normalized vocabulary every part of cms-ingest speaks.

Vendors translate their payloads into these types; the database package stores them; the
runtime moves them around. This module imports nothing from the rest of the project so that
it can be read (and tested) on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
