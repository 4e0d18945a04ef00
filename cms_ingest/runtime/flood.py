"""Alarm floods: a camera firing far above normal must not bury everyone else's alarms.

Every alarm is still stored. Once a camera has raised more than `max_per_minute` alarms in
the last minute, its further alarms join a burst: they point (`group_of`, stored as
`alarms.group_id`) at the burst's first alarm, which counts them in `repeat_count`, and their
media is not fetched unless `flood.fetch_media`. The burst ends after `quiet_s` without
alarms from that camera. Pure logic, per site; the poller applies it before committing.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cms_ingest.domain import Alarm

WINDOW = timedelta(minutes=1)
REMEMBERED = 10_000  # recent decisions kept, so a batch polled again is decided the same way
# Alarms the daemon raises about the site itself are never grouped.
NEVER_GROUPED = frozenset({"comm_lost", "comm_restored"})


@dataclass(slots=True)
class _Camera:
    recent: deque[datetime] = field(default_factory=deque)
    head: str | None = None  # source_id of the open burst's first alarm
    last_at: datetime | None = None


class FloodTracker:
    def __init__(self, *, max_per_minute: int, quiet_s: float, fetch_media: bool) -> None:
        self._limit = max_per_minute
        self._quiet = timedelta(seconds=quiet_s)
        self._fetch_media = fetch_media
        self._cameras: dict[str, _Camera] = {}
        # source_id -> group_of. A commit that failed brings the same alarms back: they must
        # get the same answer, not be counted twice (nor the head join its own burst).
        self._decided: OrderedDict[str, str | None] = OrderedDict()

    def apply(self, alarms: list[Alarm], now: datetime) -> list[Alarm]:
        """The same alarms, those in a burst marked with their group (and without media)."""
        return [dataclasses.replace(a, **m) if (m := self.marks(a, now)) else a for a in alarms]

    def marks(self, alarm: Alarm, now: datetime) -> dict[str, Any]:
        """The fields the flood rule changes on this alarm (none when it is in no burst): a
        caller that changes other fields too makes one copy, not two (a storm's full pages)."""
        group_of = self._group_of(alarm, now)
        if group_of is None:
            return {}
        return {"group_of": group_of} if self._fetch_media else {"group_of": group_of, "media": ()}

    def _group_of(self, alarm: Alarm, now: datetime) -> str | None:
        if alarm.event_type.value in NEVER_GROUPED:
            return None
        if alarm.source_id in self._decided:
            return self._decided[alarm.source_id]
        group_of = self._decide(alarm, now)
        self._decided[alarm.source_id] = group_of
        if len(self._decided) > REMEMBERED:
            self._decided.popitem(last=False)
        return group_of

    def _decide(self, alarm: Alarm, now: datetime) -> str | None:
        """The burst this new alarm joins (its first alarm's source_id), or None."""
        camera = self._cameras.setdefault(alarm.camera_id or "", _Camera())
        if camera.head is not None and camera.last_at and now - camera.last_at >= self._quiet:
            camera.head = None  # a quiet spell ended the burst
        camera.last_at = now
        camera.recent.append(now)
        while camera.recent and now - camera.recent[0] > WINDOW:
            camera.recent.popleft()
        if camera.head is None:
            if len(camera.recent) > self._limit:
                camera.head = alarm.source_id  # the first alarm beyond the limit leads it
            return None
        return camera.head
