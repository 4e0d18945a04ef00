"""CamTrace CT-Server 9.16+ / Sirion 16 (REST API v1.2).

What the server gives us, and how we use it:
- WSSE UsernameToken on every request (HTTP Basic only when asked for): the bcrypt salt comes
  from `GET /api/v1.2/users/{name}/auth` (no auth needed); the whole 60-character bcrypt hash
  is the hashed password in `base64(sha1(nonce + created + hashed))`; without a salt the hash
  is MD5 (manual). A fresh nonce and `Created` per request.
- The server refuses a `Created` more than about 10 s off its own clock. We measure its clock
  (`GET /api/v1.2/getservertime`, else its `Date`) and write `Created` in server time; on a
  401 we measure again and retry once; an unusable time is measured again 30 s later. The
  measured skew is a metric and is warned about once over 5 s.
- `GET /api/v1.2/cameras/alarms` pages newest first with `limit`/`offset` and a
  `Link: <//host/...>; rel="next"` naming the server's own host (not ours behind NAT): we page
  by offset on the configured origin. Alarms that arrive while we page shift every later
  page down, so a page may repeat alarms (never skip one): new ones are those above the
  cursor's id. `from` is the server's time at the previous poll minus a margin (never an
  alarm's time: one stamped 9999 would hide every later alarm); a clock stepped back is
  followed. The cursor remembers the newest alarms' times and cameras to tell a server whose
  ids started again (a reset): its alarms then get a device-life tag in their source id.
- A video is the alarm recording slice (`/api/v1.2/slices?type=a`) that covers the alarm,
  fetched once the slice is closed (its `stop` after the alarm and no longer moving), as
  Matroska. `isRecordingAlarm` is a live state, not a setting: not used.
- The camera connection log gives `camera_offline` / `camera_online`, read with its own
  cursor (inside the alarm cursor) so our outages lose none.

Unknown (nobody public shows it): the full list of alarm descriptions CamTrace emits. The
manual shows only "MOTION Alarm ..."; a triggered alarm's description is its custom type
(`<type> Alarm` or `<type>`). `ALARM_TYPES` below maps the server's own types; every other
type is a trigger's custom type, `input` (contract).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import structlog
from pydantic import ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
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
    SiteReporter,
    TransportError,
    VendorContext,
    VendorError,
)
from cms_ingest.vendors.common import (
    MAX_PAGES_PER_POLL,
    as_id,
    clean_text,
    error_text,
    fetch_json,
    life_source_id,
    new_life,
    parse_time,
    plausible_time,
    read_json,
)

VENDOR = "camtrace"
API = "/api/v1.2"
log = structlog.get_logger("cms_ingest.vendors.camtrace")

# Description type (the text before "Alarm", upper case) -> taxonomy. The manual documents
# MOTION only; the others are what CamTrace installations are reported to show. Any other
# type is the custom type of a trigger (`input`); an empty description is `other`.
ALARM_TYPES: Mapping[str, EventType] = {
    "MOTION": EventType.MOTION,
    "TRIGGER": EventType.INPUT,
    "INPUT": EventType.INPUT,
    "VIDEO LOSS": EventType.VIDEO_LOSS,
    "VIDEOLOSS": EventType.VIDEO_LOSS,
    "TAMPERING": EventType.SABOTAGE,
    "TAMPER": EventType.SABOTAGE,
    "SABOTAGE": EventType.SABOTAGE,
    "AUDIO": EventType.AUDIO,
}
# A bcrypt salt as the server hands it out: "$2y$10$" and 22 characters. Anchored, no
# nested repetition: linear on any input (and the input is length-capped before).
_BCRYPT_SALT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{22}")
# bcrypt cost is 2^cost rounds: 10 is what servers hand out (~0.1 s); 31 would be ~32 h.
MAX_BCRYPT_COST = 14
_ALARM_WORD = re.compile("alarm", re.IGNORECASE)  # a literal: linear
MAX_LINK_HEADER = 8192
RECENT_ALARMS_KEPT = 64  # alarms the cursor remembers to tell a reset server
IDENTITY_LIMIT = 40  # characters of an alarm's time and camera the cursor keeps
FIRST_LOOK_BACK = timedelta(days=1)  # a cursor without a usable watermark reads this far back
CLOCK_REMEASURE_S = 30.0  # an unusable server time is measured again after this long
CLOCK_STEP_TOLERANCE_S = 5.0  # the server's clock this far behind the watermark: a step back
CAMERA_NAMES_TTL_S = 600.0
CUSTOM_TYPES_LOGGED = 100  # custom alarm types named in the log, per site
SKEW_WARN_S = 5.0
NO_SLICE_AFTER_S = 300.0  # no alarm slice this long after the alarm: the camera has none
SLICE_RELOOK_S = 1.5  # a slice's stop unchanged this long: the slice is closed
SLICE_STOPS_KEPT = 1000  # slices whose stop we watch (media of recent alarms)


class CamTraceOptions(SiteOptions):
    """`options:` of a CamTrace site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auth: Literal["wsse", "basic"] = "wsse"
    allow_basic_over_http: bool = False  # Basic sends the password as is: https only, unless this
    page_size: int = Field(default=100, ge=1, le=500)
    backfill: Duration | None = None  # first start: ingest this far back instead of nothing
    # Kept for configs written before every custom trigger type became `input` by itself.
    input_types: list[str] = Field(default_factory=list)
    health_interval_s: float = Field(default=60.0, gt=0)
    # `from` = the server's time at the previous poll - this (late-written alarms, clock steps)
    watermark_margin_s: float = Field(default=300.0, ge=0)
    slice_settle_s: float = Field(default=10.0, ge=0)  # a slice's stop this old: it is closed
    connection_log: bool = True  # camera_offline / camera_online from the connection log
    connection_log_interval_s: float = Field(default=10.0, gt=0)


# ---------------------------------------------------------------------- the cursor
# The cursor is JSON committed with the alarms it covers. Alarm ids only grow within one life
# of the server, so `last_id` says which listed alarms are new. The listing is filtered by
# `from` = watermark - margin only to keep answers small: the watermark is the server's own
# clock when we last read (its `Date`), never an alarm's time, so an alarm stamped 9999
# cannot hide the ones after it and a clock stepped back is seen and followed.


@dataclasses.dataclass(slots=True)
class Backlog:
    """A listing still to be read: `from`/`to` fixed, continued at `offset`; alarms above
    `floor` in it are new."""

    start: datetime | None
    end: datetime
    offset: int
    floor: int

    def dump(self) -> dict[str, Any]:
        start = None if self.start is None else _iso(self.start)
        return {"from": start, "to": _iso(self.end), "offset": self.offset, "floor": self.floor}

    @classmethod
    def load(cls, value: Any) -> Backlog | None:
        if not isinstance(value, dict):
            return None
        start, end = parse_time(value.get("from")), parse_time(value.get("to"))
        offset, floor = as_id(value.get("offset")), as_id(value.get("floor"))
        if end is None or offset is None or floor is None:
            return None
        return cls(start, end, offset, floor)


