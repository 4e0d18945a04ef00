"""Videoloft cloud accounts (API 1.0.8). One configured site is one account.

The account's cameras ("devices", `uid.deviceid`, e.g. `12345.63`) live on logger servers
that the authenticator names; alerts arrive in real time on each logger's
`/cameras/realtime/live` long-poll, and `/alert` lists them afterwards.

How we use it:
- Session: `POST {authenticator}/login` with `{email, password}`; a `{location}` answer means
  "log in at that regional authenticator". Tokens live 20 minutes and carry their issue time
  and lifetime (`base64("uid:issued:ttl:...")*signature`): we renew at 3/4 of the lifetime
  with the login cookie (`caller=cookielogin`), and log in with the password when that fails.
  One renewal at a time. The token goes where the manual puts it, route by route: the
  `Authorization: ManythingToken` header (authenticator, `/cameras/status`, realtime), the
  `token=` query (`/alert`, `/sendcameratask`, the MP4), the path (thumbnails).
- Devices from `/devices` (every owner the account can see), their loggers from
  `/devices/viewerInfo`, refreshed every 10 minutes and at once when a logger stops
  answering for a device. Hosts handed back are contacted with the site URL's scheme. A
  device without a logger is reported, never silently left unwatched.
- One long-poll per logger, held by a background task and reopened before the server's
  5-minute cut (with jitter) and after any drop. The logger sends nothing from before it
  registered a connection, so a gap ends when the new long-poll *answered*: then the
  device's gap opens in the cursor (floor: the newest alert id committed) and `/alert` is
  read back to the floor, at most MAX_PAGES_PER_POLL pages a poll, the rest next poll.
  Live alerts arriving meanwhile are stored but never move the floor.
- Each logger's `/cameras/status` every `residency_check_s`: devices that moved, and each
  camera's status (a change missed in a gap, a camera offline from the start).
- Loggers are read at once; one that does not answer is left out for LOGGER_RETRY_S.
- Framing of the long-poll is not known publicly: SSE `data:` lines, newline-delimited JSON
  and back-to-back JSON objects are all accepted (`StreamDecoder`, linear, bounded).
- `/alert` spells its fields several ways (id as `alert`/`id`; end as `endt`, `endtt`, `enddt`,
  `end`; times in ms or s): `normalize_alert` reads them all.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from pydantic import ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.mediafiles import MediaTooLarge, store_stream
from cms_ingest.sitehttp import SiteHttp, TransportError
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
    VendorError,
)
from cms_ingest.vendors.common import (
    MAX_JSON_DEPTH,
    MAX_PAGES_PER_POLL,
    as_id,
    as_int,
    error_text,
    finite_float,
    json_deeper_than,
    no_json_constant,
    plausible_time,
    read_json,
)

VENDOR = "videoloft"
Params = Mapping[str, str] | Sequence[tuple[str, str]]
log = structlog.get_logger("cms_ingest.vendors.videoloft")

DEFAULT_TOKEN_TTL_S = 1200.0
RENEW_AT = 0.75  # of the token's lifetime: 15 of 20 minutes
TRIGGER_EVERY_S = 15.0
# A logger whose long-poll failed this many times in a row counts as not answering; when
# every logger in use is in that state the poll fails (supervision: "no live long-poll").
# Alerts whose delivery was confirmed, remembered so a gap read (or a second one after the
# connection settled) does not hand the same alert again: flood grouping counts what a poll
# returns. The database's key stays the guarantee; this only keeps poll results clean.
DELIVERED_MEMORY = 4096
STREAM_FAILURES_DOWN = 3  # triggerevent keeps a recording going for ~20 s after each call
OFFLINE_STATES = frozenset({"offline", "novideo"})
KNOWN_STATES = OFFLINE_STATES | {"live"}  # the manual's "e.g.": others are taken as up
EVENT_TYPES = {"motion": EventType.MOTION, "audio": EventType.AUDIO}
_END_FIELDS = ("endt", "endtt", "enddt", "end")
_SECONDS_BEFORE = 100_000_000_000  # a "time" below this is in seconds, not milliseconds
# A long-poll record is a few hundred bytes; one this long without its end is hostile, and
# re-reading it on every chunk would cost time quadratic in its size.
MAX_LIVE_RECORD_CHARS = 1024 * 1024
# accountInfo.maxAge is a storage plan in days; anything past a century is not a plan.
MAX_AGE_DAYS = 36_500
# Alert ids are the alert's start in seconds (the manual's samples): an id this far past our
# clock would hide every later alert behind the cursor.
_ID_SECONDS_FROM = 946_684_800  # 2000-01-01: an id below this is a counter, not a time
FUTURE_ID_SLACK_S = 86_400
# A logger that could not be reached is left out of catch-ups and status reads this long, so
# it does not hold back the other loggers' devices poll after poll (its gaps stay open).
LOGGER_RETRY_S = 30.0
# How long a poll waits for the /alert read-backs it started (a healthy logger answers in
# milliseconds; one that hangs must not hold the others' alerts for a request timeout).
CATCH_UP_WAIT_S = 1.0
# snapshot_request: how long to wait for the camera to report the thumb it was told to take.
CAPTURE_WAIT_S = 15.0
CAPTURE_POLL_S = 0.5
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a captured thumb is a few kB
PROBE_STREAM_WAIT_S = 10.0
# What a datetime holds, in ms since the epoch: 0001-01-01 to 9999-12-31.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999


class VideoloftOptions(SiteOptions):
    """`options:` of a Videoloft account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[str] | None = None  # restrict to these uidds (default: every device)
    reconnect_after_s: float = Field(default=240.0, gt=0)  # before the server's 5-minute cut
    devices_refresh_s: float = Field(default=600.0, gt=0)
    # /cameras/status per logger: devices still on it? each camera's status (offline missed?)
    residency_check_s: float = Field(default=60.0, gt=0)
    # After a long-poll answered, its devices' gaps are read once more this much later: a
    # logger that answers before it registers the connection loses nothing either.
    live_settle_s: float = Field(default=5.0, ge=0)
    tail_s: float = Field(default=20.0, ge=0)  # recording tail after an alert ends
    page_size: int = Field(default=50, ge=1, le=500)
    backfill: Duration | None = None


