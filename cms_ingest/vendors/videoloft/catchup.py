"""Reading `/alert` back over a device's gap, for every device that has one.

A gap opens when a logger's long-poll answered after a drop (or at first sight of a device);
`/alert` is read back to the gap's floor, at most MAX_PAGES_PER_POLL pages a poll, the rest
next poll. Loggers are read at once; a poll waits for them at most CATCH_UP_WAIT_S.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from cms_ingest.sitehttp import TransportError
from cms_ingest.vendors.base import BadDeviceResponse, VendorContext, VendorError
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL, plausible_time
from cms_ingest.vendors.videoloft.alerts import VlAlert, normalize_alert
from cms_ingest.vendors.videoloft.answers import _now_ms, _result
from cms_ingest.vendors.videoloft.cursor import _CursorState
from cms_ingest.vendors.videoloft.live import VideoloftLive
from cms_ingest.vendors.videoloft.options import VideoloftOptions

# Alert ids are the alert's start in seconds (the manual's samples): an id this far past our
# clock would hide every later alert behind the cursor.
_ID_SECONDS_FROM = 946_684_800  # 2000-01-01: an id below this is a counter, not a time
FUTURE_ID_SLACK_S = 86_400
# How long a poll waits for the /alert read-backs it started (a healthy logger answers in
# milliseconds; one that hangs must not hold the others' alerts for a request timeout).
CATCH_UP_WAIT_S = 1.0


class VideoloftCatchUp(VideoloftLive):
    """The layer of `VideoloftClient` that reads `/alert`: gaps caught up, single pages."""

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        super().__init__(context, options)
        # logger -> its /alert read-back still running after the poll that started it
        self._catch_ups: dict[str, asyncio.Task[list[VlAlert]]] = {}

    async def _catch_up_all(
        self, state: _CursorState, alerts: dict[tuple[str, int], VlAlert], notes: list[str]
    ) -> None:
        """Every device that needs /alert read (no cursor yet, or an open gap), each logger's
        devices in turn and the loggers at once. The poll waits at most CATCH_UP_WAIT_S for
        them: a logger that does not answer costs the others' alerts that second once, not a
        request timeout; its read goes on and a later poll takes what it found. (Its gap stays
        open in the cursor until a read finishes, so nothing is lost; what is read twice the
        database key absorbs.)"""
        started: list[asyncio.Task[list[VlAlert]]] = []
        now_ms = _now_ms()
        for logger, uidds in self._by_logger().items():
            needed = [u for u in sorted(uidds) if state.needs_catch_up(u, now_ms)]
            if needed and self._logger_up(logger) and logger not in self._catch_ups:
                task = asyncio.create_task(
                    self._catch_up_logger(logger, needed, state), name=f"videoloft-alert:{logger}"
                )
                self._catch_ups[logger] = task
                started.append(task)
        if started:
            await asyncio.wait(started, timeout=CATCH_UP_WAIT_S)
        found: list[list[VlAlert]] = []
        for logger, task in list(self._catch_ups.items()):
            if task.done():
                del self._catch_ups[logger]
                found.append(task.result())  # vendor errors were handled inside; a bug raises
        for caught in found:
            for alert in caught:
                alerts[(alert.uidd, alert.id)] = alert
        total = sum(len(caught) for caught in found)
        if total > 1:
            notes.append(f"caught up {total} alerts after a gap")

    async def _catch_up_logger(
        self, logger: str, uidds: list[str], state: _CursorState
    ) -> list[VlAlert]:
        found: list[VlAlert] = []
        for uidd in uidds:
            try:
                await self._catch_up(uidd, state, found)
            except TransportError as exc:
                self._logger_unreachable(logger, exc)  # its other devices wait too
                break
            except VendorError as exc:
                # Refused (a token in the wrong place, a device moved...): reported, and the
                # gap stays open for a later poll; live alerts of the device still arrive.
                self._problems.bad_input("catch_up", f"{uidd}: cannot read /alert back: {exc}")
        return found

    async def _catch_up(self, uidd: str, state: _CursorState, found: list[VlAlert]) -> None:
        """Alerts of `uidd` in its open gap, from /alert (newest first, at most
        MAX_PAGES_PER_POLL pages: where it stopped is kept in the gap, for the next poll),
        added to `found` page by page: when a later page fails, those of the pages read are
        delivered, as the gap's offset already moved past them."""
        if state.last_id(uidd) is None:
            if self._options.backfill is None:  # first sight: start from its newest alert
                newest = await self._alert_page(uidd, 0, 1)
                if not newest:
                    state.start(uidd, 0)  # no alert yet: every one to come is new
                elif self._may_move_cursor(newest[0]):
                    state.start(uidd, newest[0].id)
                else:  # an id far ahead would hide what comes: start from now instead
                    state.start(uidd, int(time.time()))
                return
            state.start(uidd, int(time.time() - self._options.backfill) - 1)
            state.open_gap(uidd, until=0)
        gap = state.gap(uidd)
        if gap is None:
            return
        seen: set[int] = set()
        size = self._options.page_size
        for _page in range(MAX_PAGES_PER_POLL):
            page = await self._alert_page(uidd, gap.offset, size)
            if page and seen.issuperset(alert.id for alert in page):
                self._problems.bad_input(
                    "alert_paging", f"{uidd}: /alert answers the same page whatever the offset"
                )
                break
            seen.update(alert.id for alert in page)
            fresh = [alert for alert in page if alert.id > gap.floor]
            found += fresh
            gap.top = max([gap.top, *(a.id for a in fresh if self._may_move_cursor(a))])
            if len(fresh) < len(page) or len(page) < size:
                break
            gap.offset += len(page)
        else:
            return  # the page cap: the gap stays open, the next poll goes on from here
        if _now_ms() >= gap.until:
            state.close_gap(uidd)
        else:  # read again from the newest once the connection surely was registered
            gap.read, gap.offset = True, 0

    async def _alert_page(self, uidd: str, offset: int, limit: int) -> list[VlAlert]:
        params = {"uid": uidd, "startt": "1", "offset": str(offset), "limit": str(limit)}
        if self._max_age_ms:
            params["maxage"] = str(self._max_age_ms)
        status, payload = await self._get(
            self._logger_http(uidd), "/alert", params, auth_in="query"
        )
        if status == 404:
            self._refresh_devices_now = True  # the device moved to another logger
            raise BadDeviceResponse(f"logger no longer serves {uidd}; refreshing devices")
        items = _result(payload) if isinstance(payload, dict) else payload
        if status != 200 or not isinstance(items, list):
            raise BadDeviceResponse(f"GET /alert for {uidd} answered {status}")
        alerts = []
        for item in items:
            alert = normalize_alert(item, uidd) if isinstance(item, dict) else None
            if alert is None:
                self._problems.bad_input(
                    "alert_without_id", f"alert without a usable id or start: {item!r:.200}"
                )
            else:
                alerts.append(alert)
        return alerts

    def _may_move_cursor(self, alert: VlAlert) -> bool:
        """An alert whose start is outside the plausible window, or whose id (the start in
        seconds) is more than a day ahead, is stored but never moves a cursor: it would hide
        every later alert of its device behind it."""
        start = datetime.fromtimestamp(alert.start_ms / 1000, UTC)
        id_ok = alert.id < _ID_SECONDS_FROM or alert.id <= time.time() + FUTURE_ID_SLACK_S
        if plausible_time(start) and id_ok:
            return True
        self._problems.bad_input(
            "implausible_time",
            f"alert {alert.uidd}:{alert.id} starts {start.isoformat()}: the cursor stays",
        )
        return False
