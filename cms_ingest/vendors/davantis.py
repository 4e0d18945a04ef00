"""Davantis video-analytics sites (HTTP API on port 21000).

What the device gives us, and how we use it:
- OAuth password grant; the access token expires (`expires_in`). We refresh with the refresh
  token shortly before expiry, and whenever a request answers 401 or one of the two expiry
  error codes; when refreshing fails we log in again. One refresh at a time per site.
- `GET /alarms?min_id=N` returns alarms newer than N, newest first, at most 300 (the cap),
  204 when there are none. We ask from one below the cursor: the cursor's own alarm comes
  back, and another time or camera for it (or a newest id below the cursor) means the
  device's ids started again (reset, replaced box): a new device life, whose source_ids carry
  its tag. After an outage more than a page may be waiting: we page back with `max_date`
  just past each page's oldest plausible `started` (see `_collect`), split by camera and event
  where one instant holds more than a page, at most MAX_PAGES_PER_POLL pages a poll; what is
  left waits in the cursor's `backlog`, so nothing is dropped. `cra=yes` keeps only alarms
  raised while armed unless `options.armed_only` is false.
- Times without an offset are the installation's: `current_utc_offset` in any form, or a
  zone name, or the site's `time_zone` option (a zone keeps its daylight-saving rules).
- Media readiness (`snapshot_status`, `video_status`) changes after the alarm first appears
  and a `min_id` poll never shows that, so the media fetcher asks again per alarm.
- `*_absolute` URLs carry whatever host the device was set up with (often a NAT address):
  never used. Media paths are built here and resolved against the configured site URL.
- Everything the device sends is untrusted: answers are size- and depth-capped before they
  are parsed (an unreadable one is bad input and fails the poll, never the poller).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ConfigDict, Field, field_validator

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.sitehttp import heavy_turn
from cms_ingest.units import Duration
from cms_ingest.vendors.base import (
    ActionSpec,
    AuthenticationFailed,
    BadDeviceResponse,
    Cursor,
    DeviceRefused,
    Download,
    InvalidAction,
    MediaNotReady,
    MediaProbe,
    PollResult,
    SiteOptions,
    VendorContext,
)
from cms_ingest.vendors.common import (
    DESCRIPTION_LIMIT,
    MAX_JSON_BYTES,  # noqa: F401 - re-exported: tests size hostile answers by it
    MAX_PAGES_PER_POLL,
    as_id,
    clean_text,
    fetch_json,
    life_source_id,
    new_life,
    parse_time,
    plausible_time,
    read_json,
)

VENDOR = "davantis"

EVENT_TYPES: Mapping[int, EventType] = {
    0: EventType.SYSTEM,
    1: EventType.MOTION,
    2: EventType.PERSON,
    3: EventType.VEHICLE,
    7: EventType.OTHER,
    10: EventType.SABOTAGE,
    11: EventType.INTRUSION,
    18: EventType.INPUT,
}
ARMING_EVENT = 102
SYSTEM_EVENTS = frozenset({0, ARMING_EVENT})  # never carry media
KNOWN_EVENTS = frozenset({*EVENT_TYPES, ARMING_EVENT})

# Paging (see _collect). The overlap makes each `max_date` cover the previous page's oldest
# instant whether the device reads it as inclusive or exclusive.
PAGE_OVERLAP = timedelta(milliseconds=1)
SPLIT_FILTERS = ("camera_id", "event_id")  # how a window max_date cannot page is narrowed
# Cameras (or events) a window is split into, at most: all of them, with the parts of the
# other splits, must fit the cursor's MAX_BACKLOG_WINDOWS when a poll stops among them.
MAX_SPLIT_PARTS = 48
# Parts of a page-capped catch-up the cursor keeps (more become one covering them all).
MAX_BACKLOG_WINDOWS = 64
Window = dict[str, str]  # the GET /alarms filters of a part still to read
# Ids a device plausibly adds between two answers; a lone id further up is not believed.
MAX_ID_JUMP = 1_000_000
JUMP_RUN = 3  # ids together above such a jump that make it a counter that moved on
CURSOR_TEXT_LIMIT = 64  # a device's `started` / camera id kept in the cursor (reset checks)

# Event 102 says armed or disarmed in the installation's language. Matched on the
# description with accents removed and case folded; "disarmed" first (it contains "armed").
DISARMED_WORDS = re.compile(
    r"\b(dis|des|dez|un|de)-?arm|unscharf|entschaerf|entscharf|disinser|desactiv|desativ"
    r"|deactiv|deaktiv|disattiv|dezactiv|uitgeschakeld|ontwapen|rozbroj|frakobl"
    r"|frankoppl|avlarm"
)
ARMED_WORDS = re.compile(
    r"\barm(ed|ado|ada|e|ee|at|ata|ato|ati)?\b|scharf|\binserit|\bactiv|\bativad|\baktiv"
    r"|\battivat|ingeschakeld|gewapend|uzbroj|tilkobl|tillkoppl|\blarmad"
)
# Where an input names its cameras, or a camera its inputs (the manual shows neither).
INPUT_CAMERA_FIELDS = ("cameras", "camera_ids", "idcameras", "camera", "idcamera", "camera_id")
CAMERA_INPUT_FIELDS = ("inputs", "input_ids", "idinputs", "input", "idinput", "input_id")

# Error codes that mean "this access token is no longer good" (manual + field notes).
TOKEN_ERROR_CODES = frozenset(
    {
        "keymanagement.service.access_token_expired",
        "keymanagement.service.invalid_access_token",
    }
)
# An OAuth bearer token (RFC 6750 b64token): anything else would be written into a header.
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]{1,4096}=*")
CAMERA_NAMES_TTL_S = 600.0
ARMING_TTL_S = 60.0  # /inputs re-read this often (and right after an arming change)


class DavantisOptions(SiteOptions):
    """`options:` of a Davantis site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    armed_only: bool = True  # cra=yes: only alarms raised while the camera was armed
    backfill: Duration | None = None  # first start: ingest this far back instead of nothing
    page_cap: int = Field(default=300, ge=1)  # the device's per-response maximum
    # IANA zone of the installation, for a device that sends times without an offset and
    # only a fixed `current_utc_offset`: alarms from before a DST change keep their hour.
    time_zone: str | None = None

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None and _zone_name(value) is None:
            raise ValueError(f"unknown time zone {value!r} (an IANA name like Europe/Madrid)")
        return value


