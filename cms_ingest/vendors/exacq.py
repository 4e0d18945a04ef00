"""exacqVision Web Service (API v1). One site is one exacqVision server behind the web service.

How we use it:
- Session: `POST /v1/login.web` (`u`, `p`, `responseVersion=2`, `s` = options.server); the
  session id comes back as `sessionId` (or `sessionID`, as the manual spells it). An expired
  session shows in any of five ways (401, 403, a 302 to login.web, an HTML page, or
  `success: false` about the session): each means one new login and one retry, and the old
  session is logged out. A `success: false` about anything else is the server refusing that
  request (checked with one cheap `config.web`, never a new login). Logout on shutdown.
- Alarms, two sources merged into one alarm per occurrence:
  - the events active *now* (every type unless `event_types` says otherwise): an event that
    appears is one alarm; while it stays listed it is the same event (also across a restart:
    the set of active events is part of the cursor);
  - where the server offers Event Monitoring, the links its profiles triggered in the last 60 s
    (the manual's maximum look-back): an event shorter than a poll, or one that started and
    ended while we could not reach the server, is still one alarm.
  An occurrence seen both ways is one alarm (same event id, or same type, source and start).
- Device lives: a server whose event ids start again (an id we saw with another start or
  camera, or a numeric id below the highest we saw) was reset or replaced: a new life starts,
  and its source_ids carry the life tag, so no new alarm collides with a stored one.
- Media: a JPEG of the recorded frame at the alarm time (never a live frame taken later), and
  an export from `pre_seconds` before to `post_seconds` after the alarm in a format the server
  lists, created once that window has passed, downloaded once its status is `completed`, then
  finished so the server frees it.
- Soft triggers fall back to off about 3 s after the last `on`: a hold re-sends `on` every
  second and ends with `off` (also when the daemon stops mid-hold). `Invalid Request` is a no.

Unknown (nobody public shows them): the paths and item fields of active events, Event
Monitoring, soft triggers and recorded frames. They are assumptions, kept in `ExacqApi` below
so that a correction from the field is a one-line change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import structlog
from pydantic import ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.sitehttp import ResponseTooLarge, TransportError, read_limited
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
    VendorError,
)
from cms_ingest.vendors.common import (
    ID_LIMIT,
    NAME_LIMIT,
    as_id,
    as_int,
    clean_text,
    error_text,
    life_source_id,
    new_life,
    parse_time,
    plausible_time,
    read_json,
)

VENDOR = "exacq"
log = structlog.get_logger("cms_ingest.vendors.exacq")


@dataclass(frozen=True, slots=True)
class ExacqApi:
    """Every path and field name the client relies on. Assumed ones are marked."""

    login: str = "/v1/login.web"
    logout: str = "/v1/logout.web"
    config: str = "/v1/config.web"
    cameras_key: str = "Cameras"
    timezone_key: str = "timezone"  # the manual's List Cameras sample: "timezone": -4 (hours)
    session_keys: tuple[str, ...] = ("sessionId", "sessionID")
    events: str = "/v1/events.web"  # assumed
    events_key: str = "events"  # the manual
    event_id: str = "id"  # assumed, and the event fields below
    event_type: str = "type"
    event_name: str = "name"
    event_source: str = "sourceId"
    event_source_name: str = "sourceName"
    event_start: str = "start"
    event_active: str = "active"
    # Event Monitoring: the manual documents the calls and their answers' outer keys
    # (`profiles`, `triggeredEvents`), not their paths nor the fields of a triggered link.
    monitoring: str = "/v1/eventmonitoring.web"  # assumed; GET lists the profiles
    triggered: str = "/v1/eventmonitoring.web/{profile}/triggered"  # assumed
    profiles_key: str = "profiles"
    triggered_key: str = "triggeredEvents"
    link_event_id: str = "eventId"  # assumed, and the link fields below
    link_event_type: str = "eventType"
    link_source_type: str = "eventSourceType"  # the manual's source-type enumeration, 1-20
    link_source: str = "eventSourceId"
    link_source_name: str = "eventSourceName"
    link_time: str = "time"
    soft_triggers: str = "/v1/softtriggers.web"  # assumed (GET lists, POST sets)
    triggers_key: str = "Triggers"  # assumed
    recorded_frame: str = "/v1/frame.web"  # assumed path of "Retrieve Single Recorded Frame"
    live_frame: str = "/v1/video.web"  # the legacy query form: s, camera, format
    export: str = "/v1/export.web"
    export_formats_key: str = "formats"
    export_completed: str = "completed"  # the manual: downloadable once its status is this
    jpeg_format: str = "6"  # transcoded JPEG


API = ExacqApi()

EVENT_NAMES: Mapping[int, str] = {
    1: "Video motion", 2: "Video loss", 3: "Input trigger active", 4: "Serial keyword match",
    5: "Serial rule match", 6: "Button input active", 7: "Device failure",
    8: "Device temperature alarm", 9: "Device fan alarm", 10: "Device PSU alarm",
    11: "Storage alarm", 12: "License expired", 13: "Video throttling",
    14: "System voltage alarm", 15: "System temperature alarm", 16: "System fan alarm",
    17: "Archive connection alarm", 18: "Archive task alarm", 19: "Stored content old",
    20: "Archived content old", 21: "Device disconnected", 22: "Soft trigger active",
    23: "Time trigger active", 24: "Analytic rule triggered", 25: "Outbound connection failure",
    26: "Security integration connection failure", 27: "Security integration alert",
    28: "Security integration alarm", 29: "Serial port connection error",
}  # fmt: skip
EVENT_TYPES: Mapping[int, EventType] = {
    1: EventType.MOTION,
    2: EventType.VIDEO_LOSS,
    3: EventType.INPUT,
    6: EventType.INPUT,
    22: EventType.INPUT,
    24: EventType.ANALYTICS,
    21: EventType.CAMERA_OFFLINE,
    27: EventType.INTRUSION,
    28: EventType.INTRUSION,
}  # every other type: system
# A triggered link names its source type (Event Monitoring's own enumeration, 1-20); where one
# event type (1-29) matches it, the link counts as that type. The others stay `system`, with
# `vendor_event` "monitor:<source type>".
SOURCE_TYPE_EVENTS: Mapping[int, int] = {
    1: 22, 2: 23, 3: 3, 4: 2, 5: 1, 6: 21, 7: 4, 8: 5, 10: 6, 11: 24, 15: 25, 19: 29,
}  # fmt: skip
INVENTORY_TTL_S = 3600.0
HOLD_RESEND_S = 1.0  # a soft trigger drops to off ~3 s after the last `on`
LOOK_BACK_S = 60  # the manual: triggered links are kept at most 60 s
LINK_OVERLAP_S = 5  # links asked for beyond the last read: its answer's time, clock steps
SAME_START_S = 2.0  # one occurrence seen as an active event and as a link: starts this close
# A link whose event id we saw with a start this close is still that occurrence (its time may
# be when it fired, not when the event started); further apart, the id was used again.
REUSED_ID_S = float(LOOK_BACK_S)
SEEN_KEEP_S = 3 * LOOK_BACK_S  # occurrences remembered (device time) to match links with
SEEN_LIMIT = 500  # and at most this many: the cursor stays small
MAX_PROFILES = 8  # profiles read per poll (each one request)
MAX_CARRIED = 5000  # alarms kept for re-delivery while commits fail
TEXT_LIMIT = 4096  # a text/plain answer (`Invalid Request`) is short
LIFE_FORMAT = "%Y%m%dT%H%M%SZ"  # new_life's tag, read back to keep tags increasing
SESSION_WORDS = ("session", "expired", "login", "logged", "auth")
PREFERRED_EXPORT_FORMAT = "mp4"


class ExacqOptions(SiteOptions):
    """`options:` of an exacqVision site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: int = Field(default=0, ge=0)  # the `s` of login: which server behind the service
    # None: every type (the contract maps them all); a list filters on the server.
    event_types: list[int] | None = None
    # What an event `id` names: one occurrence (the default) or the event definition, shared
    # by its repeats. With "definition" a repeated id is a new occurrence, not a device reset.
    event_id_scope: str = Field(default="occurrence", pattern="^(occurrence|definition)$")
    # Event Monitoring profiles whose triggered links are read (None: every profile listed).
    monitoring_profiles: list[str] | None = None
    pre_seconds: float = Field(default=10.0, ge=0)
    post_seconds: float = Field(default=20.0, ge=0)
    # None: mp4 when the server lists it, else the server's first format.
    export_format: str | None = None