@dataclasses.dataclass(slots=True)
class ConnectionCursor:
    """Where the camera connection log was read up to (same scheme as the alarms); `until`:
    a read hit the page cap, the log up to that time is still to be read."""

    last_id: int = 0
    watermark: datetime | None = None
    until: datetime | None = None

    def dump(self) -> dict[str, Any]:
        mark = None if self.watermark is None else _iso(self.watermark)
        cursor: dict[str, Any] = {"last_id": self.last_id, "watermark": mark}
        if self.until is not None:
            cursor["until"] = _iso(self.until)
        return cursor

    @classmethod
    def load(cls, value: Any) -> ConnectionCursor | None:
        if not isinstance(value, dict):
            return None
        watermark = parse_time(value.get("watermark"))
        if watermark is not None and not plausible_time(watermark):
            watermark = None
        return cls(as_id(value.get("last_id")) or 0, watermark, parse_time(value.get("until")))


def _watermark_after(
    previous: datetime | None, server_time: datetime | None, moved: bool, margin: timedelta
) -> datetime | None:
    """The watermark after a poll: the server's time when something was read (or the clock
    stepped), else the old one until it is half a margin old. A quiet poll then leaves the
    cursor as it was: no database write per site and poll."""
    if server_time is None:
        return previous
    if moved or previous is None or abs(server_time - previous) > margin / 2:
        return server_time
    return previous


def _connections_after(
    previous: ConnectionCursor,
    entries: list[dict[str, Any]],
    last_id: int,
    server_time: datetime | None,
    complete: bool,
) -> ConnectionCursor:
    """The connection log cursor after a read. A capped read (newest first) leaves the part
    older than what it read for the next polls: `until` = the oldest time read (inclusive:
    that second may hold unread lines too). The watermark is the time of the first read of
    the two, so what came meanwhile is read after."""
    watermark = previous.watermark if previous.until is not None else server_time
    if complete:
        return ConnectionCursor(last_id, watermark or previous.watermark)
    times = [when for when in (parse_time(entry["dateTime"]) for entry in entries) if when]
    oldest = min(times, default=None)
    if oldest is None or oldest == previous.until:
        oldest = (previous.until or server_time or datetime.now(UTC)) - timedelta(seconds=1)
    return ConnectionCursor(last_id, watermark or previous.watermark, oldest)


