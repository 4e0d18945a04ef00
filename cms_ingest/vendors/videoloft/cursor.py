"""The cursor of a Videoloft account: per device, the newest alert id committed, its open
gap if any, and the last camera status seen."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cms_ingest.vendors.base import Cursor
from cms_ingest.vendors.common import as_int


@dataclass(slots=True)
class _Gap:
    """A device's alerts not read back yet: those above `floor` (the newest id committed
    before the gap), /alert read from `offset` on; `top` is the newest id seen since."""

    floor: int
    offset: int = 0
    top: int = 0
    until: int = 0  # ms: read it (again) once this has passed, then close it
    read: bool = False  # read to its floor since it was last (re)opened

    def dump(self) -> dict[str, int | bool]:
        return asdict(self)


class _CursorState:
    """Per device: the newest alert id committed, its open gap if any, and the last camera
    status seen. Small: a few numbers per device of the account."""

    def __init__(
        self, last_ids: dict[str, int], statuses: dict[str, str], gaps: dict[str, _Gap]
    ) -> None:
        self._last_ids = last_ids
        self._statuses = statuses
        self._gaps = gaps

    @classmethod
    def load(cls, cursor: Cursor | None) -> _CursorState:
        cursor = cursor or {}
        ids = _mapping(cursor.get("last_ids"))
        statuses = _mapping(cursor.get("statuses"))
        gaps = _mapping(cursor.get("gaps"))
        return cls(
            {str(k): n for k, v in ids.items() if (n := as_int(v)) is not None},
            {str(k): str(v) for k, v in statuses.items()},
            {str(k): gap for k, v in gaps.items() if (gap := _load_gap(v)) is not None},
        )

    def last_id(self, uidd: str) -> int | None:
        return self._last_ids.get(uidd)

    def start(self, uidd: str, alert_id: int) -> None:
        self._last_ids[uidd] = alert_id

    def needs_catch_up(self, uidd: str, now_ms: int) -> bool:
        gap = self._gaps.get(uidd)
        if gap is not None:
            return not gap.read or now_ms >= gap.until
        return uidd not in self._last_ids

    def open_gap(self, uidd: str, until: int) -> None:
        """A new gap of `uidd`, to be read now and again after `until` (joined to the one
        still open, if any: same floor, read again)."""
        floor = self._last_ids.get(uidd)
        gap = self._gaps.get(uidd)
        if gap is not None:
            gap.until, gap.read = max(gap.until, until), False
        elif floor is not None:
            self._gaps[uidd] = _Gap(floor=floor, top=floor, until=until)

    def gap(self, uidd: str) -> _Gap | None:
        return self._gaps.get(uidd)

    def close_gap(self, uidd: str) -> None:
        gap = self._gaps.pop(uidd, None)
        if gap is not None:
            self.advance(uidd, gap.top)

    def advance(self, uidd: str, alert_id: int) -> None:
        gap = self._gaps.get(uidd)
        if gap is not None:  # never past an unread gap: its end is remembered instead
            gap.top = max(gap.top, alert_id)
        else:
            self._last_ids[uidd] = max(alert_id, self._last_ids.get(uidd, 0))

    def status(self, uidd: str) -> str | None:
        return self._statuses.get(uidd)

    def set_status(self, uidd: str, status: str) -> None:
        self._statuses[uidd] = status

    def dump(self) -> dict[str, Any]:
        cursor: dict[str, Any] = {
            "last_ids": dict(self._last_ids),
            "statuses": dict(self._statuses),
        }
        if self._gaps:
            cursor["gaps"] = {uidd: gap.dump() for uidd, gap in self._gaps.items()}
        return cursor


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _load_gap(value: Any) -> _Gap | None:
    fields = _mapping(value)
    floor, offset, top, until = (
        as_int(fields.get(key)) for key in ("floor", "offset", "top", "until")
    )
    if floor is None:
        return None
    return _Gap(
        floor=floor,
        offset=max(offset or 0, 0),
        top=max(top or floor, floor),
        until=until or 0,
        read=fields.get("read") is True,
    )
