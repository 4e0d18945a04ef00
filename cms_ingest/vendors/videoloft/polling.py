"""A poll: the gaps caught up, then what the long-polls delivered, as `Alarm`s.

Live records exist only once, so a batch is kept until the poller shows (by passing the
cursor we returned) that it was committed; otherwise it is delivered again. Live alerts
arriving during a gap are stored but never move its floor.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cms_ingest.domain import Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.vendors.base import BadDeviceResponse, Cursor, PollResult, VendorContext
from cms_ingest.vendors.videoloft.alerts import (
    EVENT_TYPES,
    KNOWN_STATES,
    OFFLINE_STATES,
    VlAlert,
    _rom,
    normalize_alert,
)
from cms_ingest.vendors.videoloft.catchup import VideoloftCatchUp
from cms_ingest.vendors.videoloft.cursor import _CursorState
from cms_ingest.vendors.videoloft.live import _Inbox
from cms_ingest.vendors.videoloft.options import VENDOR, VideoloftOptions

# Alerts whose delivery was confirmed, remembered so a gap read (or a second one after the
# connection settled) does not hand the same alert again: flood grouping counts what a poll
# returns. The database's key stays the guarantee; this only keeps poll results clean.
DELIVERED_MEMORY = 4096


class VideoloftPolling(VideoloftCatchUp):
    """The layer of `VideoloftClient` that makes a poll's result."""

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        super().__init__(context, options)
        self._unacked = _Inbox()
        self._returned_cursor: Cursor | None = None
        self._delivered: dict[tuple[str, int], None] = {}  # oldest first, DELIVERED_MEMORY
        self._unacked_keys: list[tuple[str, int]] = []

    async def poll(self, cursor: Cursor | None) -> PollResult:
        """Gaps caught up from /alert, then what the long-polls delivered.

        Live records exist only once, so a batch is kept until the poller shows (by passing
        the cursor we returned) that it was committed; otherwise it is delivered again.
        """
        if cursor != self._returned_cursor:
            self._inbox.merge_before(self._unacked)  # the last batch was not committed
        else:
            self._remember_delivered(self._unacked_keys)
        self._unacked = _Inbox()
        self._unacked_keys = []
        await self._auth_token()  # renew ahead of expiry even while only long-polls are open
        await self._ensure_devices()
        self._reconcile()
        await self._ensure_streams()
        broken = self._no_live_stream()
        if broken is not None:
            raise BadDeviceResponse(broken)  # supervision counts it; streams keep retrying
        inbox, self._inbox = self._inbox, _Inbox()
        try:
            result, keys = await self._collect(inbox, _CursorState.load(cursor))
        except BaseException:
            self._inbox.merge_before(inbox)
            raise
        self._unacked = inbox
        self._unacked_keys = keys
        self._returned_cursor = result.cursor
        return result

    def _remember_delivered(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self._delivered[key] = None
        while len(self._delivered) > DELIVERED_MEMORY:
            del self._delivered[next(iter(self._delivered))]

    async def _collect(
        self, inbox: _Inbox, state: _CursorState
    ) -> tuple[PollResult, list[tuple[str, int]]]:
        """This poll's result: the open gaps read back (as far as this poll may), then the
        live records, and the (uidd, id) of the alerts it hands over. A gap stays open in the
        cursor until /alert was read back to its floor; live alerts of its device are stored
        meanwhile, but never move its floor."""
        for uidd, until in sorted(inbox.gaps.items()):
            if uidd in self._devices:
                state.open_gap(uidd, until)
        alerts: dict[tuple[str, int], VlAlert] = {}
        notes: list[str] = []
        await self._catch_up_all(state, alerts, notes)
        statuses: list[tuple[str, str, int]] = []
        for _logger, record, seen_ms in inbox.records:
            self._take_safely(record, seen_ms, alerts, statuses)
        ordered = sorted(alerts.values(), key=lambda a: (a.uidd, a.id))
        for alert in ordered:
            if self._may_move_cursor(alert):
                state.advance(alert.uidd, alert.id)
        fresh = [a for a in ordered if (a.uidd, a.id) not in self._delivered]
        alarms = [self._alarm(alert) for alert in fresh]
        alarms += self._status_alarms(sorted(statuses, key=lambda s: s[2]), state)
        keys = [(alert.uidd, alert.id) for alert in fresh]
        return PollResult(alarms=alarms, cursor=state.dump(), notes=notes), keys

    def _take_safely(
        self,
        record: Any,
        seen_ms: int,
        alerts: dict[tuple[str, int], VlAlert],
        statuses: list[tuple[str, str, int]],
    ) -> None:
        """A live record; one that cannot be read is reported and skipped, never kept to fail
        every later poll."""
        try:
            self._take_record(record, seen_ms, alerts, statuses)
        except (ArithmeticError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._problems.bad_input(
                "live_record", f"{type(exc).__name__} on long-poll record {record!r:.200}"
            )

    def _take_record(
        self,
        record: Any,
        seen_ms: int,
        alerts: dict[tuple[str, int], VlAlert],
        statuses: list[tuple[str, str, int]],
    ) -> None:
        if not isinstance(record, dict):
            self._problems.bad_input(
                "live_record", f"long-poll record is not an object: {record!r:.200}"
            )
            return
        kind, data = record.get("type"), record.get("data")
        if isinstance(data, dict) and "type" in data and "data" in data and kind is None:
            kind, data = data.get("type"), data.get("data")  # {"data": {"type", "data"}} wrapping
        if not isinstance(data, dict):
            return
        if kind == "alert":
            alert = normalize_alert(data)
            if alert is None:
                self._problems.bad_input(
                    "alert_without_id", f"live alert without a usable id or start: {data!r:.200}"
                )
            elif alert.uidd in self._devices:
                alerts[(alert.uidd, alert.id)] = alert
        elif kind == "liveSession":
            uidd = str(data.get("uidd") or data.get("uid") or "")
            status = data.get("status")
            if uidd in self._devices and isinstance(status, str):
                if status not in KNOWN_STATES:
                    self._problems.bad_input(
                        "camera_status_value", f"{uidd}: status {status!r:.50} taken as up"
                    )
                statuses.append((uidd, status, seen_ms))

    def _alarm(self, alert: VlAlert) -> Alarm:
        device = self._devices.get(alert.uidd)
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=f"{alert.uidd}:{alert.id}",
            event_type=EVENT_TYPES.get(alert.type, EventType.OTHER),
            vendor_event=alert.type,
            description=f"{alert.type} on {device.name if device else alert.uidd}",
            occurred_at=datetime.fromtimestamp(alert.start_ms / 1000, UTC),
            camera_id=alert.uidd,
            camera_name=device.name if device else None,
            raw=dict(alert.raw),
            media=(
                MediaRequest(MediaKind.THUMBNAIL, {"uidd": alert.uidd, "alert_id": alert.id}),
                MediaRequest(
                    MediaKind.VIDEO,
                    {
                        "uidd": alert.uidd,
                        "alert_id": alert.id,
                        "start_ms": alert.start_ms,
                        "end_ms": alert.end_ms,
                        "rom": _rom(alert),
                    },
                ),
            ),
        )

    def _status_alarms(
        self, statuses: list[tuple[str, str, int]], state: _CursorState
    ) -> list[Alarm]:
        """camera_offline when a camera leaves `live` (or is offline when first seen),
        camera_online when it returns. Timed by when we saw the change (the manual never
        says what `lastactivity` is), keyed by that moment: each episode its own alarm."""
        alarms = []
        for uidd, status, seen_ms in statuses:
            previous = state.status(uidd)
            state.set_status(uidd, status)
            went_down = status in OFFLINE_STATES and previous not in OFFLINE_STATES
            came_back = status not in OFFLINE_STATES and previous in OFFLINE_STATES
            if not (went_down or came_back):
                continue
            device = self._devices.get(uidd)
            event = EventType.CAMERA_OFFLINE if went_down else EventType.CAMERA_ONLINE
            alarms.append(
                Alarm(
                    site_id=self.site_id,
                    vendor=VENDOR,
                    source_id=f"{uidd}:{status}:{seen_ms}",
                    event_type=event,
                    vendor_event=f"liveSession:{status}",
                    description=f"camera {device.name if device else uidd} is {status}",
                    occurred_at=datetime.fromtimestamp(seen_ms / 1000, UTC),
                    camera_id=uidd,
                    camera_name=device.name if device else None,
                    raw={"uidd": uidd, "status": status, "previous": previous},
                )
            )
        return alarms