class PlainText(str):
    """A text/plain answer (the manual's `Invalid Request`)."""


_Delivered = tuple[str, "Occurrence", Alarm]  # source_id, what it was seen as, its alarm


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One event occurrence as either source shows it."""

    key: str  # source_id before the life tag (cleaned: it is stored and kept in the cursor)
    vendor_id: str | None
    event_type: int | None
    vendor_event: str
    source: str | None
    start: datetime | None  # None when the device's time is unreadable or implausible
    item: Mapping[str, Any]


def event_key(item: Mapping[str, Any]) -> str | None:
    """An active event's identity: its id, else type, source and start."""
    vendor_id = _vendor_id(item.get(API.event_id))
    if vendor_id is not None:
        return vendor_id
    if item.get(API.event_type) is None or item.get(API.event_start) is None:
        return None
    raw = f"{item[API.event_type]}:{item.get(API.event_source)}:{item[API.event_start]}"
    return clean_text(raw, ID_LIMIT)


def _vendor_id(value: Any) -> str | None:
    """An event id as text: a string or an integer (anything else is no id)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return clean_text(value.strip(), ID_LIMIT)
    return None


def _zone(name: str) -> tzinfo | None:
    """An IANA zone by name, or None (also for names that are paths or empty)."""
    if not name or len(name) > 64:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _odd_id(value: Any) -> bool:
    """An id that is there but unusable (a float, an object, NaN read as null is absent)."""
    return value is not None and value != "" and _vendor_id(value) is None


def _names_by_id(items: list[Any]) -> dict[str, str]:
    """id -> name of a config.web camera or soft-trigger list (the id when it has no name);
    items without a usable id are skipped."""
    return {
        clean_text(str(item["id"]), ID_LIMIT): clean_text(
            str(item.get("name") or item["id"]), NAME_LIMIT
        )
        for item in items
        if isinstance(item, dict) and _vendor_id(item.get("id")) is not None
    }


def _epoch(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


class ExacqClient:
    vendor = VENDOR
    # A held trigger cut short by a crash would be re-held in full if retried: never repeated.
    actions: Mapping[str, ActionSpec] = {"soft_trigger": ActionSpec(idempotent=False)}

    def __init__(
        self,
        context: VendorContext,
        options: ExacqOptions,
    ) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._username = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._session: str | None = None
        self._stale_sessions: list[str] = []  # replaced sessions, logged out after a login
        self._login_lock = asyncio.Lock()
        self._cameras: dict[str, str] = {}
        self._triggers: dict[str, str] = {}
        self._profiles: list[str] = []  # Event Monitoring profiles to read ([]: not offered)
        self._links_read_at: dict[str, float] = {}  # profile -> monotonic time of a good read
        self._inventory_at: float | None = None
        self._config_tz: tzinfo | None = None  # config.web's `timezone`
        self._server_tz: timezone = UTC
        self._export_format: str | None = None
        self._exports: dict[str, str] = {}  # media key -> export id on the server
        # What the last poll returned: re-delivered when its commit did not land.
        self._returned: Cursor | None = None
        self._returned_alarms: list[_Delivered] = []

    # ------------------------------------------------------------------ session

    async def _session_id(self) -> str:
        if self._session is not None:
            return self._session
        async with self._login_lock:
            if self._session is None:
                await self._login()
                await self._logout_stale()
            assert self._session is not None
            return self._session

    async def _login(self) -> None:
        form = {
            "u": self._username,
            "p": self._password,
            "responseVersion": "2",
            "s": str(self._options.server),
        }
        async with self._http.request("POST", API.login, data=form) as response:
            status = response.status
            payload = await read_json(response, self._problems, f"POST {API.login}")
        session = None
        if isinstance(payload, dict) and payload.get("success") is not False:
            session = next((payload[k] for k in API.session_keys if payload.get(k)), None)
        if status != 200 or not session:
            raise AuthenticationFailed(f"login refused (HTTP {status}): {error_text(payload)}")
        self._session = clean_text(str(session), ID_LIMIT)

    def _expire(self, session: str) -> None:
        if self._session == session:
            self._session = None
            self._stale_sessions.append(session)

    async def _logout_stale(self) -> None:
        """Log out the sessions a new login replaced: the server keeps each one alive until
        its own timeout otherwise, and a server allows only so many."""
        stale, self._stale_sessions = self._stale_sessions[-4:], []
        for session in stale:
            await self._logout(session)

    async def _logout(self, session: str) -> None:
        try:
            async with self._http.request("POST", API.logout, params={"s": session}):
                pass
        except Exception as exc:  # also when shutting down: it only costs the server a session
            log.info("exacq_logout_failed", site_id=self.site_id, error=str(exc))

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | list[tuple[str, str]] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """A request with the session; an expired session means one login and one retry."""
        for attempt in (1, 2):
            session = await self._session_id()
            query = [("s", session), *_pairs(params)]
            data = {**form, "s": session} if form is not None else None
            async with self._http.request(method, path, params=query, data=data) as response:
                status = response.status
                expired, payload = await self._answer(response, f"{method} {path}")
            if expired is None:  # `success: false` about something else: is the session alive?
                expired = path != API.config and not await self._session_alive(session)
            if not expired:
                return status, payload
            self._expire(session)
            if attempt == 2:
                raise AuthenticationFailed(
                    f"{path}: session refused after a new login (HTTP {status})"
                )
        raise AssertionError("unreachable")

    async def _session_alive(self, session: str) -> bool:
        """Whether the server still takes `session` (one config.web read)."""
        query = [("s", session), ("output", "json")]
        async with self._http.request("GET", API.config, params=query) as response:
            expired, _ = await self._answer(response, f"GET {API.config}")
        return expired is False

    async def _answer(
        self, response: aiohttp.ClientResponse, where: str
    ) -> tuple[bool | None, Any]:
        """(whether the answer says our session expired, its body) with the body read once:
        JSON parsed, text/plain as PlainText. None for "maybe": a `success: false` that does
        not name the session (a refusal of this request, or an expiry said in other words).

        The five faces of an expired session (field notes): 401, 403, a redirect to login.web,
        an HTML page with 200, and `success: false` in a 200 JSON answer.
        """
        status, headers = response.status, response.headers
        if status in (401, 403):
            return True, None
        if status in (301, 302, 303, 307) and "login" in headers.get("Location", "").lower():
            return True, None
        if status == 200 and "text/html" in headers.get("Content-Type", ""):
            return True, None  # the login page, not an answer: nothing to read
        if response.content_type == "text/plain":
            return False, await self._plain_text(response, where)
        payload = await read_json(response, self._problems, where)
        if not (status == 200 and isinstance(payload, dict) and payload.get("success") is False):
            return False, payload
        reason = error_text(payload).lower()
        return (True if any(word in reason for word in SESSION_WORDS) else None), payload

    async def _plain_text(self, response: aiohttp.ClientResponse, where: str) -> PlainText:
        try:
            body = await read_limited(response, TEXT_LIMIT)
        except ResponseTooLarge:
            self._problems.bad_input("oversized_answer", f"{where}: text over {TEXT_LIMIT} B")
            raise BadDeviceResponse(f"{where}: text answer over {TEXT_LIMIT} bytes") from None
        return PlainText(clean_text(body.decode("utf-8", "replace").strip(), NAME_LIMIT))

    # ------------------------------------------------------------------ inventory

    async def _refresh_inventory(self, force: bool = False) -> None:
        now = time.monotonic()
        if (
            not force
            and self._inventory_at is not None
            and now - self._inventory_at < INVENTORY_TTL_S
        ):
            return
        self._inventory_at = now
        status, config = await self._call("GET", API.config, {"output": "json"})
        cameras = config.get(API.cameras_key) if isinstance(config, dict) else None
        if status == 200 and isinstance(cameras, list):
            self._cameras = _names_by_id(cameras)
        else:
            self._problems.bad_input("cameras", f"camera list unreadable (HTTP {status})")
        if isinstance(config, dict):
            self._config_tz = self._timezone(config.get(API.timezone_key))
        status, listing = await self._call("GET", API.soft_triggers)
        triggers = listing.get(API.triggers_key) if isinstance(listing, dict) else None
        if status == 200 and isinstance(triggers, list):
            self._triggers = _names_by_id(triggers)
        self._profiles = await self._monitoring_profiles()

    def _timezone(self, value: Any) -> tzinfo | None:
        """config.web's `timezone`: hours east of UTC (the manual shows -4); a "-05:00" text
        or a zone name ("America/New_York") is read too. Anything else is reported once and
        times without an offset stay UTC."""
        if value is None:
            return None
        hours = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if hours is not None and -14 <= hours <= 14:
            return timezone(timedelta(hours=hours))
        if isinstance(value, str):
            try:
                offset = datetime.fromisoformat(f"2000-01-01T00:00:00{value.strip()}").utcoffset()
            except ValueError:
                offset = None
            if offset is not None:
                return timezone(offset)
            zone = _zone(value.strip())
            if zone is not None:
                return zone
        self._problems.bad_input(
            "timezone",
            f"config.web timezone {value!r:.50} is not hours; times without an "
            "offset are read as UTC",
        )
        return None

    async def _monitoring_profiles(self) -> list[str]:
        """The Event Monitoring profiles to read triggered links of ([]: none offered)."""
        try:
            status, payload = await self._call("GET", API.monitoring)
        except VendorError as exc:  # e.g. a server that answers unknown paths with its login page
            self._problems.bad_input("monitoring_profiles", f"profile list refused: {exc}")
            return []
        listed = payload.get(API.profiles_key) if isinstance(payload, dict) else None
        if status == 404 or (status == 200 and listed is None and payload is None):
            return []  # this server offers no Event Monitoring: active events only
        if status != 200 or not isinstance(listed, list):
            self._problems.bad_input(
                "monitoring_profiles", f"profile list unreadable (HTTP {status})"
            )
            return []
        names = [
            clean_text(str(p["name"]), NAME_LIMIT)
            for p in listed
            if isinstance(p, dict) and isinstance(p.get("name"), str) and p["name"]
        ]
        wanted = self._options.monitoring_profiles
        if wanted is not None:
            missing = sorted(set(wanted) - set(names))
            if missing:
                self._problems.bad_input(
                    "monitoring_profiles", f"profiles {missing} not on the server"
                )
            names = [name for name in names if name in wanted]
        if len(names) > MAX_PROFILES:
            self._problems.bad_input(
                "monitoring_profiles",
                f"{len(names)} profiles; reading the first {MAX_PROFILES} (set "
                "options.monitoring_profiles)",
            )
        return names[:MAX_PROFILES]

    def _default_tz(self) -> tzinfo:
        """Where a time without an offset is: the server's configured zone, else the offset
        its own times carried, else UTC."""
        return self._config_tz or self._server_tz

    # ------------------------------------------------------------------ alarms

    async def poll(self, cursor: Cursor | None) -> PollResult:
        await self._refresh_inventory()
        carried = self._uncommitted(cursor)
        listed = await self._active_occurrences()
        linked = await self._linked_occurrences()
        state = _State.load(cursor)
        if self._options.event_id_scope == "occurrence":
            reason = state.reset_reason(listed, linked)
            if reason is not None:
                self._problems.device_reset(reason)
                state = state.new_life(_next_life(state.life))
        for source_id, occurrence, _ in carried:  # remembered as if their commit had landed
            state.remember(source_id, occurrence)
        fresh, active = self._new_alarms(state, listed, linked)
        delivered = _merge(carried, fresh)
        new_cursor = state.dump(active)
        self._returned, self._returned_alarms = new_cursor, delivered[-MAX_CARRIED:]
        return PollResult(alarms=[alarm for _, _, alarm in delivered], cursor=new_cursor)

    def _uncommitted(self, cursor: Cursor | None) -> list[_Delivered]:
        """The alarms of the last poll when its cursor did not come back (its commit failed):
        an event that ended meanwhile is no longer listed, and would be lost."""
        if self._returned is None or cursor == self._returned:
            return []
        return self._returned_alarms

    async def _active_occurrences(self) -> list[Occurrence]:
        types = self._options.event_types
        params = [("filter", str(t)) for t in types] if types else None
        status, payload = await self._call("GET", API.events, params)
        items = payload.get(API.events_key) if isinstance(payload, dict) else None
        if status != 200 or not isinstance(items, list):
            raise BadDeviceResponse(f"GET {API.events} answered {status}: {error_text(payload)}")
        found = []
        for item in items:
            if isinstance(item, dict) and _odd_id(item.get(API.event_id)):
                self._problems.bad_input(
                    "event_id",
                    f"event id {item[API.event_id]!r:.100} is neither text nor an "
                    "integer; the event is identified by type, source and start",
                )
            key = event_key(item) if isinstance(item, dict) else None
            if key is None or not isinstance(item, dict):
                self._problems.bad_input("event", f"event without id, type or start: {item!r:.200}")
                continue
            if item.get(API.event_active) is False:
                continue
            found.append(self._occurrence(key, item))
        return found

    def _occurrence(self, key: str, item: Mapping[str, Any]) -> Occurrence:
        event_type = as_int(item.get(API.event_type))
        if event_type is None:
            self._problems.bad_input(
                "event_type",
                f"event type unreadable, taken as system: {item.get(API.event_type)!r:.100}",
            )
        vendor_id = _vendor_id(item.get(API.event_id))
        start = self._device_time(item.get(API.event_start), "event_start")
        if vendor_id is not None:
            key = self._id_key(vendor_id, start, item.get(API.event_start))
        return Occurrence(
            key=key,
            vendor_id=vendor_id,
            event_type=event_type,
            vendor_event="" if event_type is None else str(event_type),
            source=_vendor_id(item.get(API.event_source)),
            start=start,
            item=item,
        )

    def _id_key(self, vendor_id: str, start: datetime | None, raw_start: Any) -> str:
        """The key of an occurrence with an event id: the id, or with ids that name the event
        definition, the id and the start (its repeats differ only by their start)."""
        if self._options.event_id_scope == "occurrence":
            return vendor_id
        when = start.isoformat() if start is not None else str(raw_start)
        return clean_text(f"{vendor_id}/{when}", ID_LIMIT)

    async def _linked_occurrences(self) -> list[Occurrence]:
        """Links the Event Monitoring profiles triggered since their last good read (plus a
        margin), at most 60 s back (the manual's limit)."""
        found: list[Occurrence] = []
        for profile in self._profiles:
            path = API.triggered.format(profile=quote(profile, safe=""))
            asked_at = time.monotonic()
            try:
                status, payload = await self._call(
                    "GET", path, {"duration": self._look_back(profile)}
                )
            except VendorError as exc:  # the active events still count; the next poll looks
                self._problems.bad_input("triggered_links", f"{path}: {exc}")  # back 60 s
                continue
            items = payload.get(API.triggered_key) if isinstance(payload, dict) else None
            if status == 404:
                self._inventory_at = None  # the profile is gone: list the profiles again
                continue
            if status != 200 or not isinstance(items, list):
                self._problems.bad_input(
                    "triggered_links", f"{path} answered {status}: {error_text(payload)}"
                )
                continue
            found.extend(self._link_occurrences(items))
            self._links_read_at[profile] = asked_at
        return found

    def _look_back(self, profile: str) -> int:
        """Seconds of links to ask for: since the last good read and a margin, at most 60 (a
        first read, or one after failures, takes all the server keeps)."""
        last = self._links_read_at.get(profile)
        if last is None:
            return LOOK_BACK_S
        return min(LOOK_BACK_S, math.ceil(time.monotonic() - last) + LINK_OVERLAP_S)

    def _link_occurrences(self, items: Iterable[Any]) -> list[Occurrence]:
        wanted = self._options.event_types
        found = []
        for item in items:
            occurrence = self._link(item) if isinstance(item, dict) else None
            if occurrence is None:
                self._problems.bad_input("triggered_link", f"unreadable link: {item!r:.200}")
                continue
            if wanted and occurrence.event_type not in wanted:
                continue
            found.append(occurrence)
        return found

    def _link(self, item: Mapping[str, Any]) -> Occurrence | None:
        source_type = as_int(item.get(API.link_source_type))
        event_type = as_int(item.get(API.link_event_type))
        if event_type is None and source_type is not None:
            event_type = SOURCE_TYPE_EVENTS.get(source_type)
        raw_time = item.get(API.link_time)
        start = self._device_time(raw_time, "link_time")
        if start is None or (event_type is None and source_type is None):
            return None
        vendor_id = _vendor_id(item.get(API.link_event_id))
        if vendor_id is not None:
            key = self._id_key(vendor_id, start, raw_time)  # as the active event it is
        else:
            key = clean_text(
                f"link:{event_type or source_type}:{item.get(API.link_source)}:{start.isoformat()}",
                ID_LIMIT,
            )
        return Occurrence(
            key=key,
            vendor_id=vendor_id,
            event_type=event_type,
            vendor_event=str(event_type) if event_type is not None else f"monitor:{source_type}",
            source=_vendor_id(item.get(API.link_source)),
            start=start,
            item={
                **item,
                API.event_source_name: item.get(API.link_source_name),
            },
        )

    def _new_alarms(
        self, state: _State, listed: list[Occurrence], linked: list[Occurrence]
    ) -> tuple[list[_Delivered], list[str]]:
        """Alarms for occurrences not seen before (an active event in the cursor's active set, or
        any occurrence matching a remembered one), and the active set after this poll."""
        alarms: list[_Delivered] = []
        active = [life_source_id(occurrence.key, state.life) for occurrence in listed]
        for occurrence in [*listed, *linked]:
            source_id = life_source_id(occurrence.key, state.life)
            if state.known(source_id, occurrence):
                continue
            state.remember(source_id, occurrence)
            alarms.append((source_id, occurrence, self._alarm(source_id, occurrence)))
        return alarms, active

    def _alarm(self, source_id: str, occurrence: Occurrence) -> Alarm:
        item = occurrence.item
        event_type = occurrence.event_type
        camera_id = occurrence.source
        occurred = occurrence.start or datetime.now(UTC)
        name = item.get(API.event_name) or EVENT_NAMES.get(event_type or 0, "event")
        source_name = item.get(API.event_source_name) or self._cameras.get(camera_id or "")
        has_camera = camera_id is not None and camera_id in self._cameras
        media_locator = {"camera": camera_id, "time": occurred.isoformat(), "key": source_id}
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=source_id,
            event_type=EVENT_TYPES.get(event_type or 0, EventType.SYSTEM),
            vendor_event=occurrence.vendor_event,
            description=f"{name} on {source_name}" if source_name else str(name),
            occurred_at=occurred,
            camera_id=camera_id,
            camera_name=self._cameras.get(camera_id or "")
            or (str(source_name) if source_name else None),
            raw=dict(item),
            media=(
                MediaRequest(MediaKind.SNAPSHOT, media_locator, available=has_camera),
                MediaRequest(MediaKind.VIDEO, media_locator, available=has_camera),
            ),
        )

    def _device_time(self, value: Any, what: str) -> datetime | None:
        """A device time in UTC; None (reported once) when unreadable or outside 2000..now+1d:
        such a time never becomes an alarm time, a cursor entry or an export window."""
        occurred = parse_time(value, self._default_tz())
        if occurred is None or not plausible_time(occurred):
            self._problems.bad_input(
                what, f"time {value!r:.100} is not a plausible RFC 3339 time; using now"
            )
            return None
        offset = datetime.fromisoformat(value).utcoffset()  # parse_time read it: no error
        if offset is not None:
            self._server_tz = timezone(offset)  # exports are asked for in the server's offset
        return occurred

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        camera, when = locator.get("camera"), parse_time(locator.get("time"))
        if camera is None or when is None:
            return MediaProbe("unavailable", detail="the event has no camera")
        if not plausible_time(when):
            return MediaProbe("unavailable", detail=f"the event time {when} is not plausible")
        if kind is MediaKind.SNAPSHOT:
            live = "live" if locator.get("live") is True else "frame"
            return MediaProbe("ready", path=f"{live}|{camera}|{when.isoformat()}")
        probe = await self._export_status(str(camera), when, str(locator.get("key")), locator)
        export_id = self._exports.get(str(locator.get("key")))
        if probe.state == "pending" and export_id != locator.get("export_id"):
            # Kept in the media row: a retry after a restart (or on another daemon) asks for
            # this export again instead of making a second one on the server.
            probe = dataclasses.replace(probe, remember={"export_id": export_id})
        return probe

    async def _export_status(
        self, camera: str, when: datetime, key: str, locator: Mapping[str, Any]
    ) -> MediaProbe:
        start = when - timedelta(seconds=self._options.pre_seconds)
        end = when + timedelta(seconds=self._options.post_seconds)
        if datetime.now(UTC) < end + timedelta(seconds=1):
            return MediaProbe("pending", detail="the export window has not passed yet")
        export_id = self._exports.get(key) or _vendor_id(locator.get("export_id"))
        if export_id is None:
            export_id = await self._create_export(camera, start, end)
        self._exports[key] = export_id
        status, payload = await self._call("GET", API.export, {"export": export_id})
        refused = isinstance(payload, dict) and payload.get("success") is False
        if status == 404 or refused:
            # The server forgot it (a restart, its 15-minute cleanup): the one case for a new
            # export; any other answer keeps this one, so a retry never makes a second.
            del self._exports[key]
            return MediaProbe("pending", detail="export gone on the server; creating it again")
        if status != 200 or not isinstance(payload, dict):
            raise BadDeviceResponse(f"export status answered {status}: {error_text(payload)}")
        return self._export_progress(payload, export_id, key)

    def _export_progress(self, payload: Mapping[str, Any], export_id: str, key: str) -> MediaProbe:
        """Ready at status `completed` (the manual); progress alone is only a detail. A server
        that sends no status at all is reported once and trusted at 100 %."""
        progress = as_int(payload.get("progress"))
        status = payload.get("status")
        if isinstance(status, str):
            if status.strip().lower() == API.export_completed:
                return MediaProbe("ready", path=f"export|{export_id}|{key}")
            return MediaProbe("pending", detail=f"export {clean_text(status, 100)} ({progress}%)")
        self._problems.bad_input(
            "export_status", f"export status without `status`: {payload!r:.200}"
        )
        if progress is None:
            raise BadDeviceResponse("export status has neither status nor progress")
        if progress < 100:
            return MediaProbe("pending", detail=f"export at {progress}%")
        return MediaProbe("ready", path=f"export|{export_id}|{key}")

    async def _create_export(self, camera: str, start: datetime, end: datetime) -> str:
        tz = self._default_tz()
        params = {
            "camera": camera,
            "start": start.astimezone(tz).isoformat(timespec="seconds"),
            "end": end.astimezone(tz).isoformat(timespec="seconds"),
            "format": await self._chosen_export_format(),
        }
        status, payload = await self._call("GET", API.export, params)
        export_id = _vendor_id(payload.get("export")) if isinstance(payload, dict) else None
        if status != 200 or not export_id:
            raise BadDeviceResponse(f"export refused ({status}): {error_text(payload)}")
        return export_id

    async def _chosen_export_format(self) -> str:
        if self._export_format is None:
            self._export_format = self._choose_format(await self.export_formats())
        return self._export_format

    async def export_formats(self) -> list[str]:
        """The formats the server lists (export.web without parameters)."""
        status, payload = await self._call("GET", API.export)
        listed = payload.get(API.export_formats_key) if isinstance(payload, dict) else None
        if status != 200 or not isinstance(listed, list):
            raise BadDeviceResponse(f"export formats unreadable (HTTP {status})")
        return [clean_text(f, NAME_LIMIT) for f in listed if isinstance(f, str) and f]

    def _choose_format(self, offered: list[str]) -> str:
        """The configured format if offered, else mp4 if offered, else the server's first."""
        wanted = self._options.export_format
        if not offered:
            raise BadDeviceResponse("the server lists no export format")
        if wanted is not None and wanted not in offered:
            self._problems.bad_input(
                "export_format", f"export_format {wanted!r} not offered (the server has {offered})"
            )
        for choice in (wanted, PREFERRED_EXPORT_FORMAT):
            if choice in offered:
                return choice
        return offered[0]

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        kind, first, second = path.split("|", 2)
        session = await self._session_id()
        if kind in ("frame", "live"):
            async with self._frame(session, first, second, live=kind == "live") as download:
                yield download
            return
        params = [("s", session), ("export", first), ("action", "download")]
        async with self._http.request(
            "GET", API.export, params=params, timeout_s=600.0, read_timeout_s=60.0
        ) as response:
            if response.status != 200 or response.content_type in ("text/html", "application/json"):
                expired, _ = await self._answer(response, f"GET {API.export} download")
                if expired:
                    self._expire(session)
                raise MediaNotReady(f"export download answered {response.status}")
            yield Download(
                response.content_type,
                response.content_length,
                response.content.iter_chunked(256 * 1024),
            )
        await self._finish_export(first, second)

    @asynccontextmanager
    async def _frame(
        self, session: str, camera: str, when: str, *, live: bool
    ) -> AsyncIterator[Download]:
        """The recorded frame at the alarm time. A live frame would show the scene at the
        time of the fetch, not of the alarm: only the probe (`live`) asks for one."""
        if live:
            path = API.live_frame
            params = [("s", session), ("camera", camera), ("format", API.jpeg_format)]
        else:
            path = API.recorded_frame
            params = [
                ("s", session),
                ("camera", camera),
                ("time", when),
                ("format", API.jpeg_format),
            ]
        async with self._http.request("GET", path, params=params) as response:
            if response.status == 200 and response.content_type.startswith("image/"):
                yield Download(
                    response.content_type,
                    response.content_length,
                    response.content.iter_chunked(65536),
                )
                return
            expired, _ = await self._answer(response, f"GET {path}")
            if expired:
                self._expire(session)
                raise MediaNotReady("session expired while fetching a frame; logging in again")
        raise MediaNotReady(
            f"no recorded frame of camera {camera} at {when} (HTTP {response.status})"
        )

    async def _finish_export(self, export_id: str, key: str) -> None:
        self._exports.pop(key, None)
        try:
            await self._call("GET", API.export, {"export": export_id, "action": "finish"})
        except (VendorError, TransportError) as exc:  # it is freed after 15 minutes anyway
            log.info("exacq_export_finish_failed", site_id=self.site_id, error=str(exc))

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        if action.kind != "soft_trigger":
            raise InvalidAction(f"exacq has no action {action.kind!r} (it has: soft_trigger)")
        trigger = action.target.strip()
        if as_id(trigger) is None:
            raise InvalidAction(f"target must be a numeric soft trigger id, not {action.target!r}")
        duration = action.params.get("duration_s", 10)
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise InvalidAction(f"params.duration_s must be a positive number, not {duration!r}")
        return await self._hold(trigger, float(duration))

    async def _hold(self, trigger: str, duration: float) -> ActionResult:
        """`on` now and every second (never a gap the server would see as off), then `off`."""
        await self._set_trigger(trigger, "on")  # a refusal here fails the action untouched
        sent = 1
        deadline = time.monotonic() + duration
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(HOLD_RESEND_S, remaining))
                if deadline - time.monotonic() > 0:
                    await self._set_trigger(trigger, "on")
                    sent += 1
        finally:
            # Also when cancelled (the daemon stopping mid-hold): never leave it on.
            await asyncio.shield(self._set_trigger(trigger, "off"))
        return ActionResult(result={"trigger": trigger, "on_sent": sent, "held_s": duration})

    async def _set_trigger(self, trigger: str, state: str) -> None:
        status, payload = await self._call(
            "POST", API.soft_triggers, form={"tid": trigger, "state": state}
        )
        # The manual's only answer to a set is text/plain `Invalid Request`, status unstated:
        # with a 200 it is as much a refusal as with a 4xx.
        refused = isinstance(payload, PlainText) and "invalid request" in payload.lower()
        if refused or 400 <= status < 500:
            detail = payload if isinstance(payload, PlainText) else error_text(payload)
            raise DeviceRefused(f"soft trigger {trigger} {state} refused ({status}): {detail}")
        if status >= 500:
            raise BadDeviceResponse(f"soft trigger {trigger} {state} answered {status}")

    # ------------------------------------------------------------------ probe

    async def describe(self) -> dict[str, Any]:
        await self._refresh_inventory(force=True)
        return {
            "cameras": dict(self._cameras),
            "soft triggers": dict(self._triggers),
            "event monitoring profiles": list(self._profiles) or "none offered",
        }

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        return {
            "server time zone": self._probe_timezone,
            "export formats": self._probe_export_formats,
            "event monitoring (short events)": self._probe_monitoring,
        }

    async def _probe_timezone(self) -> str:
        await self._refresh_inventory(force=True)
        if self._config_tz is None:
            return "config.web gives no usable `timezone`: times without an offset are read as UTC"
        return f"server time zone {self._config_tz}: used where times carry no offset"

    async def _probe_export_formats(self) -> str:
        offered = await self.export_formats()
        chosen = self._choose_format(offered)
        return f"the server offers {', '.join(offered)}; exports are made as {chosen}"

    async def _probe_monitoring(self) -> str:
        await self._refresh_inventory(force=True)
        if not self._profiles:
            return (
                "no Event Monitoring profile: only events still active at a poll are seen "
                "(an event shorter than a poll can be missed); add a profile on the server"
            )
        return f"triggered links read from {', '.join(self._profiles)} (60 s look-back)"

    async def recent_alarms(self, count: int) -> list[Alarm]:
        await self._refresh_inventory()
        now = datetime.now(UTC).isoformat()
        return [
            Alarm(
                site_id=self.site_id,
                vendor=VENDOR,
                source_id=f"probe:{cam}",
                event_type=EventType.OTHER,
                vendor_event="",
                description="probe frame",
                occurred_at=datetime.now(UTC),
                camera_id=cam,
                media=(
                    MediaRequest(
                        MediaKind.SNAPSHOT, {"camera": cam, "time": now, "key": cam, "live": True}
                    ),
                ),
            )
            for cam in list(self._cameras)[:count]
        ]

    async def close(self) -> None:
        """Log out, so the server frees the session at once."""
        if self._session is not None:
            session, self._session = self._session, None
            await self._logout(session)


