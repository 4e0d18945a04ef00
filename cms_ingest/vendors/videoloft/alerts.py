"""An alert, whichever way `/alert` or a live record spells it.

`/alert` spells its fields several ways (id as `alert`/`id`; end as `endt`, `endtt`, `enddt`,
`end`; times in ms or s): `normalize_alert` reads them all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cms_ingest.domain import EventType
from cms_ingest.vendors.common import as_id, as_int

OFFLINE_STATES = frozenset({"offline", "novideo"})
KNOWN_STATES = OFFLINE_STATES | {"live"}  # the manual's "e.g.": others are taken as up
EVENT_TYPES = {"motion": EventType.MOTION, "audio": EventType.AUDIO}
_END_FIELDS = ("endt", "endtt", "enddt", "end")
_SECONDS_BEFORE = 100_000_000_000  # a "time" below this is in seconds, not milliseconds
# What a datetime holds, in ms since the epoch: 0001-01-01 to 9999-12-31.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999


def _millis(value: Any) -> int | None:
    """A time in ms from ms or s (a number or its text); None when it is not a usable time."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past any float
        return None
    if not math.isfinite(number):  # "nan", "inf", "1e999"
        return None
    millis = number * 1000 if number < _SECONDS_BEFORE else number
    if not _MIN_MS <= millis <= _MAX_MS:  # -1e306 s is -inf ms: int() would overflow
        return None
    return int(millis)


def _datetime_ms(millis: int) -> int | None:
    """`millis` when a datetime can hold it, else None."""
    return millis if _MIN_MS <= millis <= _MAX_MS else None


@dataclass(frozen=True, slots=True)
class VlAlert:
    uidd: str
    id: int
    start_ms: int
    end_ms: int | None
    type: str
    raw: Mapping[str, Any]


def normalize_alert(item: Mapping[str, Any], uidd: str | None = None) -> VlAlert | None:
    """One alert whatever its spelling; None when it has no usable id, device or start."""
    alert_id = as_id(item.get("alert", item.get("id")))
    device = item.get("uid") or item.get("uidd") or uidd
    if alert_id is None or not device:
        return None
    start = _millis(item.get("startt")) or _datetime_ms(alert_id * 1000)
    if start is None:
        return None
    end = next((_millis(item[key]) for key in _END_FIELDS if item.get(key) is not None), None)
    return VlAlert(str(device), alert_id, start, end, str(item.get("type") or "motion"), dict(item))


def _rom(alert: VlAlert) -> int:
    """`rom` of the alert's MP4: 0 when the camera was recording 24/7, 1 (record on motion,
    the manual's "usually") otherwise or when the alert does not say."""
    return 0 if as_int(alert.raw.get("rom")) == 0 else 1