@dataclasses.dataclass(slots=True)
class AlarmCursor:
    last_id: int = 0
    watermark: datetime | None = None
    # The newest alarms returned, id -> (time, camera) as the server wrote them: an id that
    # comes back with another time or camera means the server's ids started again.
    recent: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    life: str | None = None
    backlog: Backlog | None = None
    connections: ConnectionCursor | None = None

    def take_new(self, listed: list[dict[str, Any]], floor: int) -> list[dict[str, Any]]:
        """The listed alarms above `floor` (the new ones), now counted in the cursor."""
        fresh = [item for item in listed if (_id(item) or 0) > floor]
        self.last_id = max([self.last_id, *(_id(item) or 0 for item in fresh)])
        self.remember(fresh)
        return fresh

    def remember(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            alarm_id = _id(item)
            if alarm_id is not None:
                self.recent[alarm_id] = _identity(item)
        if len(self.recent) > RECENT_ALARMS_KEPT:
            keep = sorted(self.recent)[-RECENT_ALARMS_KEPT:]
            self.recent = {key: self.recent[key] for key in keep}

    def next_life(self) -> AlarmCursor:
        """The cursor of the server's new life: nothing of it read yet."""
        return AlarmCursor(watermark=self.watermark, life=new_life(), connections=self.connections)

    def dump(self) -> dict[str, Any]:
        cursor: dict[str, Any] = {
            "last_id": self.last_id,
            "watermark": None if self.watermark is None else _iso(self.watermark),
            "recent": [[key, *value] for key, value in sorted(self.recent.items())],
        }
        if self.life:
            cursor["life"] = self.life
        if self.backlog is not None:
            cursor["backlog"] = self.backlog.dump()
        if self.connections is not None:
            cursor["connections"] = self.connections.dump()
        return cursor

    @classmethod
    def load(cls, cursor: Cursor, problems: SiteReporter) -> AlarmCursor:
        """Our own cursor, read without trusting it: a time stored by an older version (an
        alarm's, 0001 or 9999) is dropped and reported, never used."""
        raw_mark = cursor.get("watermark", cursor.get("last_time"))
        watermark = parse_time(raw_mark)
        if raw_mark is not None and (watermark is None or not plausible_time(watermark)):
            problems.bad_input("cursor_time", f"stored watermark {str(raw_mark)[:40]!r} ignored")
            watermark = None
        life = cursor.get("life")
        return cls(
            last_id=as_id(cursor.get("last_id")) or 0,
            watermark=watermark,
            recent=_load_recent(cursor.get("recent")),
            life=life if isinstance(life, str) and life else None,
            backlog=Backlog.load(cursor.get("backlog")),
            connections=ConnectionCursor.load(cursor.get("connections")),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class AlarmPage:
    items: list[dict[str, Any]]  # the usable alarms (with an id)
    raw_count: int  # entries on the page, usable or not (for the next offset)
    offset: int
    more: bool
    server_time: datetime | None  # the server's clock when it answered (`Date`)


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    items: list[dict[str, Any]]
    complete: bool
    raw_read: int
    stopped_early: bool = False


Stop = tuple[int, datetime] | None  # (last id read, the server's now) for an early stop


def _all_read_before(
    items: list[dict[str, Any]], last_id: int, now: datetime, time_key: str = "time"
) -> bool:
    """Whether a page (of alarms, or of the connection log: `time_key` "dateTime") holds only
    entries at or below our id and timed at or before `now` (a page of entries stamped ahead
    of the clock, e.g. before an NTP step, goes on)."""
    if not items:
        return False
    for item in items:
        when = parse_time(item.get(time_key))
        if (_id(item) or 0) > last_id or when is None or when > now:
            return False
    return True


def _oldest_first(found: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Alarms in the order the server raised them (ids grow), as they are stored."""
    return [found[key] for key in sorted(found)]


def _identity(item: Mapping[str, Any]) -> tuple[str, str]:
    """(time, camera) of an alarm as the cursor keeps them: short and storable as jsonb."""
    time_text, camera_text = str(item.get("time"))[:40], str(item.get("cameraId"))[:40]
    return (clean_text(time_text, IDENTITY_LIMIT), clean_text(camera_text, IDENTITY_LIMIT))


def _load_recent(value: Any) -> dict[int, tuple[str, str]]:
    recent: dict[int, tuple[str, str]] = {}
    for entry in value if isinstance(value, list) else []:
        if isinstance(entry, list) and len(entry) == 3 and as_id(entry[0]) is not None:
            recent[as_id(entry[0]) or 0] = (str(entry[1]), str(entry[2]))
    return recent


def _same_time(stored: str, listed: str) -> bool:
    first, second = parse_time(stored), parse_time(listed)
    if first is None or second is None:
        return stored == listed
    return first == second


def _reset_evidence(state: AlarmCursor, items: list[dict[str, Any]]) -> str | None:
    """Why the listed alarms show that the server's ids started again, or None.

    An id we returned before, listed with another time or camera; or, when none of the listed
    alarms is one we know, a newest id below our cursor."""
    known_listed = False
    for item in items:
        alarm_id = _id(item)
        stored = state.recent.get(alarm_id or 0)
        if stored is None:
            continue
        time_listed, camera_listed = _identity(item)
        if not _same_time(stored[0], time_listed) or stored[1] != camera_listed:
            return (
                f"alarm {alarm_id} was at {stored[0]} on camera {stored[1]}, "
                f"now at {time_listed} on camera {camera_listed}"
            )
        known_listed = True
    newest = max((_id(item) or 0 for item in items), default=None)
    if newest is not None and newest < state.last_id and not known_listed:
        return f"the newest alarm id {newest} is below the cursor's {state.last_id}"
    return None


def _backlog_after(
    listed: list[dict[str, Any]], start: datetime, server_time: datetime, floor: int
) -> Backlog:
    """Where to go on after a capped read: the same listing bounded at the server's time of
    its first page, past the alarms of it already read."""
    end = server_time.replace(microsecond=0) + timedelta(seconds=1)
    read = 0
    for item in listed:
        when = parse_time(item.get("time"))
        if when is not None and start <= when <= end:
            read += 1
    return Backlog(start, end, read, floor)


def wsse_digest(nonce: str, created: str, hashed_password: str) -> str:
    """PasswordDigest = base64(sha1(nonce + created + hashed password)), the nonce as sent."""
    raw = hashlib.sha1((nonce + created + hashed_password).encode()).digest()  # noqa: S324
    return base64.b64encode(raw).decode()


def hash_password(password: str, salt: str | None) -> str:
    """The `<hashed-password>`: bcrypt with the account's salt (full 60 chars), else MD5 hex."""
    if salt:
        import bcrypt

        try:
            return bcrypt.hashpw(password.encode(), checked_salt(salt).encode()).decode()
        except ValueError as exc:  # the library's own refusal of a salt
            raise BadDeviceResponse(f"bcrypt refused the server's salt: {exc}") from None
    return hashlib.md5(password.encode()).hexdigest()  # noqa: S324 - the server's own scheme


def checked_salt(salt: str) -> str:
    """The server's bcrypt salt, if it is one we can use in reasonable time."""
    match = _BCRYPT_SALT.fullmatch(salt[:64])
    if match is None or len(salt) > 64:
        raise BadDeviceResponse(f"the server's bcrypt salt {salt[:40]!r} is not one")
    cost = int(match.group(1))
    if not 4 <= cost <= MAX_BCRYPT_COST:
        raise BadDeviceResponse(
            f"the server's bcrypt cost {cost} is outside 4..{MAX_BCRYPT_COST} "
            f"(each step doubles the time; {cost} would block a worker for too long)"
        )
    return salt


def alarm_type(description: str) -> str:
    """ "MOTION Alarm starts at ..." -> "MOTION"; a bare custom type is returned as is.

    The type is what comes before the first word "alarm" that follows a blank. Found with
    a literal search, not a pattern with repetition: device text must never cost more than
    linear time (a backtracking pattern took 29 s on 3,000 spaces and an "x")."""
    text = description
    for match in _ALARM_WORD.finditer(text):
        position, after = match.start(), match.end()
        ends_word = after == len(text) or not (text[after].isalnum() or text[after] == "_")
        if position > 0 and text[position - 1].isspace() and ends_word:
            return text[:position].strip().upper()
    return text.strip().upper()


class CamTraceClient:
    vendor = VENDOR
    actions: Mapping[str, ActionSpec] = {
        # Each trigger starts something new on the server (an alarm, a command, a scenario):
        # never repeated when we cannot tell whether it arrived.
        "alarm_trigger": ActionSpec(idempotent=False),
        "alarm_ack": ActionSpec(idempotent=True),
        "command": ActionSpec(idempotent=False),
        "scenario": ActionSpec(idempotent=False),
    }

    def __init__(
        self,
        context: VendorContext,
        options: CamTraceOptions,
    ) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._username = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._input_types = frozenset(t.upper() for t in options.input_types)
        self._hashed: str | None = None
        self._auth_lock = asyncio.Lock()
        self._offset_s: float | None = None  # server clock minus ours
        self._remeasure_at: float | None = None  # the server's time was unusable: again then
        self._skew_warned = False
        self._cameras: dict[str, dict[str, Any]] = {}
        self._cameras_loaded_at: float | None = None
        self._health_checked_at: float | None = None
        self._health_errors: dict[str, str] = {}
        self._custom_types_seen: set[str] = set()
        self._date_offset_s = 0.0
        self._slice_stops: dict[str, tuple[datetime, float]] = {}  # url -> (stop, first seen)
        self._connections_read_at: float | None = None
        self._connections_method = "GET"

    # ------------------------------------------------------------------ authentication

    async def _prepare_auth(self) -> None:
        """Salt, hashed password and server clock, once (and again after a 401)."""
        if self._options.auth == "basic":
            if self._http.base_url.scheme != "https" and not self._options.allow_basic_over_http:
                raise AuthenticationFailed(
                    "refusing HTTP Basic over plain http (the password would travel in clear); "
                    "use https, WSSE, or set options.allow_basic_over_http: true"
                )
            return
        async with self._auth_lock:
            if self._hashed is None:
                salt = await self._salt()
                self._hashed = await asyncio.to_thread(hash_password, self._password, salt)
            due = self._remeasure_at is not None and time.monotonic() >= self._remeasure_at
            if self._offset_s is None or due:
                await self._measure_clock()

    async def _salt(self) -> str | None:
        path = f"{API}/users/{self._username}/auth"
        async with self._http.request("GET", path) as response:
            status = response.status
            payload = await read_json(response, self._problems, f"GET {path}")
        if status != 200 or not isinstance(payload, dict):
            raise AuthenticationFailed(f"GET {path} answered {status}: cannot learn the salt")
        methods = payload.get("auth")
        if not isinstance(methods, list):
            raise BadDeviceResponse(f"GET {path}: no `auth` list")
        for method in methods:
            if isinstance(method, dict) and method.get("type") == "wsse" and method.get("salt"):
                return str(method["salt"])
        return None  # wsse without salt: MD5

    async def _measure_clock(self) -> None:
        path = f"{API}/getservertime"
        sent = time.time()
        async with self._http.request("GET", path) as response:
            payload = await read_json(response, self._problems, f"GET {path}")
            date_header = _date_header(response.headers)
        received = time.time()
        ours = (sent + received) / 2
        server = _server_time(payload, date_header, self._problems)
        if server is None:
            # Nothing usable: write Created in our time for now, and ask again soon (one bad
            # answer must not stay learned until the next 401).
            self._problems.bad_input("server_time", "neither getservertime nor Date is usable")
            self._offset_s = 0.0
            self._remeasure_at = time.monotonic() + CLOCK_REMEASURE_S
            return
        self._remeasure_at = None
        self._set_offset(server - ours)

    def _set_offset(self, offset: float) -> None:
        self._offset_s = offset
        self._problems.clock_skew(offset)
        if abs(offset) > SKEW_WARN_S and not self._skew_warned:
            self._skew_warned = True
            log.warning(
                "clock_skew",
                site_id=self.site_id,
                skew_s=round(offset, 1),
                note="WSSE Created is written in the server's time; fix the server's NTP",
            )

    def _headers(self) -> dict[str, str]:
        if self._options.auth == "basic":
            token = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        assert self._hashed is not None
        nonce = secrets.token_hex(16)
        server_now = datetime.now(UTC) + timedelta(seconds=self._offset_s or 0.0)
        created = server_now.strftime("%Y-%m-%dT%H:%M:%SZ")
        digest = wsse_digest(nonce, created, self._hashed)
        return {
            "Authorization": 'WSSE profile="UsernameToken"',
            "X-WSSE": (
                f'UsernameToken Username="{self._username}", PasswordDigest="{digest}", '
                f'Nonce="{nonce}", Created="{created}"'
            ),
        }

    async def _request(
        self, path: str, params: Mapping[str, str] | None = None, *, method: str = "GET"
    ) -> tuple[int, Any, Mapping[str, str]]:
        """An authenticated request: (status, JSON or None, headers). A 401 re-measures once."""
        await self._prepare_auth()
        for attempt in (1, 2):
            answer, payload = await fetch_json(
                self._http,
                method,
                path,
                self._problems,
                params=params,
                headers=self._headers(),
                where=f"{method} {_path_only(path)}",
            )
            status, headers = answer.status, answer.headers
            self._note_date(headers)
            if status == 401 and attempt == 1:
                await self._after_401()
                continue
            if status == 401:
                raise AuthenticationFailed(
                    f"{method} {_path_only(path)} refused (401): {error_text(payload)}"
                )
            return status, payload, headers
        raise AssertionError("unreachable")

    def _note_date(self, headers: Mapping[str, str]) -> None:
        """The server's clock off its `Date` header, for when no WSSE offset is measured."""
        server = _date_header(headers)
        if server is not None and plausible_time(server):
            self._date_offset_s = server.timestamp() + 0.5 - time.time()

    async def _after_401(self) -> None:
        """Stale digest or changed password: measure the clock again, refetch the salt."""
        if self._options.auth == "basic":
            return
        async with self._auth_lock:
            self._offset_s = None
            self._hashed = None
        await self._prepare_auth()

    # ------------------------------------------------------------------ alarms

    async def poll(self, cursor: Cursor | None) -> PollResult:
        await self._refresh_cameras()
        await self._maybe_check_health()
        if cursor is None:
            return await self._first_poll()
        state = AlarmCursor.load(cursor, self._problems)
        if state.backlog is not None:
            alarms, after = await self._read_backlog(state)
        else:
            alarms, after = await self._read_window(state)
        after = await self._poll_connections(after, alarms)
        notes = [f"caught up {len(alarms)} alarms"] if len(alarms) > self._options.page_size else []
        return PollResult(alarms=alarms, cursor=after.dump(), notes=notes)

    async def _first_poll(self) -> PollResult:
        """First start on a site: the newest alarm becomes the cursor (no backlog flood); with
        `backfill`, the alarms of that period are read from the following polls on."""
        # A page of the newest, not only the newest: the cursor remembers them, so an odd
        # newest alarm (stamped year 1, outside every window) cannot pass for a reset server.
        page = await self._alarm_page(None, None, 0, limit=RECENT_ALARMS_KEPT)
        server_now = page.server_time or self._server_now()
        newest = max((_id(item) or 0 for item in page.items), default=0)
        state = AlarmCursor(last_id=newest, watermark=server_now)
        state.remember(page.items)
        state.connections = ConnectionCursor(watermark=server_now)
        if self._options.backfill is not None:
            since = server_now - timedelta(seconds=self._options.backfill)
            state.backlog = Backlog(since, server_now + timedelta(seconds=1), 0, 0)
        return PollResult(alarms=[], cursor=state.dump())

    async def _read_window(self, state: AlarmCursor) -> tuple[list[Alarm], AlarmCursor]:
        """The alarms listed since the watermark (minus the margin): the new ones are those
        above the cursor's id. Paged by `offset` on our own origin, never by the `Link` host."""
        margin = timedelta(seconds=self._options.watermark_margin_s)
        server_now = self._server_now()
        top = server_now - FIRST_LOOK_BACK if state.watermark is None else state.watermark
        start = min(top, server_now) - margin
        first = await self._alarm_page(start, None, 0)
        # A step smaller than the margin is covered by it; the tolerance absorbs the Date
        # header's 1 s resolution.
        stepped_back = (
            first.server_time is not None
            and first.server_time < start + margin - timedelta(seconds=CLOCK_STEP_TOLERANCE_S)
        )
        if stepped_back and first.server_time is not None:
            # The server's clock went back (an NTP step) since we last looked: its new alarms
            # are timed before the watermark. Read again from its present time.
            log.warning(
                "server_clock_stepped_back",
                site_id=self.site_id,
                seconds=round((start + margin - first.server_time).total_seconds()),
            )
            start = first.server_time - margin
            first = await self._alarm_page(start, None, 0)
        # Ids only grow, so a page of old alarms timed before now ends the read (a server
        # listing by time puts a clock step's new alarms below older ones: then read it all).
        now = (first.server_time or server_now) + timedelta(seconds=1)  # `Date` is truncated
        stop = None if stepped_back else (state.last_id, now)
        listing = await self._read_pages(first, start, None, stop)
        evidence = _reset_evidence(state, listing.items)
        if evidence is not None:
            self._problems.device_reset(evidence)
            state = state.next_life()
            if listing.stopped_early:  # every alarm of the new life is new: read them all
                listing = await self._read_pages(first, start, None)
        listed = listing.items
        floor = state.last_id
        fresh = state.take_new(listed, floor)
        state.watermark = _watermark_after(
            state.watermark, first.server_time or server_now, bool(fresh) or stepped_back, margin
        )
        if not listing.complete:
            state.backlog = _backlog_after(listed, start, first.server_time or server_now, floor)
            self._problems.bad_input(
                "paging", f"more than {MAX_PAGES_PER_POLL} pages of alarms: the rest next poll"
            )
        return [self._alarm(item, state.life) for item in fresh], state

    async def _read_backlog(self, state: AlarmCursor) -> tuple[list[Alarm], AlarmCursor]:
        """Continue a catch-up that did not fit in one poll (or a backfill), page by page. The
        listing is bounded by `to`, so alarms raised meanwhile only shift it down (a page may
        repeat alarms, never skip one)."""
        backlog = state.backlog
        assert backlog is not None
        first = await self._alarm_page(backlog.start, backlog.end, backlog.offset)
        listing = await self._read_pages(first, backlog.start, backlog.end)
        fresh = state.take_new(listing.items, backlog.floor)
        state.backlog = (
            None
            if listing.complete
            else dataclasses.replace(backlog, offset=backlog.offset + listing.raw_read)
        )
        return [self._alarm(item, state.life) for item in fresh], state

    async def _alarm_page(
        self, start: datetime | None, end: datetime | None, offset: int, *, limit: int = 0
    ) -> AlarmPage:
        params = {"limit": str(limit or self._options.page_size), "offset": str(offset)}
        if start is not None:
            params["from"] = _iso(start)
        if end is not None:
            params["to"] = _iso(end)
        status, payload, headers = await self._request(f"{API}/cameras/alarms", params)
        raw = _alarm_list(status, payload)
        items = _usable_alarms(raw, self._problems)
        more = bool(raw) and (_has_next_link(headers) or len(raw) >= int(params["limit"]))
        server_time = _plausible(_date_header(headers), self._problems, "Date header")
        return AlarmPage(items, len(raw), offset, more, server_time)

    async def _read_pages(
        self, first: AlarmPage, start: datetime | None, end: datetime | None, stop: Stop = None
    ) -> Listing:
        """The alarms of `first` and the pages after it, each id once, and whether the listing
        was read to its end (not: MAX_PAGES_PER_POLL pages read, the rest is for the next poll).
        With `stop`, a page of nothing but alarms already read ends it early."""
        found: dict[int, dict[str, Any]] = {}
        page, raw_read = first, 0
        for pages in range(1, MAX_PAGES_PER_POLL + 1):
            raw_read += page.raw_count
            known = len(found)
            for item in page.items:
                found.setdefault(_id(item) or 0, item)
            if pages > 1 and page.items and len(found) == known:
                # A full page of nothing new: the server answers the same page whatever the
                # offset. Paging on would never end (nor would a backlog of it).
                self._problems.bad_input("paging_ignored", "the server ignores `offset`")
                return Listing(_oldest_first(found), True, raw_read)
            if stop is not None and _all_read_before(page.items, *stop):
                return Listing(_oldest_first(found), True, raw_read, stopped_early=True)
            if not page.more:
                return Listing(_oldest_first(found), True, raw_read)
            if pages < MAX_PAGES_PER_POLL:
                page = await self._alarm_page(start, end, page.offset + page.raw_count)
        return Listing(_oldest_first(found), False, raw_read)

    def _server_now(self) -> datetime:
        """The server's clock as last measured (the WSSE offset, else its `Date`), else ours."""
        offset = self._offset_s if self._offset_s is not None else self._date_offset_s
        return datetime.now(UTC) + timedelta(seconds=offset)

    def _alarm(self, item: Mapping[str, Any], life: str | None = None) -> Alarm:
        alarm_id = _id(item)
        description = str(item.get("description") or "")
        kind = alarm_type(description)
        camera = item.get("cameraId")
        camera_id = None if camera is None else str(camera)
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=life_source_id(str(alarm_id), life),
            event_type=self._event_type(kind),
            vendor_event=kind,
            description=description,
            occurred_at=self._occurred_at(item, alarm_id),
            camera_id=camera_id,
            camera_name=self._camera_name(camera_id),
            raw=dict(item),
            media=self._media(item, alarm_id, camera_id),
        )

    def _occurred_at(self, item: Mapping[str, Any], alarm_id: int | None) -> datetime:
        """The alarm's own time; an unreadable or implausible one (before 2000, far ahead of
        the server's clock) is reported, and the alarm is kept with the time we read it."""
        occurred = parse_time(item.get("time"))
        if occurred is None:
            self._problems.bad_input("bad_time", f"alarm {alarm_id}: `time` unreadable; using now")
            return datetime.now(UTC)
        if not plausible_time(occurred, self._server_now()):
            self._problems.bad_input(
                "implausible_time",
                f"alarm {alarm_id}: `time` {str(item.get('time'))[:40]!r} implausible; using now",
            )
            return datetime.now(UTC)
        return occurred

    # ------------------------------------------------------------------ camera connection log

    async def _poll_connections(self, state: AlarmCursor, alarms: list[Alarm]) -> AlarmCursor:
        """`camera_offline` / `camera_online` from the server's connection log, every
        `connection_log_interval_s`, read like the alarms: since the watermark (minus the
        margin), new above the last id, so an outage of ours loses none."""
        now = time.monotonic()
        due = (
            self._connections_read_at is None
            or now - self._connections_read_at >= self._options.connection_log_interval_s
        )
        if not self._options.connection_log or not due:
            return state
        self._connections_read_at = now
        log_cursor = state.connections or ConnectionCursor(watermark=self._server_now())
        try:
            entries, server_time, complete = await self._read_connection_log(log_cursor)
        except (VendorError, TransportError) as exc:
            # Another profile than Admin, an older server, a slow log: the alarms read in this
            # poll are committed without it; the log is read from its own cursor next time.
            self._problems.bad_input("connection_log", f"{type(exc).__name__}: {exc}")
            return state
        listed_ids = [as_id(entry.get("id")) or 0 for entry in entries]
        # Ids below ours only: the server's log started again (a reset). An older part still
        # to read (`until`) has ids below ours too. Source ids carry the camera, state and
        # time, so an entry read twice is never stored twice.
        restarted = bool(listed_ids) and max(listed_ids) < log_cursor.last_id
        floor = 0 if restarted or log_cursor.until is not None else log_cursor.last_id
        fresh = [entry for entry, key in zip(entries, listed_ids, strict=True) if key > floor]
        alarms.extend(self._connection_alarms(fresh, state.life))
        # The newest id read; an older part's ids (until) are below the one we have.
        newest = max([floor, *listed_ids]) if log_cursor.until is None else log_cursor.last_id
        moved = bool(fresh) or not complete or log_cursor.until is not None
        margin = timedelta(seconds=self._options.watermark_margin_s)
        mark = _watermark_after(log_cursor.watermark, server_time, moved, margin)
        state.connections = _connections_after(log_cursor, entries, newest, mark, complete)
        return state

    async def _read_connection_log(
        self, log_cursor: ConnectionCursor
    ) -> tuple[list[dict[str, Any]], datetime | None, bool]:
        """The log since the watermark (and up to `until`, when an older part is still to be
        read): its usable entries, the server's time, whether it was read to its end."""
        margin = timedelta(seconds=self._options.watermark_margin_s)
        top = log_cursor.watermark or self._server_now() - FIRST_LOOK_BACK
        params = {"from": _iso(min(top, self._server_now()) - margin)}
        if log_cursor.until is not None:
            params["to"] = _iso(log_cursor.until)
        entries: list[dict[str, Any]] = []
        server_time: datetime | None = None
        offset = 0
        for _page in range(MAX_PAGES_PER_POLL):
            params.update(limit=str(self._options.page_size), offset=str(offset))
            raw, headers = await self._connection_page(params)
            if server_time is None:
                server_time = _plausible(_date_header(headers), self._problems, "Date header")
            usable = [entry for entry in raw if _usable_connection(entry, self._problems)]
            entries += usable
            offset += len(raw)
            if len(raw) < self._options.page_size and not _has_next_link(headers):
                return entries, server_time, True
            now = (server_time or self._server_now()) + timedelta(seconds=1)
            if log_cursor.until is None and _all_read_before(
                usable, log_cursor.last_id, now, "dateTime"
            ):
                return entries, server_time, True  # the rest of the window was read before
        return entries, server_time, False

    async def _connection_page(
        self, params: Mapping[str, str]
    ) -> tuple[list[Any], Mapping[str, str]]:
        path = f"{API}/cameras/connections"
        status, payload, headers = await self._request(
            path, params, method=self._connections_method
        )
        if status == 405 and self._connections_method == "GET":
            # The manual lists the call as GET and shows it as POST: a server may take one.
            self._connections_method = "POST"
            status, payload, headers = await self._request(path, params, method="POST")
        entries = payload.get("connections") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(entries, list):
            raise BadDeviceResponse(
                f"{self._connections_method} {path} answered {status} "
                f"{error_text(payload) or '(no connections list)'}; it needs the Admin profile"
            )
        return entries, headers

    def _connection_alarms(self, entries: list[dict[str, Any]], life: str | None) -> list[Alarm]:
        """One alarm per camera, state and moment (the log has a line per stream), oldest
        first."""
        groups: dict[tuple[str, bool, str], list[dict[str, Any]]] = {}
        for entry in sorted(entries, key=lambda entry: as_id(entry.get("id")) or 0):
            key = (str(entry.get("cameraId")), _connected(entry) is True, str(entry["dateTime"]))
            groups.setdefault(key, []).append(entry)
        return [self._connection_alarm(key, group, life) for key, group in groups.items()]

    def _connection_alarm(
        self, key: tuple[str, bool, str], group: list[dict[str, Any]], life: str | None
    ) -> Alarm:
        camera_id, connected, when = key
        occurred = parse_time(when) or datetime.now(UTC)
        if not plausible_time(occurred, self._server_now()):
            self._problems.bad_input("implausible_time", f"connection log time {when[:40]!r}")
            occurred = datetime.now(UTC)
        state = "connected" if connected else "disconnected"
        name = self._camera_name(camera_id) or str(group[0].get("cameraName") or camera_id)
        streams = ", ".join(sorted({str(entry.get("streamName") or "?") for entry in group}))
        stamp = occurred.strftime("%Y%m%dT%H%M%SZ") if parse_time(when) else when[:40]
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=life_source_id(f"connection:{camera_id}:{state}:{stamp}", life),
            event_type=EventType.CAMERA_ONLINE if connected else EventType.CAMERA_OFFLINE,
            vendor_event=state,
            description=f"camera {name} {state} ({streams})",
            occurred_at=occurred,
            camera_id=camera_id,
            camera_name=name,
            raw={"connections": group},
            media=(),
        )

    def _event_type(self, kind: str) -> EventType:
        """The server's own detectors have fixed types (ALARM_TYPES); an alarm raised through
        `cameras/alarms/trigger` carries the caller's "personalized alarm type", any text:
        every other type is such a trigger, hence `input` (the contract), said once per type."""
        if kind in ALARM_TYPES:
            return ALARM_TYPES[kind]
        if not kind:
            return EventType.OTHER
        unannounced = kind not in self._input_types and kind not in self._custom_types_seen
        if unannounced and len(self._custom_types_seen) < CUSTOM_TYPES_LOGGED:
            self._custom_types_seen.add(kind)
            log.info(
                "camtrace_custom_alarm_type",
                site_id=self.site_id,
                vendor_event=kind[:100],
                note="not a built-in CamTrace type: taken as a triggered custom type (input)",
            )
        return EventType.INPUT

    def _media(
        self, item: Mapping[str, Any], alarm_id: int | None, camera_id: str | None
    ) -> tuple[MediaRequest, ...]:
        documented = f"{API}/cameras/alarms/{alarm_id}.jpg"
        record_time = item.get("recordTime")
        video_request = MediaRequest(
            MediaKind.VIDEO,
            {"camera_id": camera_id, "record_time": record_time, "time": item.get("time")},
            available=parse_time(record_time) is not None and camera_id is not None,
        )
        return (
            _image_request(MediaKind.SNAPSHOT, item.get("snapshot"), documented),
            _image_request(MediaKind.THUMBNAIL, item.get("thumbnail"), f"{documented}?w=50&h=50"),
            video_request,
        )

    # ------------------------------------------------------------------ cameras and health

    async def _refresh_cameras(self) -> None:
        now = time.monotonic()
        if (
            self._cameras_loaded_at is not None
            and now - self._cameras_loaded_at < CAMERA_NAMES_TTL_S
        ):
            return
        self._cameras_loaded_at = now
        status, payload, _ = await self._request(f"{API}/cameras")
        cameras = payload.get("cameras") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(cameras, list):
            self._problems.bad_input("cameras", f"camera list unreadable (HTTP {status})")
            return
        self._cameras = {
            str(cam["id"]): cam for cam in cameras if isinstance(cam, dict) and "id" in cam
        }

    def _camera_name(self, camera_id: str | None) -> str | None:
        camera = self._cameras.get(camera_id or "")
        return str(camera["name"]) if camera and camera.get("name") else None

    async def _maybe_check_health(self) -> None:
        now = time.monotonic()
        due = (
            self._health_checked_at is None
            or now - self._health_checked_at >= self._options.health_interval_s
        )
        if not due:
            return
        self._health_checked_at = now
        status, payload = 404, None
        for path in (f"{API}/health", "/ap1/v1.2/health"):  # the manual prints both spellings
            status, payload, _ = await self._request(path)
            if status != 404:
                break
        health = payload.get("health") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(health, dict):
            self._problems.bad_input("health", f"health unreadable (HTTP {status})")
            return
        self._record_health(health)

    def _record_health(self, health: Mapping[str, Any]) -> None:
        raw_details = health.get("errorDetails")
        details: Mapping[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        for component in ("recorder", "cameras", "hardware"):
            ok = health.get(component) is not False
            self._problems.device_health(component, ok)
            detail = _health_detail(details.get(component)) if not ok else ""
            previous = self._health_errors.get(component)
            if not ok and previous != detail:
                self._health_errors[component] = detail
                log.warning(
                    "device_health_error", site_id=self.site_id, component=component, detail=detail
                )
            elif ok and previous is not None:
                del self._health_errors[component]
                log.info("device_health_recovered", site_id=self.site_id, component=component)

    async def recent_alarms(self, count: int) -> list[Alarm]:
        """The newest alarms on the server (for the probe)."""
        await self._refresh_cameras()
        status, payload, _ = await self._request(f"{API}/cameras/alarms", {"limit": str(count)})
        items = _usable_alarms(_alarm_list(status, payload), self._problems)
        return [self._alarm(item) for item in items]

    async def describe(self) -> dict[str, Any]:
        """Cameras, commands (exturls) and scenarios with their ids, for the probe."""
        self._cameras_loaded_at = None
        await self._refresh_cameras()
        _, exturls, _ = await self._request(f"{API}/exturls")
        _, scenarios, _ = await self._request(f"{API}/scenarios")
        return {
            "cameras": {key: cam.get("name") for key, cam in self._cameras.items()},
            "commands (exturls)": _listed(exturls, "exturls"),
            "scenarios": _listed(scenarios, "scenarios"),
            "clock skew (s)": round(self._offset_s or 0.0, 2),
        }

    # ------------------------------------------------------------------ commissioning

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        """What `cms-ingest probe` checks on a CamTrace server besides the common steps."""
        return {
            "server time (getservertime)": self._probe_server_time,
            "alarm list paging": self._probe_paging,
            "camera connection log readable": self._probe_connection_log,
        }

    async def _probe_server_time(self) -> str:
        path = f"{API}/getservertime"
        async with self._http.request("GET", path) as response:
            payload = await read_json(response, self._problems, f"GET {path}")
        stamp = _servertime_stamp(payload)
        if stamp is None:
            raise BadDeviceResponse(f"GET {path}: no usable timestamp ({str(payload)[:80]})")
        zone = payload["serverTime"].get("timezone")
        return f"server time {_iso(stamp)} ({zone or 'no time zone given'})"

    async def _probe_paging(self) -> str:
        params = {"limit": "1", "offset": "0"}
        status, payload, headers = await self._request(f"{API}/cameras/alarms", params)
        listed = _alarm_list(status, payload)
        links = ", ".join(_link_hosts(headers)) or "none"
        return (
            f"{len(listed)} alarm on the first page; Link hosts named: {links} "
            f"(paged by offset on {self._http.base_url.origin()} whatever they are)"
        )

    async def _probe_connection_log(self) -> str:
        raw, _ = await self._connection_page({"limit": "1", "offset": "0"})
        if not self._options.connection_log:
            return "readable, but options.connection_log is false: not polled"
        newest = raw[0] if raw and isinstance(raw[0], dict) else {}
        return f"readable with {self._connections_method}; newest entry {newest.get('dateTime')}"

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        if kind in (MediaKind.SNAPSHOT, MediaKind.THUMBNAIL):
            path = locator.get("path")
            if not isinstance(path, str):
                return MediaProbe("unavailable", detail=f"the alarm announces no {kind.value}")
            return MediaProbe("ready", path=path)  # a 404 on download means "not yet"
        return await self._video_status(locator)

    async def _video_status(self, locator: Mapping[str, Any]) -> MediaProbe:
        camera_id = locator.get("camera_id")
        start = parse_time(locator.get("record_time"))
        alarm_time = parse_time(locator.get("time")) or start
        if camera_id is None or start is None or alarm_time is None:
            return MediaProbe("unavailable", detail="the alarm has no recording")
        if not (plausible_time(start) and plausible_time(alarm_time)):
            # Year 1 or 9999 (stored before it was checked, or a recordTime of its own): no
            # slice window can be asked for such a time.
            return MediaProbe("unavailable", detail=f"the recording time {start} is not plausible")
        # Not the camera's `isRecordingAlarm`: that is whether it records an alarm right now.
        # The alarm's own `recordTime` says a recording exists.
        params = {
            "cameraId": str(camera_id),
            "from": (start - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "to": (alarm_time + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "type": "a",
        }
        status, payload, _ = await self._request(f"{API}/slices", params)
        slices = payload.get("slices") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(slices, list):
            raise BadDeviceResponse(f"GET {API}/slices answered {status}")
        covering = _covering_slice(slices, alarm_time)
        if covering is None:
            if datetime.now(UTC) - alarm_time > timedelta(seconds=NO_SLICE_AFTER_S):
                return MediaProbe("unavailable", detail="no alarm slice covers the alarm")
            return MediaProbe("pending", detail="no alarm slice yet")
        stop = parse_time(covering.get("stop"))
        if stop is None or stop <= alarm_time:
            return MediaProbe("pending", detail="the alarm slice is still recording")
        url = covering.get("downloadUrl")
        if not isinstance(url, str):
            raise BadDeviceResponse("alarm slice without downloadUrl")
        if not self._slice_settled(url, stop):
            # Some servers list a slice being written with `stop` = its end so far: only a
            # stop that stays put is the end of the recording.
            return MediaProbe("pending", detail="the alarm slice may still be recording")
        return MediaProbe("ready", path=url)

    def _slice_settled(self, url: str, stop: datetime) -> bool:
        """Whether a slice's `stop` is its end: older than `slice_settle_s` on the server's
        clock, or the same as at an earlier look `SLICE_RELOOK_S` ago or more."""
        if stop <= self._server_now() - timedelta(seconds=self._options.slice_settle_s):
            return True
        now = time.monotonic()
        seen = self._slice_stops.get(url)
        if seen is not None and seen[0] == stop:
            return now - seen[1] >= SLICE_RELOOK_S
        if len(self._slice_stops) >= SLICE_STOPS_KEPT:
            self._slice_stops.pop(next(iter(self._slice_stops)))
        self._slice_stops[url] = (stop, now)
        return False

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        await self._prepare_auth()
        for attempt in (1, 2):
            async with self._http.request(
                "GET", path, headers=self._headers(), timeout_s=600.0, read_timeout_s=30.0
            ) as response:
                if response.status == 401 and attempt == 1:
                    await self._after_401()
                    continue
                if response.status == 404:
                    raise MediaNotReady(f"GET {_path_only(path)} answered 404")
                if response.status != 200:
                    raise BadDeviceResponse(f"GET {_path_only(path)} answered {response.status}")
                yield Download(
                    content_type=response.content_type,
                    content_length=response.content_length,
                    chunks=response.content.iter_chunked(256 * 1024),
                )
                return

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        if action.kind in ("alarm_trigger", "alarm_ack"):
            cameras = _camera_list(action.target)
            params = {"cameraId": cameras}
            if action.kind == "alarm_trigger" and action.params.get("type") is not None:
                params["type"] = str(action.params["type"])
            verb = "trigger" if action.kind == "alarm_trigger" else "untrigger"
            return await self._trigger(f"{API}/cameras/alarms/{verb}", params)
        if action.kind == "command":
            return await self._trigger(f"{API}/exturls/{_numeric(action.target, 'exturl')}/trigger")
        if action.kind == "scenario":
            return await self._trigger(
                f"{API}/scenarios/{_numeric(action.target, 'scenario')}/trigger"
            )
        raise InvalidAction(
            f"camtrace has no action {action.kind!r} (it has: {', '.join(sorted(self.actions))})"
        )

    async def _trigger(self, path: str, params: Mapping[str, str] | None = None) -> ActionResult:
        status, payload, _ = await self._request(path, params)
        answer = payload if isinstance(payload, dict) else {}
        if 200 <= status < 300:
            if answer.get("triggered") is False:
                raise DeviceRefused(
                    f"GET {path}: the server says it did not trigger", answer=answer
                )
            return ActionResult(result={"status": status, "answer": answer})
        if 400 <= status < 500:
            raise DeviceRefused(
                f"GET {path} refused ({status}): {error_text(payload) or 'no reason given'}",
                answer=answer,
            )
        raise BadDeviceResponse(f"GET {path} answered {status}: {error_text(payload)}")

    async def close(self) -> None:
        """Close the site's kept connection (aiohttp's session belongs to the process)."""
        self._http.close()


# ---------------------------------------------------------------------- helpers


def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _id(item: Mapping[str, Any]) -> int | None:
    return as_id(item.get("id"))


def _listed(payload: Any, key: str) -> Any:
    """`payload[key]` when the answer is the documented object, else an empty list."""
    return payload.get(key, []) if isinstance(payload, dict) else []


def _connected(entry: Mapping[str, Any]) -> bool | None:
    """`connected` as the manual types it (a boolean), or as text/number some servers write."""
    value = entry.get("connected")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


def _usable_connection(entry: Any, problems: SiteReporter) -> bool:
    usable = (
        isinstance(entry, dict)
        and as_id(entry.get("id")) is not None
        and entry.get("cameraId") is not None
        and isinstance(entry.get("dateTime"), str)
        and _connected(entry) is not None
    )
    if not usable:
        problems.bad_input("connection_entry", f"camera connection unusable: {entry!r:.200}")
    return usable


def _image_request(kind: MediaKind, announced: Any, documented: str) -> MediaRequest:
    """A snapshot or thumbnail the alarm announces: at the server's own relative path when it
    gives one, else the documented path (never another host). None announced: unavailable."""
    if not isinstance(announced, str) or not announced.strip():
        return MediaRequest(kind, {"path": None}, available=False)
    path = announced if announced.startswith(f"{API}/") else documented
    return MediaRequest(kind, {"path": path}, available=True)


def _alarm_list(status: int, payload: Any) -> list[Any]:
    if status != 200:
        raise BadDeviceResponse(
            f"GET {API}/cameras/alarms answered {status}: {error_text(payload)}"
        )
    alarms = payload.get("alarms") if isinstance(payload, dict) else None
    if not isinstance(alarms, list):
        raise BadDeviceResponse(f"GET {API}/cameras/alarms: no `alarms` list in the answer")
    return alarms


def _usable_alarms(alarms: list[Any], problems: SiteReporter) -> list[dict[str, Any]]:
    usable = []
    for item in alarms:
        if isinstance(item, dict) and _id(item) is not None:
            usable.append(item)
        else:
            problems.bad_input("alarm_without_id", f"alarm without a usable id: {item!r:.200}")
    return usable


def _link_values(headers: Mapping[str, str]) -> list[str]:
    """Every `Link` header, each cut to MAX_LINK_HEADER characters."""
    getall = getattr(headers, "getall", None)
    values = getall("Link", []) if getall else [headers.get("Link", "")]
    return [str(value or "")[:MAX_LINK_HEADER] for value in values]


def _has_next_link(headers: Mapping[str, str]) -> bool:
    """Whether a `Link` header has a rel="next" (its URL is not used: we page by offset on our
    own origin, whatever host the server names). Read without a regular expression."""
    for value in _link_values(headers):
        for link in value.split(","):
            params = link.replace('"', "").replace(" ", "").lower().split(";")
            if "rel=next" in params[1:]:
                return True
    return False


def _link_hosts(headers: Mapping[str, str]) -> list[str]:
    """The hosts `Link` URLs name (for the probe's report only)."""
    hosts = []
    for value in _link_values(headers):
        target = value.partition("<")[2].partition(">")[0]
        if target.startswith("//") or "://" in target:
            hosts.append(target.split("//", 1)[1].split("/", 1)[0][:100])
    return hosts


def _date_header(headers: Mapping[str, str]) -> datetime | None:
    value = headers.get("Date")
    try:
        return parsedate_to_datetime(value).astimezone(UTC) if value else None
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _plausible(when: datetime | None, problems: SiteReporter, what: str) -> datetime | None:
    """A server time we may keep as a watermark or a clock, or None (reported once)."""
    if when is None:
        return None
    if not plausible_time(when):
        problems.bad_input("implausible_server_time", f"{what} {_iso(when)} ignored")
        return None
    return when


def _timestamp(value: Any) -> datetime | None:
    """A UNIX time as a datetime; None for what is not one (1e20, 401 digits, a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (OverflowError, ValueError, OSError):
        return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _servertime_stamp(payload: Any) -> datetime | None:
    """The plausible `serverTime.timestamp` of a getservertime answer, else None."""
    server = payload.get("serverTime") if isinstance(payload, dict) else None
    stamp = _timestamp(server.get("timestamp")) if isinstance(server, dict) else None
    return stamp if stamp is not None and plausible_time(stamp) else None


def _server_time(
    payload: Any, date_header: datetime | None, problems: SiteReporter
) -> float | None:
    stamp = _servertime_stamp(payload)
    if stamp is not None:
        return stamp.timestamp()
    problems.bad_input(
        "server_time", f"getservertime unusable ({str(payload)[:80]}); using the Date header"
    )
    if date_header is not None and plausible_time(date_header):
        return date_header.timestamp()
    return None


def _covering_slice(slices: list[Any], moment: datetime) -> dict[str, Any] | None:
    """The alarm slice whose start is at or before the alarm, the latest such."""
    best: dict[str, Any] | None = None
    best_start: datetime | None = None
    for item in slices:
        if not isinstance(item, dict) or item.get("type", "a") != "a":
            continue
        start = parse_time(item.get("start"))
        if start is None or start > moment:
            continue
        if best_start is None or start > best_start:
            best, best_start = item, start
    return best


def _health_detail(value: Any) -> str:
    if isinstance(value, list):
        parts = []
        for entry in value:
            if isinstance(entry, dict):
                parts.append(f"{entry.get('name') or entry.get('id')}: {entry.get('error')}")
            else:
                parts.append(str(entry))
        return "; ".join(parts)[:500]
    return "" if value is None else str(value)[:500]


def _camera_list(target: str) -> str:
    ids = [part.strip() for part in target.split(",") if part.strip()]
    if not ids or any(as_id(part) is None for part in ids):
        raise InvalidAction(f"target must be camera ids separated by commas, not {target!r}")
    return ",".join(ids)


def _numeric(target: str, what: str) -> int:
    number = as_id(target)
    if number is None:
        raise InvalidAction(f"target must be a numeric {what} id, not {target!r}")
    return number


def check_site(url: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems `check-config` reports before the daemon ever starts: (options key, message)."""
    parsed = CamTraceOptions.model_validate(options)
    if parsed.auth == "basic" and url.startswith("http://") and not parsed.allow_basic_over_http:
        return [
            (
                "auth",
                "HTTP Basic over plain http sends the password in clear: use https or WSSE, "
                "or set allow_basic_over_http: true",
            )
        ]
    return []