# ---------------------------------------------------------------------- parsing


def token_lifetime(token: str) -> tuple[float, float] | None:
    """(issued epoch, lifetime s) read from the token itself, or None."""
    head = token.split("*", 1)[0]
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            text = decode(head + "=" * (-len(head) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            continue
        parts = text.split(":")
        if len(parts) >= 3:
            issued, ttl = as_id(parts[1]), as_id(parts[2])  # "²".isdigit(), but float("²") fails
            if issued is not None and ttl is not None:
                return float(issued), float(ttl)
    return None


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


# What decides where a JSON record ends: brackets, quotes, escapes, and line breaks.
_STRUCTURE = re.compile(r'\\.?|["{}\[\]\n]', re.DOTALL)


@dataclass(slots=True)
class _OpenRecord:
    """A record begun but not yet complete: its text so far and where its scan stands."""

    parts: list[str] = field(default_factory=list)
    size: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False  # the last part ended with a backslash inside a string


class StreamDecoder:
    """Records from a long-poll body: SSE `data:` lines, NDJSON or back-to-back JSON.

    Read like any device JSON (`common.load_json`): NaN, Infinity and numbers past a float
    become None, and a record nested deeper than MAX_JSON_DEPTH is unreadable. Parsing is
    linear: each character is scanned once for where its record ends (text is never copied
    again per chunk), and a record is decoded once, when complete. A record still without its
    end after MAX_LIVE_RECORD_CHARS is unreadable and dropped up to the next line break.
    """

    def __init__(self, max_record: int = MAX_LIVE_RECORD_CHARS) -> None:
        self._head = ""  # text not yet known to start a record (prefixes, blanks, a line)
        self._open: _OpenRecord | None = None
        self._max_record = max_record
        self._skipping = False  # inside an unreadable record: drop up to the next line break
        self._decoder = json.JSONDecoder(parse_constant=no_json_constant, parse_float=finite_float)

    def feed(self, chunk: str) -> tuple[list[Any], list[str]]:
        """(complete records, unreadable fragments) after adding `chunk`."""
        records: list[Any] = []
        garbage: list[str] = []
        while chunk:
            if self._skipping:
                line_end = chunk.find("\n")
                if line_end < 0:
                    break
                self._skipping = False
                chunk = chunk[line_end + 1 :]
            elif self._open is not None:
                chunk = self._continue_record(chunk, records, garbage)
            else:
                chunk = self._start(self._head + chunk, garbage)
        return records, garbage

    def _start(self, text: str, garbage: list[str]) -> str:
        """Consume prefixes, comments and garbage lines; what remains after a record starts."""
        self._head = ""
        while True:
            text = text.lstrip()
            if not text:
                return ""
            if text.startswith("data:"):
                text = text[5:]
                continue
            if text[0] in "{[":
                self._open = _OpenRecord()
                return text
            line_end = text.find("\n")
            if line_end < 0:
                if len(text) > self._max_record:
                    garbage.append(text[:200])
                    self._skipping = True
                    return ""
                self._head = text  # "data" or a line not complete yet
                return ""
            if not (text[0] == ":" or text.startswith(("event:", "id:", "retry:"))):
                garbage.append(text[:line_end][:200])
            text = text[line_end + 1 :]

    def _continue_record(self, chunk: str, records: list[Any], garbage: list[str]) -> str:
        """Scan `chunk` as the continuation of the open record; the text after it ends."""
        record = self._open
        assert record is not None
        start = 0
        if record.escaped:
            record.escaped, start = False, 1
        end = self._scan(record, chunk, start)
        if end is None:
            record.parts.append(chunk)
            record.size += len(chunk)
            if record.size > self._max_record:
                garbage.append("".join(record.parts)[:200])
                self._drop_open(chunk)
            return ""
        if end < 0:  # broken or nested too deep: unreadable up to its line break
            garbage.append(("".join(record.parts) + chunk)[:200].split("\n", 1)[0])
            return self._drop_open(chunk)
        text = "".join(record.parts) + chunk[:end]
        self._open = None
        self._decode(text, records, garbage)
        return chunk[end:]

    def _drop_open(self, chunk: str) -> str:
        """Forget the open record; what follows the next line break of `chunk`."""
        self._open = None
        line_end = chunk.find("\n")
        if line_end < 0:
            self._skipping = True
            return ""
        return chunk[line_end + 1 :]

    @staticmethod
    def _scan(record: _OpenRecord, chunk: str, start: int) -> int | None:
        """Index in `chunk` just past the record's closing bracket; None while incomplete;
        -1 when it cannot be one record (nested too deep, or a record starting on a line of
        its own inside it)."""
        for match in _STRUCTURE.finditer(chunk, start):
            mark = match.group()
            if mark[0] == "\\":
                record.escaped = len(mark) == 1  # the escaped character is in the next chunk
                continue
            if record.in_string:
                record.in_string = mark != '"'
                continue
            if mark == '"':
                record.in_string = True
            elif mark in "{[":
                record.depth += 1
                if record.depth > MAX_JSON_DEPTH:
                    return -1
            elif mark in "}]":
                record.depth -= 1
                if record.depth == 0:
                    return match.end()
            elif chunk.startswith(("{", "data:"), match.end()):  # a line break
                return -1
        return None

    def _decode(self, text: str, records: list[Any], garbage: list[str]) -> None:
        try:
            record, _ = self._decoder.raw_decode(text)
        except (json.JSONDecodeError, RecursionError):
            garbage.append(text[:200])
            return
        if json_deeper_than(record, MAX_JSON_DEPTH):
            garbage.append(text[:200])
        else:
            records.append(record)


# ---------------------------------------------------------------------- state


@dataclass(slots=True)
class _Token:
    value: str | None = None
    renew_at: float = 0.0  # epoch
    cookie: str | None = None


@dataclass(slots=True)
class _Device:
    uidd: str
    name: str
    logger: str | None = None


@dataclass(slots=True)
class _LiveStream:
    uidds: frozenset[str]
    task: asyncio.Task[None]


Seen = tuple[str, Any, int]  # (logger, record, ms since the epoch when it reached us)


@dataclass(slots=True)
class _Inbox:
    """What the long-polls delivered since the last poll, and the gaps that need catch-up."""

    records: list[Seen] = field(default_factory=list)
    # uidds whose stream was (re)connected -> until when (ms) their gap is read once more
    gaps: dict[str, int] = field(default_factory=dict)

    def merge_before(self, earlier: _Inbox) -> None:
        """Put an earlier, undelivered batch back in front of this one."""
        self.records[:0] = earlier.records
        self.add_gaps(earlier.gaps)

    def add_gaps(self, gaps: Mapping[str, int]) -> None:
        for uidd, until in gaps.items():
            self.gaps[uidd] = max(until, self.gaps.get(uidd, 0))


class VideoloftClient:
    vendor = VENDOR
    actions: Mapping[str, ActionSpec] = {
        # Re-sending triggerevent only extends the recording; capturethumb takes another thumb.
        "record": ActionSpec(idempotent=True),
        "snapshot_request": ActionSpec(idempotent=True),
    }

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        self.site_id = context.site_id
        self._http = context.http  # the configured (global or regional) authenticator
        self._auth_http = context.http
        self._email = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._media_root = context.media_root
        self._token = _Token()
        self._token_lock = asyncio.Lock()
        self._max_age_ms: int | None = None
        self._devices: dict[str, _Device] = {}
        self._devices_at: float | None = None
        self._residency_at: float | None = None
        self._hosts: dict[str, SiteHttp] = {}
        self._streams: dict[str, _LiveStream] = {}
        self._inbox = _Inbox()
        self._stream_failures: dict[str, tuple[int, str]] = {}  # logger -> (in a row, last)
        self._logger_down_until: dict[str, float] = {}  # logger -> monotonic
        self._connected_at: dict[str, float] = {}  # logger -> epoch its long-poll answered
        self._status_reads: dict[str, asyncio.Task[None]] = {}  # logger -> /cameras/status
        # logger -> its /alert read-back still running after the poll that started it
        self._catch_ups: dict[str, asyncio.Task[list[VlAlert]]] = {}
        self._unwatched: list[str] = []  # devices without a logger
        self._unacked = _Inbox()
        self._returned_cursor: Cursor | None = None
        self._delivered: dict[tuple[str, int], None] = {}  # oldest first, DELIVERED_MEMORY
        self._unacked_keys: list[tuple[str, int]] = []
        self._refresh_devices_now = False

    # ------------------------------------------------------------------ session

    async def _auth_token(self) -> str:
        if self._token.value is not None and time.time() < self._token.renew_at:
            return self._token.value
        async with self._token_lock:  # one renewal at a time
            if self._token.value is None or time.time() >= self._token.renew_at:
                await self._renew()
            assert self._token.value is not None
            return self._token.value

    def _invalidate(self, token: str) -> None:
        if self._token.value == token:
            self._token.renew_at = 0.0

    async def _renew(self) -> None:
        if self._token.cookie is not None and self._token.value is not None:
            try:
                await self._cookie_login()
                return
            except (AuthenticationFailed, BadDeviceResponse):
                self._token.cookie = None  # refused: log in with the password
        await self._password_login()

    async def _password_login(self) -> None:
        http = self._http
        body = {"email": self._email, "password": self._password}
        for _hop in range(3):  # global authenticator -> regional one (at most a couple of hops)
            async with http.request("POST", "/login", json=body) as response:
                payload = await read_json(response, self._problems, "POST /login")
                status = response.status
                cookie = _cookie(response)
            if status != 200 or not isinstance(payload, dict):
                raise AuthenticationFailed(f"login refused (HTTP {status}): {error_text(payload)}")
            location = payload.get("location")
            if isinstance(location, str) and location and _login_token(payload) is None:
                http = self._host(location)
                continue
            self._accept_login(payload, cookie, http)
            return
        raise AuthenticationFailed("login kept redirecting between authenticators")

    async def _cookie_login(self) -> None:
        assert self._token.cookie is not None
        async with self._auth_http.request(
            "GET",
            "/login",
            params={"caller": "cookielogin"},
            headers={"Cookie": self._token.cookie},
        ) as response:
            payload = await read_json(response, self._problems, "GET /login (cookie)")
            status = response.status
            cookie = _cookie(response)
        if status != 200 or _login_token(payload) is None:
            raise AuthenticationFailed(f"token renewal refused (HTTP {status})")
        self._accept_login(payload, cookie or self._token.cookie, self._auth_http)

    def _accept_login(self, payload: Any, cookie: str | None, http: SiteHttp) -> None:
        token = _login_token(payload)
        if token is None:
            self._problems.bad_input(
                "login_answer", f"login answer without authToken: {payload!r:.200}"
            )
            raise AuthenticationFailed("the login answer carries no authToken")
        result = _result(payload)
        authenticator = result.get("authenticator")
        self._auth_http = (
            self._host(authenticator) if isinstance(authenticator, str) and authenticator else http
        )
        self._max_age_ms = self._max_age(result.get("accountInfo"))
        lifetime = token_lifetime(token)
        issued, ttl = lifetime if lifetime else (time.time(), DEFAULT_TOKEN_TTL_S)
        self._token.value = token
        self._token.renew_at = issued + ttl * RENEW_AT
        self._token.cookie = cookie

    def _max_age(self, info: Any) -> int | None:
        """`accountInfo.maxAge` (days) in ms for `/alert?maxage=`; None (no filter) when it is
        missing or not a plausible plan."""
        if not isinstance(info, dict) or info.get("maxAge") is None:
            return None
        days = info["maxAge"]
        if isinstance(days, bool) or not isinstance(days, int | float):
            days = None
        if days is None or not 0 < days <= MAX_AGE_DAYS:
            self._problems.bad_input("max_age", f"accountInfo.maxAge is not a plan: {info!r:.200}")
            return None
        return int(days * 86_400_000)

    def _host(self, host: str) -> SiteHttp:
        """A server the API named (authenticator, logger): our scheme, checked host."""
        host = host.split("://", 1)[-1].rstrip("/")
        if host not in self._hosts:
            self._hosts[host] = self._http.for_host(host)
        return self._hosts[host]

    async def _get(
        self, http: SiteHttp, path: str, params: Params = (), *, auth_in: str = "header"
    ) -> tuple[int, Any]:
        """An authenticated GET; one renewal and retry on a 401.

        The manual puts the token in a different place per route: the `Authorization:
        ManythingToken` header (`auth_in="header"`) for the authenticator, `/cameras/status`
        and the realtime stream; `token=` in the query (`"query"`) for `/alert` and
        `/sendcameratask`. A logger reads it only there.
        """
        for attempt in (1, 2):
            token = await self._auth_token()
            query = list(params.items()) if isinstance(params, Mapping) else list(params)
            headers: dict[str, str] = {}
            if auth_in == "query":
                query.append(("token", token))
            else:
                headers["Authorization"] = f"ManythingToken {token}"
            try:
                async with http.request("GET", path, params=query, headers=headers) as response:
                    payload = await read_json(response, self._problems, f"GET {path}")
                    status = response.status
            except TransportError as exc:
                raise _without_token(exc, token) from None
            if status == 401 and attempt == 1:
                self._invalidate(token)
                continue
            if status == 401:
                raise AuthenticationFailed(f"GET {path}: a fresh token is refused")
            return status, payload
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ devices

    async def _ensure_devices(self) -> None:
        now = time.monotonic()
        stale = self._devices_at is None or now - self._devices_at > self._options.devices_refresh_s
        if not stale and not self._refresh_devices_now:
            return
        status, payload = await self._get(self._auth_http, "/devices")
        if status != 200 or not isinstance(payload, dict):
            raise BadDeviceResponse(f"GET /devices answered {status}: {error_text(payload)}")
        listed = _flatten_devices(_result(payload))
        wanted = set(self._options.devices) if self._options.devices else None
        devices = {u: d for u, d in listed.items() if wanted is None or u in wanted}
        if wanted:
            missing = wanted - set(listed)
            if missing:
                self._problems.bad_input(
                    "devices", f"options.devices not on the account: {sorted(missing)}"
                )
        await self._load_loggers(devices)
        self._report_unwatched(devices)
        self._devices = devices
        self._devices_at = now
        self._refresh_devices_now = False

    async def _load_loggers(self, devices: dict[str, _Device]) -> None:
        uidds = list(devices)
        for start in range(0, len(uidds), 50):  # uidds go in the query: keep URLs short
            chunk = uidds[start : start + 50]
            status, payload = await self._get(
                self._auth_http, "/devices/viewerInfo", [("uidd", u) for u in chunk]
            )
            if status != 200 or not isinstance(payload, dict):
                raise BadDeviceResponse(f"GET /devices/viewerInfo answered {status}")
            for uidd, info in _flatten_devices(_result(payload)).items():
                if uidd in devices and info.logger:
                    devices[uidd].logger = info.logger

    def _report_unwatched(self, devices: dict[str, _Device]) -> None:
        """A device without a logger cannot be watched: say so (logged once per site,
        counted at every device refresh), never skip it silently."""
        unwatched = sorted(uidd for uidd, device in devices.items() if not device.logger)
        self._unwatched = unwatched
        if unwatched:
            self._problems.bad_input(
                "device_without_logger",
                f"viewerInfo names no logger for {', '.join(unwatched)}: not watched",
            )

    def _by_logger(self) -> dict[str, list[str]]:
        by_logger: dict[str, list[str]] = {}
        for device in self._devices.values():
            if device.logger:
                by_logger.setdefault(device.logger, []).append(device.uidd)
        return by_logger

    def _logger_up(self, logger: str) -> bool:
        return time.monotonic() >= self._logger_down_until.get(logger, 0.0)

    def _logger_unreachable(self, logger: str, error: Exception) -> None:
        """Leave `logger` out of catch-ups and status reads for a while: one logger that
        does not answer must not cost every poll a request timeout."""
        self._logger_down_until[logger] = time.monotonic() + LOGGER_RETRY_S
        self._problems.bad_input("logger_unreachable", f"logger {logger}: {error}")

    def _reconcile(self) -> None:
        """Each `residency_check_s`, ask every logger for `/cameras/status`, in the background
        (a logger that does not answer holds up no poll): a device it no longer lists has
        moved, and each camera's `status` goes into the inbox like a live record, so a change
        that fell into a stream gap, or a camera that was already offline, is not missed."""
        now = time.monotonic()
        if (
            self._residency_at is not None
            and now - self._residency_at < self._options.residency_check_s
        ):
            return
        self._residency_at = now
        for logger, uidds in self._by_logger().items():
            running = self._status_reads.get(logger)
            if self._logger_up(logger) and (running is None or running.done()):
                self._status_reads[logger] = asyncio.create_task(
                    self._reconcile_logger(logger, uidds), name=f"videoloft-status:{logger}"
                )

    async def _reconcile_logger(self, logger: str, uidds: list[str]) -> None:
        try:
            status, payload = await self._get(
                self._host(logger), "/cameras/status", [("uidd", u) for u in sorted(uidds)]
            )
        except TransportError as exc:
            self._logger_unreachable(logger, exc)
            return
        except VendorError as exc:
            self._problems.bad_input("camera_status", f"logger {logger}: {exc}")
            return
        listed = _device_entries(_result(payload)) if status == 200 else {}
        if set(uidds) - set(listed):
            log.info("videoloft_devices_moved", site_id=self.site_id, logger=logger)
            self._refresh_devices_now = True
        seen_ms = _now_ms()
        for uidd in uidds:
            camera_status = listed.get(uidd, {}).get("status")
            if isinstance(camera_status, str):
                record = {"type": "liveSession", "data": {"uidd": uidd, "status": camera_status}}
                self._inbox.records.append((logger, record, seen_ms))

    def _logger_http(self, uidd: str) -> SiteHttp:
        device = self._devices.get(uidd)
        if device is None or not device.logger:
            raise BadDeviceResponse(f"device {uidd} has no logger (not on this account?)")
        return self._host(device.logger)

    # ------------------------------------------------------------------ live long-polls

    def _ensure_streams(self) -> None:
        """One running long-poll per logger, for exactly the devices it serves."""
        wanted = {logger: set(uidds) for logger, uidds in self._by_logger().items()}
        for logger, stream in list(self._streams.items()):
            if stream.task.done() or stream.uidds != frozenset(wanted.get(logger, ())):
                stream.task.cancel()
                del self._streams[logger]
        for logger, uidds in wanted.items():
            if logger not in self._streams:
                task = asyncio.create_task(
                    self._stream(logger, frozenset(uidds)), name=f"videoloft-live:{logger}"
                )
                self._streams[logger] = _LiveStream(frozenset(uidds), task)

    async def _stream(self, logger: str, uidds: frozenset[str]) -> None:
        """Hold the long-poll until the planned reconnect, a drop, or an error."""
        http = self._host(logger)
        hold = self._options.reconnect_after_s * random.uniform(0.85, 1.0)
        decoder = StreamDecoder()
        try:
            token = await self._auth_token()
            async with http.request(
                "GET",
                "/cameras/realtime/live",
                params=[("uidd", u) for u in sorted(uidds)],
                headers={"Authorization": f"ManythingToken {token}"},
                timeout_s=hold + 30,
                read_timeout_s=hold + 30,
            ) as response:
                if response.status == 401:
                    self._invalidate(token)
                    self._stream_failed(logger, "long-poll refused the token (401)")
                    return
                if response.status != 200:
                    self._refresh_devices_now = True  # a logger that stops answering
                    self._stream_failed(logger, f"long-poll answered {response.status}")
                    return
                self._stream_connected(logger, uidds)
                await asyncio.wait_for(self._read_stream(response, logger, decoder), timeout=hold)
        except TimeoutError:
            return  # the planned reconnect, ahead of the server's cut
        except (TransportError, VendorError, aiohttp.ClientError) as exc:
            # VendorError: a token renewal refused (AuthenticationFailed) or answered over the
            # size cap; the poll meets the same refusal and reports it. Nothing may escape a
            # task nobody awaits.
            log.info("videoloft_live_dropped", site_id=self.site_id, logger=logger, error=str(exc))
            if isinstance(exc, VendorError) or (isinstance(exc, TransportError) and not exc.sent):
                self._stream_failed(logger, str(exc))  # could not even connect

    def _stream_connected(self, logger: str, uidds: frozenset[str]) -> None:
        """The logger answered the long-poll: from now on it sends every update, and what
        happened before this moment (since the last connection) must come from /alert. The
        gap ends here, not when the request was sent: the logger sends nothing from before
        it registered the connection."""
        self._stream_failures.pop(logger, None)
        self._logger_down_until.pop(logger, None)
        # A logger may also answer first and register a moment later (the manual does not
        # say): the gap is read at once, and once more after live_settle_s.
        until = _now_ms() + int(self._options.live_settle_s * 1000)
        self._inbox.add_gaps(dict.fromkeys(uidds, until))
        self._connected_at[logger] = time.time()

    def _stream_failed(self, logger: str, error: str) -> None:
        count, _ = self._stream_failures.get(logger, (0, ""))
        self._stream_failures[logger] = (count + 1, error)

    def _no_live_stream(self) -> str | None:
        """Why no logger in use has a live long-poll, or None while one does."""
        loggers = {d.logger for d in self._devices.values() if d.logger}
        failing = {
            logger: self._stream_failures[logger]
            for logger in loggers
            if self._stream_failures.get(logger, (0, ""))[0] >= STREAM_FAILURES_DOWN
        }
        if not loggers or len(failing) < len(loggers):
            return None
        logger, (count, error) = next(iter(sorted(failing.items())))
        return f"no live long-poll: logger {logger} failed {count} times in a row ({error})"

    async def _read_stream(
        self, response: aiohttp.ClientResponse, logger: str, decoder: StreamDecoder
    ) -> None:
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split characters
        async for chunk in response.content.iter_any():
            records, garbage = decoder.feed(text.decode(chunk))
            for fragment in garbage:
                self._problems.bad_input(
                    "live_record", f"unreadable long-poll record: {fragment!r}"
                )
            seen_ms = _now_ms()
            self._inbox.records.extend((logger, record, seen_ms) for record in records)

    # ------------------------------------------------------------------ polling

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
        self._ensure_streams()
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

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        await self._ensure_devices()
        uidd, alert_id = str(locator.get("uidd")), locator.get("alert_id")
        device = self._devices.get(uidd)
        if device is None or not device.logger or not isinstance(alert_id, int):
            return MediaProbe("unavailable", detail=f"device {uidd} is not on the account")
        if kind is MediaKind.THUMBNAIL:
            return MediaProbe("ready", path=f"thumb|{device.logger}|{uidd}|{alert_id}")
        known_end = locator.get("end_ms")
        if isinstance(known_end, int) and time.time() < known_end / 1000 + self._options.tail_s:
            return MediaProbe("pending", detail="waiting for the recording tail after the alert")
        # Motion that goes on moves the alert's end later: read it again before the clip.
        current = await self._alert_now(uidd, alert_id)
        end_ms = current.end_ms if current is not None else known_end
        if not isinstance(end_ms, int):
            return MediaProbe("pending", detail="the alert is still going on")
        if time.time() < end_ms / 1000 + self._options.tail_s:
            return MediaProbe("pending", detail="the alert's end moved: waiting for its tail")
        start_ms = int(locator.get("start_ms") or alert_id * 1000)
        rom = _rom(current) if current is not None else locator.get("rom", 1)
        return MediaProbe(
            "ready",
            path=f"mp4|{device.logger}|{uidd}|{alert_id}|{start_ms // 1000}|{end_ms // 1000}|{rom}",
        )

    async def _alert_now(self, uidd: str, alert_id: int) -> VlAlert | None:
        """The alert as /alert lists it now (newest first: a recent alert is near the top)."""
        offset = 0
        for _page in range(MAX_PAGES_PER_POLL):
            page = await self._alert_page(uidd, offset, self._options.page_size)
            for alert in page:
                if alert.id == alert_id:
                    return alert
            if len(page) < self._options.page_size or page[-1].id < alert_id:
                return None
            offset += len(page)
        return None

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        """`path` is our own locator (`thumb|logger|uidd|id`, `getthumb|logger|uidd|time` or
        `mp4|...`), never a URL. The token goes where the manual puts it: in the path of
        thumbnails, in the query of the MP4."""
        kind, logger, uidd, alert_id, *rest = path.split("|")
        if logger not in {d.logger for d in self._devices.values()}:
            raise BadDeviceResponse(f"logger {logger} is not one the account uses")
        http = self._host(logger)
        token = await self._auth_token()
        if kind == "thumb":
            request = http.request("GET", f"/alertthumb/{uidd}/{alert_id}/{token}")
        elif kind == "getthumb":  # alert_id is the capture time (`lastthumb`) here
            request = http.request("GET", f"/getthumb/{uidd}/{alert_id}/{token}")
        else:
            params = {
                "uid": uidd,
                "startt": rest[0],
                "endt": rest[1],
                "rom": rest[2] if len(rest) > 2 else "1",
                "id": alert_id,
                "buildmp4": "1",
                "token": token,
            }
            request = http.request(
                "GET", "/alerturl.m3u8", params=params, timeout_s=600.0, read_timeout_s=60.0
            )
        try:
            async with request as response:
                if response.status in (404, 202):
                    raise MediaNotReady(
                        f"{kind} of {uidd}:{alert_id} not ready ({response.status})"
                    )
                if response.status == 401:
                    self._invalidate(token)
                    raise MediaNotReady(f"{kind} of {uidd}:{alert_id}: token refused, renewing")
                if response.status != 200:
                    raise BadDeviceResponse(
                        f"{kind} of {uidd}:{alert_id} answered {response.status}"
                    )
                yield Download(
                    content_type=response.content_type,
                    content_length=response.content_length,
                    chunks=response.content.iter_chunked(256 * 1024),
                )
        except TransportError as exc:
            # The thumb URL carries the token in its path: never let it reach a message.
            raise _without_token(exc, token) from None

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        await self._ensure_devices()
        uidd = action.target.strip()
        if uidd not in self._devices:
            raise InvalidAction(f"target must be a uidd of this account, not {action.target!r}")
        if action.kind == "snapshot_request":
            return await self._snapshot(action, uidd)
        if action.kind == "record":
            return await self._record(uidd, action.params.get("duration_s", 60))
        raise InvalidAction(
            f"videoloft has no action {action.kind!r} (it has: {', '.join(sorted(self.actions))})"
        )

    async def _record(self, uidd: str, duration: Any) -> ActionResult:
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise InvalidAction(f"params.duration_s must be a positive number, not {duration!r}")
        started = time.monotonic()
        sent = 0
        while True:
            await self._camera_task(uidd, "triggerevent")
            sent += 1
            remaining = duration - (time.monotonic() - started)
            if remaining <= TRIGGER_EVERY_S:
                break  # the recording runs ~20 s past the last trigger: that covers the rest
            await asyncio.sleep(TRIGGER_EVERY_S)
        return ActionResult(result={"triggers_sent": sent, "duration_s": duration})

    async def _snapshot(self, action: Action, uidd: str) -> ActionResult:
        """capturethumb only asks the camera for an image: the manual's way to get it is
        `lastthumb` in /cameras/status, then /getthumb. The image is stored under the media
        directory (`<site>/<yyyy>/<mm>/<dd>/<action id>-action-snapshot.jpg`) and its path
        is the action's result."""
        before = await self._last_thumb(uidd)
        answer = await self._camera_task(uidd, "capturethumb")
        taken = await self._new_thumb(uidd, before)
        path = f"getthumb|{self._devices[uidd].logger}|{uidd}|{taken}"
        image = await self._keep_image(action, path)
        return ActionResult(result={"answer": answer, "thumb_time": taken, **image})

    async def _last_thumb(self, uidd: str) -> int | None:
        status, payload = await self._get(
            self._logger_http(uidd), "/cameras/status", [("uidd", uidd)]
        )
        if status != 200:
            raise BadDeviceResponse(f"GET /cameras/status for {uidd} answered {status}")
        return as_id(_device_entries(_result(payload)).get(uidd, {}).get("lastthumb"))

    async def _new_thumb(self, uidd: str, before: int | None) -> int:
        """The `lastthumb` the camera reports once it took the thumb asked for."""
        deadline = time.monotonic() + CAPTURE_WAIT_S
        while True:
            taken = await self._last_thumb(uidd)
            if taken is not None and (before is None or taken > before):
                return taken
            if time.monotonic() >= deadline:
                raise BadDeviceResponse(
                    f"{uidd} reported no new thumb within {CAPTURE_WAIT_S:g} s of capturethumb"
                )
            await asyncio.sleep(CAPTURE_POLL_S)

    async def _keep_image(self, action: Action, path: str) -> dict[str, Any]:
        """Download the image at `path` and store it (when the daemon gave a media root)."""
        async with self.download(path) as image:
            if self._media_root is None:  # the probe: download it, keep nothing
                size = 0
                async for chunk in image.chunks:
                    size += len(chunk)
                return {"image_bytes": size, "content_type": image.content_type}
            try:
                stored = await store_stream(
                    image.chunks,
                    root=self._media_root,
                    site_id=self.site_id,
                    alarm_id=action.id,
                    kind="action-snapshot",
                    occurred_at=datetime.now(UTC),
                    max_bytes=MAX_IMAGE_BYTES,
                )
            except MediaTooLarge as exc:
                raise BadDeviceResponse(f"captured image of {action.target}: {exc}") from None
        return {
            "path": stored.path,
            "image_bytes": stored.size_bytes,
            "content_type": stored.content_type,
        }

    async def _camera_task(self, uidd: str, task: str) -> Any:
        status, payload = await self._get(
            self._logger_http(uidd),
            "/sendcameratask",
            {"uid": uidd, "action": task},
            auth_in="query",
        )
        if 200 <= status < 300:
            return payload
        if status == 404:
            self._refresh_devices_now = True
        if 400 <= status < 500:
            raise DeviceRefused(
                f"sendcameratask {task} refused ({status}): {error_text(payload)}",
                answer=payload if isinstance(payload, dict) else None,
            )
        raise BadDeviceResponse(f"sendcameratask {task} answered {status}")

    async def describe(self) -> dict[str, Any]:
        await self._ensure_devices()
        return {
            "devices (uidd: name @ logger)": {
                uidd: f"{d.name} @ {d.logger}" for uidd, d in sorted(self._devices.items())
            },
            "not watched (viewerInfo names no logger)": list(self._unwatched),
        }

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        """Commissioning: the live stream of every logger connects, and what the vendor
        offers as media (an alert's thumbnail and MP4, a thumb captured now) downloads."""
        return {
            "live stream of every logger": self._probe_streams,
            "one snapshot": self._probe_media,
        }

    async def _probe_streams(self) -> str:
        await self._ensure_devices()
        self._ensure_streams()
        loggers = sorted(self._by_logger())
        deadline = time.monotonic() + PROBE_STREAM_WAIT_S
        while time.monotonic() < deadline:
            if all(logger in self._connected_at for logger in loggers):
                return "\n".join(f"{logger}: connected" for logger in loggers)
            await asyncio.sleep(0.1)
        missing = [logger for logger in loggers if logger not in self._connected_at]
        failures = {
            logger: self._stream_failures.get(logger, (0, "no answer"))[1] for logger in missing
        }
        raise BadDeviceResponse(
            f"live stream not connected within {PROBE_STREAM_WAIT_S:g} s: {failures}"
        )

    async def _probe_media(self) -> str:
        await self._ensure_devices()
        lines = []
        for alarm in await self.recent_alarms(1):
            for media in alarm.media:
                what = f"alert {alarm.source_id} {media.kind.value}"
                probe = await self.media_status(media.kind, media.locator)
                if probe.state != "ready" or probe.path is None:
                    lines.append(f"{what}: {probe.state} ({probe.detail})")
                    continue
                try:
                    size, content_type = await self._download_size(probe.path)
                except MediaNotReady as exc:  # a fresh alert: the logger has not got it yet
                    lines.append(f"{what}: not served yet ({exc})")
                    continue
                lines.append(f"{what}: {size} bytes ({content_type})")
        uidd = next((u for u, d in sorted(self._devices.items()) if d.logger), None)
        if uidd is None:
            raise BadDeviceResponse("no device with a logger to capture a thumb from")
        before = await self._last_thumb(uidd)
        await self._camera_task(uidd, "capturethumb")
        taken = await self._new_thumb(uidd, before)
        size, content_type = await self._download_size(
            f"getthumb|{self._devices[uidd].logger}|{uidd}|{taken}"
        )
        lines.append(f"thumb captured now on {uidd}: {size} bytes ({content_type})")
        return "\n".join(lines)

    async def _download_size(self, path: str) -> tuple[int, str | None]:
        size = 0
        async with self.download(path) as download:
            async for chunk in download.chunks:
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    break
        return size, download.content_type

    async def recent_alarms(self, count: int) -> list[Alarm]:
        await self._ensure_devices()
        alarms: list[Alarm] = []
        for uidd in sorted(self._devices):
            alarms += [self._alarm(a) for a in await self._alert_page(uidd, 0, count)]
        return sorted(alarms, key=lambda alarm: alarm.occurred_at, reverse=True)[:count]

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [s.task for s in self._streams.values()]
        tasks += [*self._status_reads.values(), *self._catch_ups.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        self._streams.clear()
        self._status_reads.clear()
        self._catch_ups.clear()


# ---------------------------------------------------------------------- cursor


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
        return {
            "floor": self.floor,
            "offset": self.offset,
            "top": self.top,
            "until": self.until,
            "read": self.read,
        }


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


# ---------------------------------------------------------------------- helpers


def _result(payload: Any) -> Any:
    if isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    return payload if payload is not None else {}


def _login_token(payload: Any) -> str | None:
    """The authToken of a login answer, or None when it has none (`{}`, `{"result": 1.0}`)."""
    result = _result(payload)
    token = result.get("authToken") if isinstance(result, dict) else None
    return token if isinstance(token, str) and token else None


def _without_token(exc: TransportError, token: str) -> TransportError:
    """The same error with the token (in a query or a path) out of its message."""
    return type(exc)(str(exc).replace(token, "[token]"), sent=exc.sent)


def _rom(alert: VlAlert) -> int:
    """`rom` of the alert's MP4: 0 when the camera was recording 24/7, 1 (record on motion,
    the manual's "usually") otherwise or when the alert does not say."""
    return 0 if as_int(alert.raw.get("rom")) == 0 else 1


def _cookie(response: aiohttp.ClientResponse) -> str | None:
    cookies = [f"{name}={morsel.value}" for name, morsel in response.cookies.items()]
    return "; ".join(cookies) or None


def _record_device(record: Any) -> str | None:
    """The uidd a long-poll record is about, whatever its wrapping."""
    data = record.get("data") if isinstance(record, dict) else None
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        data = data["data"]
    if not isinstance(data, dict):
        return None
    device = data.get("uidd") or data.get("uid")
    return str(device) if device else None


def _device_entries(result: Any) -> dict[str, dict[str, Any]]:
    """`{owner uid: {"devices": {id: {...}}, "alias": ...}}` -> {uidd: its entry}."""
    entries: dict[str, dict[str, Any]] = {}
    if not isinstance(result, dict):
        return entries
    for owner in result.values():
        if not isinstance(owner, dict) or not isinstance(owner.get("devices"), dict):
            continue
        for item in owner["devices"].values():
            uidd_value = item.get("uidd") or item.get("uid") if isinstance(item, dict) else None
            if isinstance(item, dict) and uidd_value:
                entries[str(uidd_value)] = item
    return entries


def _flatten_devices(result: Any) -> dict[str, _Device]:
    """Every device of a `/devices` or `viewerInfo` answer."""
    return {
        uidd: _Device(
            uidd=uidd,
            name=str(item.get("phonename") or uidd),
            logger=str(item["logger"]) if item.get("logger") else None,
        )
        for uidd, item in _device_entries(result).items()
    }


def _now_ms() -> int:
    return int(time.time() * 1000)