# ---------------------------------------------------------------------- cursor state

_Seen = tuple[str | None, str | None, int | None, float | None]  # vendor id, camera, type, start


@dataclass(slots=True)
class _State:
    """The cursor, bounded: the source_ids active at the last poll, the occurrences seen in
    the last few minutes (to tell a link from an event already stored, and a reused id from
    a new one), the highest numeric id seen, and the device life."""

    active: set[str]
    seen: dict[str, _Seen]  # source_id -> what it was seen as
    max_id: int | None
    life: str | None

    @classmethod
    def load(cls, cursor: Cursor | None) -> _State:
        cursor = cursor or {}
        active = cursor.get("active")
        seen: dict[str, _Seen] = {}
        raw_seen = cursor.get("seen")
        for entry in raw_seen if isinstance(raw_seen, list) else []:
            if isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str):
                vendor_id, camera, kind, start = entry[1:]
                seen[entry[0]] = (
                    vendor_id if isinstance(vendor_id, str) else None,
                    camera if isinstance(camera, str) else None,
                    as_int(kind),
                    float(start) if isinstance(start, int | float) else None,
                )
        life = cursor.get("life")
        return cls(
            active={k for k in active if isinstance(k, str)} if isinstance(active, list) else set(),
            seen=seen,
            max_id=as_id(cursor.get("max_id")),
            life=life if isinstance(life, str) and life else None,
        )

    def new_life(self, life: str) -> _State:
        return _State(active=set(), seen={}, max_id=None, life=life)

    def reset_reason(self, listed: list[Occurrence], linked: list[Occurrence]) -> str | None:
        """Why the events show that the server's ids started again, or None: a new event
        whose id we saw with another camera or start, or whose numeric id is below the highest
        we saw (occurrence ids only grow). A link's time may be when it fired rather than the
        event's start: for links, starts up to REUSED_ID_S apart are the same occurrence."""
        by_id = {entry[0]: entry for entry in self.seen.values() if entry[0] is not None}
        tolerances = [(o, SAME_START_S) for o in listed] + [(o, REUSED_ID_S) for o in linked]
        for occurrence, within_s in tolerances:
            if occurrence.vendor_id is None:
                continue
            if life_source_id(occurrence.key, self.life) in self.active:
                continue  # still the same event
            before = by_id.get(occurrence.vendor_id)
            if before is not None and _id_reused(before, occurrence, within_s):
                return (
                    f"event id {occurrence.vendor_id} seen before on camera {before[1]} at "
                    f"{before[3]}, now on camera {occurrence.source} at {occurrence.start}"
                )
            number = as_id(occurrence.vendor_id)
            if before is None and number is not None and number < (self.max_id or 0):
                return f"new event id {number} below the highest seen, {self.max_id}"
        return None

    def known(self, source_id: str, occurrence: Occurrence) -> bool:
        """Seen under this source_id, or (where one side has no event id to compare) the
        same camera, type and start as an occurrence seen the other way."""
        if source_id in self.active or source_id in self.seen:
            return True
        return any(
            _same_occurrence(entry, occurrence)
            for entry in self.seen.values()
            if entry[0] is None or occurrence.vendor_id is None
        )

    def remember(self, source_id: str, occurrence: Occurrence) -> None:
        self.seen[source_id] = (
            occurrence.vendor_id,
            occurrence.source,
            occurrence.event_type,
            _epoch(occurrence.start),
        )
        number = as_id(occurrence.vendor_id)
        if number is not None:
            self.max_id = max(number, self.max_id or 0)

    def dump(self, active: list[str]) -> dict[str, Any]:
        still_active = set(active)
        cursor: dict[str, Any] = {"active": sorted(still_active)}
        starts = [entry[3] for entry in self.seen.values() if entry[3] is not None]
        horizon = max(starts) - SEEN_KEEP_S if starts else None  # device time, not ours
        kept = [
            [key, *entry]
            for key, entry in self.seen.items()
            if key in still_active
            or (entry[3] is not None and horizon is not None and entry[3] >= horizon)
        ]
        if kept:
            cursor["seen"] = kept[-SEEN_LIMIT:]
        if self.max_id is not None:
            cursor["max_id"] = self.max_id
        if self.life:
            cursor["life"] = self.life
        return cursor