class _Token:
    """The current access token; `generation` tells a stale failure from a fresh one."""

    def __init__(self) -> None:
        self.access: str | None = None
        self.refresh: str | None = None
        self.expires_at = 0.0
        self.generation = 0


class DavantisClient:
    vendor = VENDOR
    actions: Mapping[str, ActionSpec] = {
        # Setting a relay or input to a state twice leaves it in that state: safe to repeat.
        "relay": ActionSpec(idempotent=True),
        "arm": ActionSpec(idempotent=True),
        "disarm": ActionSpec(idempotent=True),
    }

    def __init__(
        self,
        context: VendorContext,
        options: DavantisOptions,
        clock: Any = time.monotonic,
    ) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._username = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._clock = clock
        self._token = _Token()
        self._token_lock = asyncio.Lock()
        self._cameras: dict[str, str] = {}
        self._cameras_loaded_at: float | None = None
        # The installation's zone: the site option, else the device's current_utc_offset.
        self._site_zone = _zone_name(options.time_zone) if options.time_zone else None
        self._zone: tzinfo | None = self._site_zone
        self._camera_inputs: dict[str, list[str]] = {}  # camera -> inputs, if cameras say
        self._outliers: set[int] = set()  # implausible ids reported (once each)
        self._by_time = True  # the device lists newest `started` first, until seen otherwise
        # Arming, when not filtered by cra=yes: per camera from the inputs that cover it,
        # else the site's (any input armed); event 102 updates it as it streams in.
        self._site_armed: bool | None = None
        self._camera_armed: dict[str, bool] = {}
        self._inputs_disagree = False
        self._arming_loaded_at: float | None = None

    # ------------------------------------------------------------------ requests

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> tuple[int, Any]:
        """An authenticated request; returns (status, parsed JSON or None).

        A token rejected as expired or invalid is renewed once and the request repeated.
        """
        for attempt in (1, 2):
            generation, token = await self._valid_token()
            # Not JSON on a 2xx status: bad input, and the request fails.
            answer, payload = await fetch_json(
                self._http,
                method,
                path,
                self._problems,
                strict=True,
                params=params,
                headers={"Authorization": f"Bearer {token}"},
                json_body=json_body,
            )
            status = answer.status
            if status == 401 or _error_code(payload) in TOKEN_ERROR_CODES:
                if attempt == 1:
                    self._invalidate(generation)
                    continue
                raise AuthenticationFailed(
                    f"{method} {path}: the device rejects a fresh token "
                    f"({_fault_text(payload) or status})"
                )
            return status, payload
        raise AssertionError("unreachable")

    def _invalidate(self, generation: int) -> None:
        # Only the token that failed is dropped: a concurrent request may have renewed it.
        if self._token.generation == generation:
            self._token.expires_at = 0.0

    async def _valid_token(self) -> tuple[int, str]:
        token = self._token
        if token.access is not None and self._clock() < token.expires_at:
            return token.generation, token.access
        async with self._token_lock:  # one refresh at a time; late arrivals reuse its result
            if token.access is None or self._clock() >= token.expires_at:
                await self._renew()
            assert token.access is not None
            return token.generation, token.access

    async def _renew(self) -> None:
        if self._token.refresh is not None:
            try:
                await self._grant(
                    {"grant_type": "refresh_token", "refresh_token": self._token.refresh}
                )
                return
            except AuthenticationFailed:
                self._token.refresh = None  # refused: fall back to a fresh login
        await self._grant(
            {"grant_type": "password", "username": self._username, "password": self._password}
        )

    async def _grant(self, form: Mapping[str, str]) -> None:
        grant = form["grant_type"]
        answer, payload = await fetch_json(
            self._http, "POST", "/oauth/token", self._problems, form=form
        )
        status = answer.status
        if status != 200 or not isinstance(payload, dict) or "access_token" not in payload:
            detail = _fault_text(payload) or f"HTTP {status}"
            raise AuthenticationFailed(f"{grant} grant refused: {detail}")
        if not isinstance(payload["access_token"], str) or not _BEARER_TOKEN_RE.fullmatch(
            payload["access_token"]
        ):
            # It goes into an Authorization header: CR/LF or odd bytes would inject headers.
            raise AuthenticationFailed(
                f"{grant} grant: the device's access token is not a valid bearer token"
            )
        expires_in = _as_float(payload.get("expires_in"), default=3600.0)
        # Renew at 90% of the lifetime (at most a minute early) so polls never hit expiry.
        margin = min(60.0, expires_in * 0.1)
        self._token.access = str(payload["access_token"])
        self._token.refresh = (
            str(payload["refresh_token"]) if payload.get("refresh_token") else None
        )
        self._token.expires_at = self._clock() + max(1.0, expires_in - margin)
        self._token.generation += 1

    # ------------------------------------------------------------------ alarms

    def _filters(self) -> dict[str, str]:
        return {"cra": "yes"} if self._options.armed_only else {}

    async def _alarm_page(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        return (await self._raw_alarm_page(params))[1]

    async def _raw_alarm_page(self, params: Mapping[str, str]) -> tuple[int, list[dict[str, Any]]]:
        """(items the device sent, the usable ones): a page is full by the device's count."""
        status, payload = await self._request("GET", "/alarms", params=params)
        if status == 204:
            return 0, []
        if status != 200:
            raise BadDeviceResponse(f"GET /alarms answered {status}: {_fault_text(payload)}")
        if not isinstance(payload, list):
            raise BadDeviceResponse(f"GET /alarms: expected a list, got {type(payload).__name__}")
        return len(payload), [item for item in payload if self._usable(item)]

    def _usable(self, item: Any) -> bool:
        if isinstance(item, dict) and _alarm_id(item) is not None:
            return True
        self._problems.bad_input("alarm_without_id", f"alarm without a usable id: {item!r:.200}")
        return False

    async def _collect(
        self, params: Window, budget: _PageBudget, found: dict[int, dict[str, Any]]
    ) -> list[Window]:
        """Adds every alarm matching `params` with an id above its `min_id` to `found`, and
        returns what the page budget left unread (nothing: complete).

        The device answers at most `page_cap` alarms, the latest `started` first. A full page
        is followed by the page before its oldest plausible `started`, plus PAGE_OVERLAP:
        whether the device reads `max_date` as inclusive or exclusive, the alarms sharing that
        time come again (and are known by id), none is skipped. A full page with nothing new
        (over `page_cap` alarms share one instant) is split by camera, then by event.
        """
        floor_id = as_id(params.get("min_id")) or 0
        query = dict(params)
        while True:
            if not budget.take():
                return [query]  # read on from here next poll
            sent, page = await self._raw_alarm_page(query)
            fresh = _add_new(page, floor_id, found)
            if sent < self._options.page_cap:
                return []
            timed = self._timed_starts(page)
            if not self._listed_by_time(timed):
                return await self._bisect(query, timed, budget, found)
            older = _page_bound(timed)
            if fresh == 0 or older is None:
                return await self._split(query, budget, found)
            query = {**query, "max_date": older}

    def _timed_starts(self, page: list[dict[str, Any]]) -> list[tuple[datetime, str]]:
        """(start, `started` as the device wrote it) of the page's alarms with a plausible
        start, in the page's order: read once per page for the checks below."""
        return [
            (when, item["started"])
            for item in page
            if (when := self._plausible_started(item)) is not None
        ]

    def _listed_by_time(self, timed: list[tuple[datetime, str]]) -> bool:
        """Whether this device lists newest `started` first (the manual's note), so that a
        full page holds every alarm after its oldest time. One page listed otherwise (by id,
        as the manual's polling sample says, with times not rising with ids) settles it for
        this client: from then on full pages are bisected in time instead."""
        if any(newer < older for (newer, _), (older, _) in itertools.pairwise(timed)):
            self._by_time = False
        return self._by_time

    async def _bisect(
        self,
        query: Window,
        timed: list[tuple[datetime, str]],
        budget: _PageBudget,
        found: dict[int, dict[str, Any]],
    ) -> list[Window]:
        """A full page from a device not listing by time says nothing about the alarms it
        left out, whatever their time: the window is cut in two at the page's median start
        (halves overlapping by PAGE_OVERLAP, for either reading of min_date and max_date),
        newer half first, until each half's page is not full."""
        middle = sorted(timed)[len(timed) // 2][1] if timed else None
        below = None if middle is None else _shifted(middle, PAGE_OVERLAP)
        if middle is not None and below is not None:
            newer = {**query, "min_date": middle}
            older = {**query, "max_date": below}
            if query not in (newer, older):  # else one instant holds over a page
                left = await self._collect(newer, budget, found)
                return left + await self._collect(older, budget, found)
        return await self._split(query, budget, found)

    def _plausible_started(self, item: Mapping[str, Any]) -> datetime | None:
        """The alarm's start if it is a readable, plausible time (reported elsewhere if not)."""
        when = self._parse_started(item.get("started"))
        return when if when is not None and plausible_time(when) else None

    async def _split(
        self, query: Window, budget: _PageBudget, found: dict[int, dict[str, Any]]
    ) -> list[Window]:
        """The alarms of a window `max_date` cannot page through, one camera (then one event)
        at a time: the documented filters are the only other way to narrow an answer. What
        the budget leaves unread is kept per part, so the next poll goes on, not over."""
        depth = sum(key in query for key in SPLIT_FILTERS)
        values = self._split_values(SPLIT_FILTERS[depth], found) if depth < 2 else []
        if not values or len(values) > MAX_SPLIT_PARTS:
            self._problems.bad_input(
                "paging_stuck",
                f"over {self._options.page_cap} alarms share one start time at or before "
                f"{query.get('max_date') or 'now'} and the camera and event filters cannot "
                f"narrow them ({_filters_text(query)}); some may be missed",
            )
            return []
        left: list[Window] = []
        for value in values:
            left += await self._collect({**query, SPLIT_FILTERS[depth]: value}, budget, found)
        return left

    def _split_values(self, key: str, found: Mapping[int, Mapping[str, Any]]) -> list[str]:
        field = "idcamera" if key == "camera_id" else "idevent"
        known = {*self._cameras, "0"} if key == "camera_id" else {str(e) for e in KNOWN_EVENTS}
        seen = {
            str(ident) for item in found.values() if (ident := as_id(item.get(field))) is not None
        }
        return sorted(known | seen, key=lambda value: (len(value), value))

    async def poll(self, cursor: Cursor | None) -> PollResult:
        await self._refresh_context()
        if not self._options.armed_only:
            await self._refresh_arming()
        if cursor is None:
            return await self._first_poll()
        state = _CursorState.read(cursor)
        budget = _PageBudget()
        found: dict[int, dict[str, Any]] = {}
        # From the cursor's own alarm on: it comes back with every answer, and a different
        # time or camera for it means the device's ids started again.
        head = {**self._filters(), "min_id": str(max(0, state.last_id - 1))}
        unread = await self._collect(head, budget, found)
        reset = await self._reset_evidence(state, found)
        if reset is not None:
            self._problems.device_reset(reset)
            state = _CursorState(last_id=0, life=new_life())
            found = {}
            unread = await self._collect({**self._filters(), "min_id": "0"}, budget, found)
        # The cursor's own alarm is stored already (or, at first start, deliberately not).
        mine = found.pop(state.last_id, None)
        if mine is not None and state.started is None:  # a cursor from before reset checks
            state = dataclasses.replace(
                state,
                started=_cursor_text(mine.get("started")),
                camera=_cursor_text(mine.get("idcamera")),
            )
        # The rest of the head goes on above the cursor's alarm, which needs no second look.
        unread = [{**window, "min_id": str(state.last_id)} for window in unread]
        # New alarms first; then what earlier capped polls left, oldest part first.
        for window in state.backlog:
            unread += await self._collect(window, budget, found)
        await heavy_turn(len(found))
        return self._result(state, found, self._bounded(unread))

    def _bounded(self, windows: list[Window]) -> tuple[Window, ...]:
        """The unread parts, few enough for the cursor: past MAX_BACKLOG_WINDOWS the last ones
        become one window covering them (read again in part: ids are stored once); the
        first ones keep their progress."""
        if len(windows) <= MAX_BACKLOG_WINDOWS:
            return tuple(windows)
        keep = MAX_BACKLOG_WINDOWS - 1
        return (*windows[:keep], self._covering(windows[keep:]))

    def _covering(self, windows: list[Window]) -> Window:
        """One window holding every alarm of `windows` (and perhaps more)."""
        floors = [as_id(window.get("min_id")) or 0 for window in windows]
        bounds = [window.get("max_date") for window in windows]
        merged = {**self._filters(), "min_id": str(min(floors))}
        if all(bound is not None for bound in bounds):
            merged["max_date"] = max(
                (bound for bound in bounds if bound is not None),
                key=lambda text: parse_time(text) or datetime.max.replace(tzinfo=UTC),
            )
        since = {window.get("min_date") for window in windows}
        if len(since) == 1 and (only := since.pop()) is not None:
            merged["min_date"] = only
        return merged

    def _result(
        self,
        state: _CursorState,
        found: Mapping[int, dict[str, Any]],
        backlog: tuple[Window, ...],
    ) -> PollResult:
        fresh = [found[key] for key in sorted(found)]
        last_id = self._next_last_id(state.last_id, list(found))
        newest = found.get(last_id)
        next_state = dataclasses.replace(
            state,
            last_id=last_id,
            backlog=backlog,
            started=state.started if newest is None else _cursor_text(newest.get("started")),
            camera=state.camera if newest is None else _cursor_text(newest.get("idcamera")),
        )
        notes = [f"caught up {len(fresh)} alarms"] if len(fresh) > self._options.page_cap else []
        if backlog:
            notes.append(
                f"page cap ({MAX_PAGES_PER_POLL} pages) reached: {len(backlog)} part(s) of "
                f"the catch-up ({_filters_text(backlog[0])}, ...) follow in the next polls"
            )
        return PollResult(
            alarms=[self._alarm(item, state.life) for item in fresh],
            cursor=next_state.as_cursor(),
            notes=notes,
        )

    def _next_last_id(self, base: int, ids: list[int]) -> int:
        """The highest id the cursor may move to. A lone id far above the others (over
        MAX_ID_JUMP) would hide every later alarm of the device behind it: it is stored, and
        reported, but does not move the cursor; a whole run of ids up there (a counter
        really moved on) does."""
        above = sorted(alarm_id for alarm_id in ids if alarm_id > base)
        accepted = base
        for index, alarm_id in enumerate(above):
            if alarm_id - accepted > MAX_ID_JUMP and len(above) - index < JUMP_RUN:
                for outlier in above[index:]:
                    # Stored with every poll that sees it (the unique key keeps one row);
                    # reported once.
                    if outlier in self._outliers:
                        continue
                    self._outliers.add(outlier)
                    self._problems.bad_input(
                        "implausible_alarm_id",
                        f"alarm id {outlier} is over {MAX_ID_JUMP} above the others "
                        f"(last {accepted}); stored, but the cursor stays below it",
                    )
                break
            accepted = alarm_id
        return accepted

    async def _reset_evidence(
        self, state: _CursorState, found: Mapping[int, Mapping[str, Any]]
    ) -> str | None:
        """Why the device's alarm ids must have started again, or None."""
        if state.last_id == 0:
            return None
        mine = found.get(state.last_id)
        if mine is None and found and self._options.armed_only:
            # Newer ids but not the cursor's own: cra=yes may hide the id it has now (raised
            # while disarmed since a reset). Asked once more, unfiltered; rare, so cheap.
            mine = await self._listed(state.last_id)
        if mine is not None:
            started, camera = _cursor_text(mine.get("started")), _cursor_text(mine.get("idcamera"))
            same_time = state.started is None or _same_time(started, state.started, self._zone)
            same_camera = state.camera is None or camera == state.camera
            if same_time and same_camera:
                return None
            return (
                f"alarm {state.last_id} was stored with started {state.started} on camera "
                f"{state.camera}; the device now lists it with started {started} on camera {camera}"
            )
        if found:
            return None  # newer ids exist: the cursor's own alarm is merely gone
        # Nothing at or above the cursor: where is the device's newest alarm? (An empty device
        # proves nothing yet: a failing one may answer so. Its first new alarm will tell.)
        newest = max(
            (_alarm_id(i) or 0 for i in await self._alarm_page(self._filters())), default=0
        )
        if 0 < newest < state.last_id:
            return f"the device's newest alarm id {newest} is below our cursor {state.last_id}"
        return None

    async def _listed(self, alarm_id: int) -> dict[str, Any] | None:
        page = await self._alarm_page({"min_id": str(alarm_id - 1)})
        return next((item for item in page if _alarm_id(item) == alarm_id), None)

    async def _first_poll(self) -> PollResult:
        """First start on a site: the newest id becomes the cursor (no backlog flood)."""
        newest = await self._alarm_page(self._filters())
        ids = [_alarm_id(item) or 0 for item in newest]
        start_id = self._next_last_id(min(ids) - 1, ids) if ids else 0
        by_id = {_alarm_id(item) or 0: item for item in newest}
        state = _CursorState(last_id=start_id)
        if start_id in by_id:
            state = dataclasses.replace(
                state,
                started=_cursor_text(by_id[start_id].get("started")),
                camera=_cursor_text(by_id[start_id].get("idcamera")),
            )
        if self._options.backfill is None:
            return PollResult(alarms=[], cursor=state.as_cursor())
        since = (datetime.now(UTC) - timedelta(seconds=self._options.backfill)).isoformat()
        budget, found = _PageBudget(), dict[int, dict[str, Any]]()
        params = {**self._filters(), "min_id": "0", "min_date": since}
        backlog = self._bounded(await self._collect(params, budget, found))
        items = [found[key] for key in sorted(found) if key <= start_id]
        return PollResult(
            alarms=[self._alarm(item, None) for item in items],
            cursor=dataclasses.replace(state, backlog=backlog).as_cursor(),
            notes=[f"backfilled {len(items)} alarms since {since}"],
        )

    def _alarm(self, item: Mapping[str, Any], life: str | None) -> Alarm:
        alarm_id = _alarm_id(item)
        event = as_id(item.get("idevent"))
        camera = item.get("idcamera")
        camera_id = None if camera is None else str(camera)
        description = str(item.get("description") or item.get("description_translation") or "")
        started, readable = self._device_time(item.get("started"), alarm_id)
        has_media = event not in SYSTEM_EVENTS
        # The device's own `started` text helps find the alarm again for its media; one we
        # could not read is not sent back to it.
        locator = {"alarm_id": alarm_id, "started": item.get("started") if readable else None}
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=life_source_id(str(alarm_id), life),
            event_type=self._event_type(event, item),
            vendor_event="" if event is None else str(event),
            description=description,
            occurred_at=started,
            camera_id=camera_id,
            camera_name=self._cameras.get(camera_id or ""),
            armed=self._armed(event, camera_id, item),
            raw=dict(item),
            media=(
                self._media(MediaKind.SNAPSHOT, item, "snapshot_status", has_media, locator),
                self._media(MediaKind.VIDEO, item, "video_status", has_media, locator),
            ),
        )

    def _event_type(self, event: int | None, item: Mapping[str, Any]) -> EventType:
        if event != ARMING_EVENT:
            return _detection_type(event)
        armed = _arming_state(item)
        if armed is None:
            self._problems.bad_input(
                "arming_event_unclassified",
                f"event 102 (alarm {_alarm_id(item)}) says {_arming_text(item)!r:.200}: "
                "neither armed nor disarmed in any language we know; stored as system",
            )
            return EventType.SYSTEM
        return EventType.ARMED if armed else EventType.DISARMED

    def _armed(
        self, event: int | None, camera_id: str | None, item: Mapping[str, Any]
    ) -> bool | None:
        """Whether the camera was armed: known for cra=yes; else from inputs and event 102."""
        if self._options.armed_only:
            return True  # cra=yes lists only alarms raised while armed
        if event == ARMING_EVENT:
            armed = _arming_state(item)
            if armed is None:
                return self._site_armed  # unreadable: the state we knew stands
            # The site's state changed now; which input did is re-read on the next poll.
            self._site_armed = armed
            self._camera_armed.clear()
            self._arming_loaded_at = None
            return armed
        if camera_id is not None and camera_id in self._camera_armed:
            return self._camera_armed[camera_id]
        if camera_id not in (None, "0") and self._inputs_disagree:
            self._problems.bad_input(
                "camera_input_unknown",
                f"camera {camera_id} is on no input the device names while its inputs "
                "differ (some armed, some not): its alarms are stored with armed unknown",
            )
            return None
        return self._site_armed

    async def _refresh_arming(self) -> None:
        now = self._clock()
        if self._arming_loaded_at is not None and now - self._arming_loaded_at < ARMING_TTL_S:
            return
        self._arming_loaded_at = now
        status, inputs = await self._request("GET", "/inputs")
        if status != 200 or not isinstance(inputs, list):
            self._problems.bad_input("inputs", f"input list unreadable (HTTP {status})")
            return
        states: dict[str, bool] = {}
        members: dict[str, set[str]] = {}  # input id -> its cameras, from the input's side
        for item in inputs:
            if not isinstance(item, dict) or not isinstance(item.get("status"), bool):
                continue
            input_id = str(as_id(item.get("id")))
            states[input_id] = item["status"]
            members[input_id] = set(_linked_ids(item, INPUT_CAMERA_FIELDS))
        for camera, input_ids in self._camera_inputs.items():  # ... and from the cameras' side
            for input_id in input_ids:
                members.setdefault(input_id, set()).add(camera)
        armed_cameras: dict[str, bool] = {}
        for input_id, cameras in members.items():
            for camera in cameras:  # a camera is armed while any input covering it is
                armed_cameras[camera] = armed_cameras.get(camera, False) or states.get(
                    input_id, False
                )
        values = set(states.values())
        self._site_armed = any(values) if values else None
        self._inputs_disagree = len(values) > 1
        self._camera_armed = armed_cameras

    def _media(
        self,
        kind: MediaKind,
        item: Mapping[str, Any],
        field: str,
        has_media: bool,
        locator: Mapping[str, Any],
    ) -> MediaRequest:
        status = item.get(field)
        available = has_media and status != "unavailable"
        return MediaRequest(kind=kind, locator=dict(locator), available=available)

    def _parse_started(self, value: Any) -> datetime | None:
        """A device time in UTC. Without an offset it is the installation's local time, read
        in its zone at that date (a zone name keeps the hour across daylight-saving changes)."""
        return parse_time(value, self._zone or UTC)

    def _device_time(self, value: Any, alarm_id: int | None) -> tuple[datetime, bool]:
        """(the alarm's time in UTC, whether the device's value was readable)."""
        parsed = self._parse_started(value)
        if parsed is not None:
            if not plausible_time(parsed):
                self._problems.bad_input(
                    "implausible_time",
                    f"alarm {alarm_id}: `started` {parsed.isoformat()} is before 2000 or over "
                    "a day ahead; stored as sent, never used to page",
                )
            return parsed, True
        self._problems.bad_input(
            "bad_started",
            f"alarm {alarm_id}: `started` {value!r:.100} is not a usable ISO 8601 time; using now",
        )
        return datetime.now(UTC), False

    # ------------------------------------------------------------------ context

    async def _refresh_context(self) -> None:
        """Camera names and the installation's UTC offset; best effort, never fails a poll."""
        now = self._clock()
        if (
            self._cameras_loaded_at is not None
            and now - self._cameras_loaded_at < CAMERA_NAMES_TTL_S
        ):
            return
        try:
            status, cameras = await self._request("GET", "/cameras")
            if status == 200 and isinstance(cameras, list):
                self._cameras = {
                    str(cam["id"]): str(cam.get("alias") or cam.get("name") or cam["id"])
                    for cam in cameras
                    if isinstance(cam, dict) and "id" in cam
                }
            if status == 200 and isinstance(cameras, list):
                self._camera_inputs = {
                    str(cam["id"]): _linked_ids(cam, CAMERA_INPUT_FIELDS)
                    for cam in cameras
                    if isinstance(cam, dict) and "id" in cam
                }
            status, installation = await self._request("GET", "/installation")
            if status == 200 and isinstance(installation, dict):
                self._read_zone(installation.get("current_utc_offset"))
        except (BadDeviceResponse, KeyError, TypeError, ValueError) as exc:
            self._problems.bad_input("cameras", f"camera list unreadable: {exc!r:.200}")
        # Only once the device answered: after a failed login or connection (which fails this
        # poll anyway) the names are asked for on the next poll, not ten minutes later.
        self._cameras_loaded_at = now

    def _read_zone(self, value: Any) -> None:
        """The installation's zone from `current_utc_offset`, in any form a device may send
        it. A site's `time_zone` option wins. An unreadable one is reported and the last
        good one kept; with none at all, times without an offset are read as UTC (reported)."""
        if self._site_zone is not None:
            return
        zone = installation_zone(value)
        if zone is not None:
            self._zone = zone
            return
        fallback = "the last good one is kept" if self._zone else "times without one read as UTC"
        self._problems.bad_input(
            "utc_offset",
            f"GET /installation: current_utc_offset {value!r:.80} is not an offset or zone "
            f"we can read; {fallback} (set the site option time_zone)",
        )

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        """Commissioning checks beyond the common ones (see cms_ingest/probe.py)."""
        return {"installation time zone": self._probe_time_zone}

    async def _probe_time_zone(self) -> str:
        """How alarm times without an offset will be read: fails when they cannot be."""
        _, installation = await self._request("GET", "/installation")
        value = installation.get("current_utc_offset") if isinstance(installation, dict) else None
        if self._options.time_zone:
            return (
                f"site option time_zone {self._options.time_zone} (the device says {value!r:.80})"
            )
        zone = installation_zone(value)
        if zone is None:
            raise BadDeviceResponse(
                f"current_utc_offset {value!r:.80} is not an offset or zone we can read: "
                "set the site option time_zone"
            )
        if isinstance(zone, ZoneInfo):
            return f"current_utc_offset {value!r:.80}: zone {zone}"
        return (
            f"current_utc_offset {value!r:.80}: fixed offset {zone}. If the device writes "
            "times without an offset, set the site option time_zone (daylight saving)"
        )

    async def recent_alarms(self, count: int) -> list[Alarm]:
        """The newest alarms on the device, whatever their state (for the probe)."""
        await self._refresh_context()
        return [self._alarm(item, None) for item in (await self._alarm_page({}))[:count]]

    async def describe(self) -> dict[str, Any]:
        """Cameras, relays and inputs, for the commissioning probe."""
        await self._refresh_context()
        _, relays = await self._request("GET", "/relays")
        _, inputs = await self._request("GET", "/inputs")
        return {"cameras": dict(self._cameras), "relays": relays, "inputs": inputs}

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        alarm_id = as_id(locator.get("alarm_id"))
        if alarm_id is None:
            return MediaProbe("unavailable", detail="no alarm id recorded for this media")
        item = await self._find_alarm(alarm_id, locator.get("started"))
        if item is None:
            return MediaProbe("pending", detail=f"alarm {alarm_id} not listed by the device")
        field = "snapshot_status" if kind is MediaKind.SNAPSHOT else "video_status"
        status = item.get(field)
        if status == "ready":
            return MediaProbe("ready", path=f"/alarms/{alarm_id}/{kind.value}")
        if status == "unavailable":
            return MediaProbe("unavailable", detail=f"{field} is unavailable")
        shown = clean_text(status, 100) if isinstance(status, str) else f"{status!r:.100}"
        return MediaProbe("pending", detail=f"{field} is {shown}")

    async def _find_alarm(self, alarm_id: int, started: Any) -> dict[str, Any] | None:
        """The alarm as the device lists it now (no cra filter: find it whatever its state)."""
        queries: list[dict[str, str]] = []
        # Just past its own start: it is listed whether max_date is inclusive or not.
        bound = _shifted(started, PAGE_OVERLAP) if isinstance(started, str) else None
        if bound is not None:
            queries.append({"min_id": str(alarm_id - 1), "max_date": bound})
        queries.append({"min_id": str(alarm_id - 1)})
        for params in queries:
            for item in await self._alarm_page(params):
                if _alarm_id(item) == alarm_id:
                    return item
        return None

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        for attempt in (1, 2):
            generation, token = await self._valid_token()
            async with self._http.request(
                "GET",
                path,
                headers={"Authorization": f"Bearer {token}"},
                timeout_s=600.0,
                read_timeout_s=30.0,
            ) as response:
                if response.status != 200:
                    # The same token errors as the API calls: a 401 or an expiry errorcode in
                    # the body, whatever the status.
                    payload = await read_json(response, self._problems, f"GET {path}")
                    if response.status == 401 or _error_code(payload) in TOKEN_ERROR_CODES:
                        if attempt == 1:
                            self._invalidate(generation)
                            continue
                        raise AuthenticationFailed(
                            f"GET {path}: the device rejects a fresh token "
                            f"({_fault_text(payload) or response.status})"
                        )
                if response.status == 404:
                    raise MediaNotReady(f"GET {path} answered 404")
                if response.status != 200:
                    raise BadDeviceResponse(f"GET {path} answered {response.status}")
                yield Download(
                    content_type=response.content_type,
                    content_length=response.content_length,
                    chunks=response.content.iter_chunked(256 * 1024),
                )
                return

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        resource_id = _resource_id(action)
        if action.kind == "relay":
            state = action.params.get("state", True)
            if not isinstance(state, bool):
                raise InvalidAction(f"params.state must be true or false, not {state!r}")
            return await self._patch(f"/relays/{resource_id}", state)
        if action.kind in ("arm", "disarm"):
            self._arming_loaded_at = None  # re-read the inputs on the next poll
            return await self._patch(f"/inputs/{resource_id}", action.kind == "arm")
        raise InvalidAction(
            f"davantis has no action {action.kind!r} (it has: {', '.join(sorted(self.actions))})"
        )

    async def _patch(self, path: str, status_value: bool) -> ActionResult:
        status, payload = await self._request("PATCH", path, json_body={"status": status_value})
        answer = payload if isinstance(payload, dict) else {"body": payload}
        if 200 <= status < 300:
            return ActionResult(result={"status": status, "answer": answer})
        if 400 <= status < 500:
            raise DeviceRefused(
                f"PATCH {path} refused ({status}): {_fault_text(payload) or 'no reason given'}",
                answer=answer,
            )
        raise BadDeviceResponse(f"PATCH {path} answered {status}: {_fault_text(payload)}")

    async def close(self) -> None:
        """Close the site's kept connection (aiohttp's session belongs to the process)."""
        self._http.close()


# ---------------------------------------------------------------------- parsing helpers


def _error_code(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    fault = payload.get("fault")
    if isinstance(fault, dict):
        detail = fault.get("detail")
        if isinstance(detail, dict) and isinstance(detail.get("errorcode"), str):
            return str(detail["errorcode"])
    return None


def _fault_text(payload: Any) -> str:
    """The device's error text, storable (it ends up in `site_state.last_error` and such)."""
    return clean_text(_raw_fault_text(payload), DESCRIPTION_LIMIT)


def _raw_fault_text(payload: Any) -> str:
    if not isinstance(payload, dict):
        return ""
    fault = payload.get("fault")
    if isinstance(fault, dict):
        text = fault.get("faultstring")
        code = _error_code(payload)
        return " / ".join(str(part) for part in (text, code) if part)
    for key in ("error_description", "error", "message"):
        if isinstance(payload.get(key), str):
            return str(payload[key])
    return ""


def _alarm_id(item: Mapping[str, Any]) -> int | None:
    return as_id(item.get("id"))


def _as_float(value: Any, *, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) else default


def _detection_type(event: int | None) -> EventType:
    if event is None:
        return EventType.OTHER
    return EVENT_TYPES.get(event, EventType.OTHER)


def _arming_text(item: Mapping[str, Any]) -> str:
    parts = (item.get("description"), item.get("description_translation"))
    return " / ".join(part for part in parts if isinstance(part, str))


def _arming_state(item: Mapping[str, Any]) -> bool | None:
    """What an event-102 alarm says: True armed, False disarmed, None when it cannot tell."""
    text = unicodedata.normalize("NFKD", _arming_text(item)[:DESCRIPTION_LIMIT].casefold())
    plain = "".join(char for char in text if not unicodedata.combining(char))
    plain = plain.replace("ß", "ss")
    if DISARMED_WORDS.search(plain):
        return False
    if ARMED_WORDS.search(plain):
        return True
    return None


def _linked_ids(item: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    """Ids another object names under any of `fields`: a list or one value, of ids or of
    objects with an `id`."""
    ids: list[str] = []
    for field in fields:
        value = item.get(field)
        for entry in value if isinstance(value, list) else [value]:
            ident = as_id(entry.get("id") if isinstance(entry, dict) else entry)
            if ident is not None:
                ids.append(str(ident))
    return ids


# ---------------------------------------------------------------------- time zones

# "+1", "-05", "+01:00" and "+0100"; a signed "-300" is a number of minutes.
_SIGNED_OFFSET = re.compile(r"([+-])(\d{1,2})(?::(\d{2}))?|([+-])(\d{2})(\d{2})")
_PLAIN_HHMM = re.compile(r"(\d{2}):?(\d{2})")
MAX_OFFSET = timedelta(hours=14)


def installation_zone(value: Any) -> tzinfo | None:
    """`current_utc_offset` in every form a device may send: "+01:00", "+0100", "+1", "1",
    "UTC+1", hours or minutes (or seconds) as a number, or a zone name ("Europe/Madrid");
    None when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return _numeric_offset(float(value))
        except OverflowError:  # an integer beyond any float: no offset at all
            return None
    if not isinstance(value, str) or len(value) > CURSOR_TEXT_LIMIT:
        return None
    text = value.strip()
    if text.upper() in ("Z", "UTC", "GMT"):
        return UTC
    bare = re.sub(r"^(UTC|GMT)\s*", "", text, flags=re.IGNORECASE)
    if match := _SIGNED_OFFSET.fullmatch(bare):
        sign, hours, minutes = match[1] or match[4], match[2] or match[5], match[3] or match[6]
        return _fixed_offset(sign, int(hours), int(minutes or 0))
    if len(bare) in (4, 5) and (match := _PLAIN_HHMM.fullmatch(bare)):
        return _fixed_offset("+", int(match[1]), int(match[2]))
    try:
        return _numeric_offset(float(bare))
    except ValueError:
        return _zone_name(text)


def _numeric_offset(number: float) -> tzinfo | None:
    """A bare number: hours up to 14, else minutes (up to 14 h of them), else seconds."""
    if not math.isfinite(number):
        return None
    for unit in (3600, 60, 1):
        # Compared as seconds first: a huge number times a timedelta overflows.
        if abs(number * unit) <= MAX_OFFSET.total_seconds():
            return timezone(timedelta(seconds=number * unit))
    return None


def _fixed_offset(sign: str, hours: int, minutes: int) -> tzinfo | None:
    offset = timedelta(hours=hours, minutes=minutes)
    if minutes >= 60 or offset > MAX_OFFSET:
        return None
    return timezone(-offset if sign == "-" else offset)


def _zone_name(name: str) -> tzinfo | None:
    """An IANA zone (its rules, daylight saving included), or None."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*", name):
        return None
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        return None


# ---------------------------------------------------------------------- paging and cursor


def _shifted(text: str, delta: timedelta) -> str | None:
    """A device time moved by `delta`, written as the device wrote it (with its offset, or
    without one: the device then reads it in its own zone, as it wrote it)."""
    try:
        moved = datetime.fromisoformat(text) + delta
    except (ValueError, OverflowError):
        return None
    return moved.isoformat(timespec="milliseconds")


def _same_time(first: str | None, second: str | None, zone: tzinfo | None) -> bool:
    """Whether two device times are one instant, however written (a firmware update may add
    an offset or change "Z" to "+00:00": not a reset)."""
    if first == second:
        return True
    a, b = parse_time(first, zone or UTC), parse_time(second, zone or UTC)
    return a is not None and a == b


def _cursor_text(value: Any) -> str | None:
    """A device value kept in the cursor for a later comparison (small, or not kept)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if len(text) <= CURSOR_TEXT_LIMIT else None


def _add_new(page: list[dict[str, Any]], floor_id: int, found: dict[int, dict[str, Any]]) -> int:
    """Adds the page's alarms above floor_id not seen yet; how many were new."""
    fresh = 0
    for item in page:
        alarm_id = _alarm_id(item)
        if alarm_id is not None and alarm_id > floor_id and alarm_id not in found:
            found[alarm_id] = item
            fresh += 1
    return fresh


class _PageBudget:
    """The pages one poll may still read (MAX_PAGES_PER_POLL): the rest waits in the cursor."""

    def __init__(self) -> None:
        self.left = MAX_PAGES_PER_POLL

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _page_bound(timed: list[tuple[datetime, str]]) -> str | None:
    """`max_date` for the page before this one: its oldest plausible `started`, in the
    device's own notation (offset or none), plus PAGE_OVERLAP. None when no time fits."""
    return _shifted(min(timed)[1], PAGE_OVERLAP) if timed else None


def _filters_text(window: Window) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(window.items()))


def _windows(value: Any) -> tuple[Window, ...]:
    """The cursor's unread windows (our own JSON; anything else in it is dropped)."""
    if not isinstance(value, list):
        return ()
    return tuple(
        {str(key): str(text) for key, text in window.items() if isinstance(text, str)}
        for window in value[:MAX_BACKLOG_WINDOWS]
        if isinstance(window, dict) and as_id(window.get("min_id")) is not None
    )


@dataclass(frozen=True, slots=True)
class _CursorState:
    """The cursor: the newest id taken, the device life it belongs to, that alarm's time and
    camera (a device that starts its ids again shows another one), and a page-capped
    catch-up's remainder."""

    last_id: int
    life: str | None = None
    started: str | None = None
    camera: str | None = None
    backlog: tuple[Window, ...] = ()

    @classmethod
    def read(cls, cursor: Cursor) -> _CursorState:
        life = cursor.get("life")
        return cls(
            last_id=as_id(cursor.get("last_id")) or 0,
            life=life if isinstance(life, str) else None,
            started=_cursor_text(cursor.get("last_started")),
            camera=_cursor_text(cursor.get("last_camera")),
            backlog=_windows(cursor.get("backlog")),
        )

    def as_cursor(self) -> dict[str, Any]:
        cursor: dict[str, Any] = {"last_id": self.last_id}
        if self.life:
            cursor["life"] = self.life
        if self.started is not None:
            cursor["last_started"] = self.started
        if self.camera is not None:
            cursor["last_camera"] = self.camera
        if self.backlog:
            cursor["backlog"] = [dict(window) for window in self.backlog]
        return cursor


def _resource_id(action: Action) -> int:
    resource_id = as_id(action.target)
    if resource_id is None:
        raise InvalidAction(f"target must be a numeric relay or input id, not {action.target!r}")
    return resource_id