def _id_reused(
    entry: _Seen,
    occurrence: Occurrence,
    within_s: float,
) -> bool:
    """Whether an id seen before now names another occurrence: another camera, or a start
    more than `within_s` away (an unreadable start tells nothing)."""
    _, camera, _, start = entry
    if camera != occurrence.source:
        return True
    other = _epoch(occurrence.start)
    return start is not None and other is not None and abs(start - other) > within_s


def _same_occurrence(
    entry: _Seen,
    occurrence: Occurrence,
    within_s: float = SAME_START_S,
) -> bool:
    """One occurrence: same camera, type (when both know it) and start (within `within_s`)."""
    _, camera, kind, start = entry
    if camera != occurrence.source:
        return False
    if kind is not None and occurrence.event_type is not None and kind != occurrence.event_type:
        return False
    other = _epoch(occurrence.start)
    return start is not None and other is not None and abs(start - other) <= within_s


def _next_life(current: str | None) -> str:
    """A life tag after `current`: two resets within one second must not share a tag."""
    now = datetime.now(UTC)
    if current:
        try:
            before = datetime.strptime(current, LIFE_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            before = None
        if before is not None and now < before + timedelta(seconds=1):
            now = before + timedelta(seconds=1)
    return new_life(now)


def _merge(carried: list[_Delivered], alarms: list[_Delivered]) -> list[_Delivered]:
    """Carried alarms first; one per source_id (this poll's wins)."""
    fresh = {source_id for source_id, _, _ in alarms}
    return [*(entry for entry in carried if entry[0] not in fresh), *alarms]


# ---------------------------------------------------------------------- helpers


def _pairs(params: Mapping[str, Any] | list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, list):
        return params
    return [(key, str(value)) for key, value in params.items()]
