"""Videoloft cloud accounts (API 1.0.8). One configured site is one account.

The account's cameras ("devices", `uid.deviceid`, e.g. `12345.63`) live on logger servers
that the authenticator names; alerts arrive in real time on each logger's
`/cameras/realtime/live` long-poll, and `/alert` lists them afterwards.

How we use it:
- Session: `POST {authenticator}/login` with `{email, password}`; a `{location}` answer means
  "log in at that regional authenticator". Tokens live 20 minutes and carry their issue time
  and lifetime (`base64("uid:issued:ttl:...")*signature`): we renew at 3/4 of the lifetime
  with the login cookie (`caller=cookielogin`), and log in with the password when that fails.
  One renewal at a time.
- Devices from `/devices` (every owner the account can see), their loggers from
  `/devices/viewerInfo`, refreshed every 10 minutes and at once when a logger stops
  answering for a device. Hosts handed back are contacted with the site URL's scheme.
- One long-poll per logger, held by a background task and reopened before the server's
  5-minute cut (with jitter) and after any drop. Every (re)connection is a gap: before the
  records that arrive on the new connection are committed, `/alert` is read back to the
  device's cursor (the newest alert id committed), so an alert of the gap is ingested once.
- Framing of the long-poll is not known publicly: SSE `data:` lines, newline-delimited JSON
  and back-to-back JSON objects are all accepted (`StreamDecoder`).
- `/alert` spells its fields several ways (id as `alert`/`id`; end as `endt`, `endtt`, `enddt`,
  `end`; times in ms or s): `normalize_alert` reads them all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from pydantic import ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
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
)
from cms_ingest.vendors.common import (
    MAX_JSON_DEPTH,
    as_id,
    error_text,
    finite_float,
    json_deeper_than,
    no_json_constant,
    read_json,
)

VENDOR = "videoloft"
log = structlog.get_logger("cms_ingest.vendors.videoloft")

DEFAULT_TOKEN_TTL_S = 1200.0
RENEW_AT = 0.75  # of the token's lifetime: 15 of 20 minutes
TRIGGER_EVERY_S = 15.0
# A logger whose long-poll failed this many times in a row counts as not answering; when
# every logger in use is in that state the poll fails (supervision: "no live long-poll").
STREAM_FAILURES_DOWN = 3  # triggerevent keeps a recording going for ~20 s after each call
OFFLINE_STATES = frozenset({"offline", "novideo"})
EVENT_TYPES = {"motion": EventType.MOTION, "audio": EventType.AUDIO}
_END_FIELDS = ("endt", "endtt", "enddt", "end")
_SECONDS_BEFORE = 100_000_000_000  # a "time" below this is in seconds, not milliseconds
# What a datetime holds, in ms since the epoch: 0001-01-01 to 9999-12-31.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999


class VideoloftOptions(SiteOptions):
    """`options:` of a Videoloft account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[str] | None = None  # restrict to these uidds (default: every device)
    reconnect_after_s: float = Field(default=240.0, gt=0)  # before the server's 5-minute cut
    devices_refresh_s: float = Field(default=600.0, gt=0)
    residency_check_s: float = Field(default=60.0, gt=0)  # are devices still on their logger?
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
    return _datetime_ms(int(number * 1000 if number < _SECONDS_BEFORE else number))


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


class StreamDecoder:
    """Records from a long-poll body: SSE `data:` lines, NDJSON or back-to-back JSON.

    Read like any device JSON (`common.load_json`): NaN, Infinity and numbers past a float
    become None, and a record nested deeper than MAX_JSON_DEPTH is unreadable.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = json.JSONDecoder(parse_constant=no_json_constant, parse_float=finite_float)

    def feed(self, chunk: str) -> tuple[list[Any], list[str]]:
        """(complete records, unreadable fragments) after adding `chunk`."""
        self._buffer += chunk
        records: list[Any] = []
        garbage: list[str] = []
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                break
            if text.startswith("data:"):
                text = text[5:]
                self._buffer = text
                continue
            if text[0] in ":" or text.startswith(("event:", "id:", "retry:")):
                line_end = text.find("\n")
                if line_end < 0:
                    self._buffer = text
                    break
                self._buffer = text[line_end + 1 :]
                continue
            try:
                record, end = self._decoder.raw_decode(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                # RecursionError: nested too deep to parse (perhaps not complete yet either).
                at_end = isinstance(exc, json.JSONDecodeError) and exc.pos >= len(text) - 1
                if at_end or "\n" not in text:
                    self._buffer = text  # incomplete: wait for more
                    break
                line_end = text.find("\n")
                garbage.append(text[:line_end][:200])
                self._buffer = text[line_end + 1 :]
                continue
            if json_deeper_than(record, MAX_JSON_DEPTH):
                garbage.append(text[:end][:200])
            else:
                records.append(record)
            self._buffer = text[end:]
        return records, garbage


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


@dataclass(slots=True)
class _Inbox:
    """What the long-polls delivered since the last poll, and the gaps that need catch-up."""

    records: list[tuple[str, Any]] = field(default_factory=list)  # (logger, record)
    gaps: set[str] = field(default_factory=set)  # uidds whose stream was (re)opened

    def merge_before(self, earlier: _Inbox) -> None:
        """Put an earlier, undelivered batch back in front of this one."""
        self.records[:0] = earlier.records
        self.gaps |= earlier.gaps


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
        self._unacked = _Inbox()
        self._returned_cursor: Cursor | None = None
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
            if payload.get("location") and not _result(payload).get("authToken"):
                http = self._host(str(payload["location"]))
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
        if status != 200 or not isinstance(payload, dict) or not _result(payload).get("authToken"):
            raise AuthenticationFailed(f"token renewal refused (HTTP {status})")
        self._accept_login(payload, cookie or self._token.cookie, self._auth_http)

    def _accept_login(self, payload: Mapping[str, Any], cookie: str | None, http: SiteHttp) -> None:
        result = _result(payload)
        token = str(result["authToken"])
        authenticator = result.get("authenticator")
        self._auth_http = self._host(str(authenticator)) if authenticator else http
        info = result.get("accountInfo")
        if isinstance(info, dict) and isinstance(info.get("maxAge"), int | float):
            self._max_age_ms = int(float(info["maxAge"]) * 86_400_000)
        lifetime = token_lifetime(token)
        issued, ttl = lifetime if lifetime else (time.time(), DEFAULT_TOKEN_TTL_S)
        self._token.value = token
        self._token.renew_at = issued + ttl * RENEW_AT
        self._token.cookie = cookie

    def _host(self, host: str) -> SiteHttp:
        """A server the API named (authenticator, logger): our scheme, checked host."""
        host = host.split("://", 1)[-1].rstrip("/")
        if host not in self._hosts:
            self._hosts[host] = self._http.for_host(host)
        return self._hosts[host]

    async def _get(self, http: SiteHttp, path: str, params: Any = None) -> tuple[int, Any]:
        """An authenticated GET (header token); one renewal and retry on a 401."""
        for attempt in (1, 2):
            token = await self._auth_token()
            headers = {"Authorization": f"ManythingToken {token}"}
            async with http.request("GET", path, params=params, headers=headers) as response:
                payload = await read_json(response, self._problems, f"GET {path}")
                status = response.status
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

    async def _check_residency(self) -> None:
        """A logger silently stops serving a device that moved: ask each logger now and then."""
        now = time.monotonic()
        if (
            self._residency_at is not None
            and now - self._residency_at < self._options.residency_check_s
        ):
            return
        self._residency_at = now
        by_logger: dict[str, list[str]] = {}
        for device in self._devices.values():
            if device.logger:
                by_logger.setdefault(device.logger, []).append(device.uidd)
        for logger, uidds in by_logger.items():
            status, payload = await self._get(
                self._host(logger), "/cameras/status", [("uidd", u) for u in sorted(uidds)]
            )
            resident = set(_flatten_devices(_result(payload))) if status == 200 else set()
            if set(uidds) - resident:
                log.info("videoloft_devices_moved", site_id=self.site_id, logger=logger)
                self._refresh_devices_now = True
                return

    def _logger_http(self, uidd: str) -> SiteHttp:
        device = self._devices.get(uidd)
        if device is None or not device.logger:
            raise BadDeviceResponse(f"device {uidd} has no logger (not on this account?)")
        return self._host(device.logger)

    # ------------------------------------------------------------------ live long-polls

    def _ensure_streams(self) -> None:
        """One running long-poll per logger, for exactly the devices it serves."""
        wanted: dict[str, set[str]] = {}
        for device in self._devices.values():
            if device.logger:
                wanted.setdefault(device.logger, set()).add(device.uidd)
        for logger, stream in list(self._streams.items()):
            if stream.task.done() or stream.uidds != frozenset(wanted.get(logger, ())):
                stream.task.cancel()
                del self._streams[logger]
        for logger, uidds in wanted.items():
            if logger not in self._streams:
                # A new connection: whatever happened before it must come from /alert.
                self._inbox.gaps |= uidds
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
                self._stream_failures.pop(logger, None)  # connected: the logger answers
                await asyncio.wait_for(self._read_stream(response, logger, decoder), timeout=hold)
        except TimeoutError:
            return  # the planned reconnect, ahead of the server's cut
        except (TransportError, BadDeviceResponse, aiohttp.ClientError) as exc:
            # BadDeviceResponse: e.g. a token renewal answered over the size cap.
            log.info("videoloft_live_dropped", site_id=self.site_id, logger=logger, error=str(exc))
            if isinstance(exc, TransportError) and not exc.sent:
                self._stream_failed(logger, str(exc))  # could not even connect

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
        async for chunk in response.content.iter_any():
            records, garbage = decoder.feed(chunk.decode("utf-8", errors="replace"))
            for fragment in garbage:
                self._problems.bad_input(
                    "live_record", f"unreadable long-poll record: {fragment!r}"
                )
            self._inbox.records.extend((logger, record) for record in records)

    # ------------------------------------------------------------------ polling

    async def poll(self, cursor: Cursor | None) -> PollResult:
        """Gaps caught up from /alert, then what the long-polls delivered.

        Live records exist only once, so a batch is kept until the poller shows (by passing
        the cursor we returned) that it was committed; otherwise it is delivered again.
        """
        if cursor != self._returned_cursor:
            self._inbox.merge_before(self._unacked)  # the last batch was not committed
        self._unacked = _Inbox()
        await self._auth_token()  # renew ahead of expiry even while only long-polls are open
        await self._check_residency()
        await self._ensure_devices()
        self._ensure_streams()
        broken = self._no_live_stream()
        if broken is not None:
            raise BadDeviceResponse(broken)  # supervision counts it; streams keep retrying
        inbox, self._inbox = self._inbox, _Inbox()
        try:
            result, delivered = await self._collect(inbox, _CursorState.load(cursor))
        except BaseException:
            self._inbox.merge_before(inbox)
            raise
        self._unacked = delivered  # what was deferred is back in the inbox already
        self._returned_cursor = result.cursor
        return result

    async def _collect(self, inbox: _Inbox, state: _CursorState) -> tuple[PollResult, _Inbox]:
        """This poll's result, and the part of `inbox` it delivered (the rest is deferred)."""
        alerts: dict[tuple[str, int], VlAlert] = {}
        notes: list[str] = []
        pending: set[str] = set()  # devices whose gap could not be read back yet
        for uidd in sorted(inbox.gaps & set(self._devices)):
            try:
                caught = await self._catch_up(uidd, state)
            except (TransportError, BadDeviceResponse) as exc:
                # One logger down must not hold back the other cameras: this device keeps
                # its gap (and its live records) for a later poll, everyone else goes on.
                self._problems.bad_input("catch_up", f"{uidd}: cannot read /alert back: {exc}")
                pending.add(uidd)
                continue
            for alert in caught:
                alerts[(alert.uidd, alert.id)] = alert
            if len(caught) > 1:
                notes.append(f"{uidd}: caught up {len(caught)} alerts after a gap")
        deferred = _Inbox(gaps=pending)
        delivered = _Inbox(gaps=inbox.gaps - pending)
        statuses: list[tuple[str, str, int]] = []
        for logger, record in inbox.records:
            if _record_device(record) in pending:
                deferred.records.append((logger, record))  # never past an unread gap
                continue
            delivered.records.append((logger, record))
            self._take_record(record, alerts, statuses)
        self._inbox.merge_before(deferred)
        alarms = [self._alarm(alert) for alert in sorted(alerts.values(), key=lambda a: a.id)]
        for alert in alerts.values():
            state.advance(alert.uidd, alert.id)
        alarms += self._status_alarms(statuses, state)
        return PollResult(alarms=alarms, cursor=state.dump(), notes=notes), delivered

    def _take_record(
        self,
        record: Any,
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
                when = _millis(data.get("lastactivity")) or int(time.time() * 1000)
                statuses.append((uidd, status, when))

    async def _catch_up(self, uidd: str, state: _CursorState) -> list[VlAlert]:
        """Alerts of `uidd` after its cursor, from /alert (newest first, paged)."""
        known = state.last_id(uidd)
        floor = known
        if known is None:  # first sight of this device: start from its newest alert
            if self._options.backfill is None:
                newest = await self._alert_page(uidd, 0, 1)
                state.advance(uidd, newest[0].id if newest else 0)
                return []
            floor = int(time.time() - self._options.backfill) - 1
        found: list[VlAlert] = []
        offset = 0
        while True:
            page = await self._alert_page(uidd, offset, self._options.page_size)
            fresh = [alert for alert in page if alert.id > (floor or 0)]
            found.extend(fresh)
            if len(fresh) < len(page) or len(page) < self._options.page_size:
                break
            offset += len(page)
        if known is None:
            state.advance(uidd, max((a.id for a in found), default=floor or 0))
        return found

    async def _alert_page(self, uidd: str, offset: int, limit: int) -> list[VlAlert]:
        params = {"uid": uidd, "startt": "1", "offset": str(offset), "limit": str(limit)}
        if self._max_age_ms:
            params["maxage"] = str(self._max_age_ms)
        status, payload = await self._get(self._logger_http(uidd), "/alert", params)
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
                    },
                ),
            ),
        )

    def _status_alarms(
        self, statuses: list[tuple[str, str, int]], state: _CursorState
    ) -> list[Alarm]:
        """camera_offline when a camera leaves `live`, camera_online when it returns."""
        alarms = []
        for uidd, status, when in statuses:
            previous = state.status(uidd)
            state.set_status(uidd, status)
            went_down = (
                status in OFFLINE_STATES and previous is not None and previous not in OFFLINE_STATES
            )
            came_back = status not in OFFLINE_STATES and previous in OFFLINE_STATES
            if not (went_down or came_back):
                continue
            device = self._devices.get(uidd)
            event = EventType.CAMERA_OFFLINE if went_down else EventType.CAMERA_ONLINE
            alarms.append(
                Alarm(
                    site_id=self.site_id,
                    vendor=VENDOR,
                    source_id=f"{uidd}:{status}:{when}",
                    event_type=event,
                    vendor_event=f"liveSession:{status}",
                    description=f"camera {device.name if device else uidd} is {status}",
                    occurred_at=datetime.fromtimestamp(when / 1000, UTC),
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
        end_ms = locator.get("end_ms")
        if not isinstance(end_ms, int):
            end_ms = await self._alert_end(uidd, alert_id)
        if end_ms is None:
            return MediaProbe("pending", detail="the alert is still going on")
        ready_at = end_ms / 1000 + self._options.tail_s
        if time.time() < ready_at:
            return MediaProbe("pending", detail="waiting for the recording tail after the alert")
        start_ms = int(locator.get("start_ms") or alert_id * 1000)
        return MediaProbe(
            "ready",
            path=f"mp4|{device.logger}|{uidd}|{alert_id}|{start_ms // 1000}|{end_ms // 1000}",
        )

    async def _alert_end(self, uidd: str, alert_id: int) -> int | None:
        offset = 0
        while offset < 10 * self._options.page_size:
            page = await self._alert_page(uidd, offset, self._options.page_size)
            for alert in page:
                if alert.id == alert_id:
                    return alert.end_ms
            if not page or page[-1].id < alert_id:
                return None
            offset += len(page)
        return None

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        """`path` is our own locator (`thumb|logger|uidd|id` or `mp4|...`), never a URL."""
        kind, logger, uidd, alert_id, *times = path.split("|")
        if logger not in {d.logger for d in self._devices.values()}:
            raise BadDeviceResponse(f"logger {logger} is not one the account uses")
        http = self._host(logger)
        token = await self._auth_token()
        if kind == "thumb":
            request = http.request("GET", f"/alertthumb/{uidd}/{alert_id}/{token}")
        else:
            params = {
                "uid": uidd,
                "startt": times[0],
                "endt": times[1],
                "rom": "1",
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
            raise type(exc)(str(exc).replace(token, "[token]"), sent=exc.sent) from None

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        await self._ensure_devices()
        uidd = action.target.strip()
        if uidd not in self._devices:
            raise InvalidAction(f"target must be a uidd of this account, not {action.target!r}")
        if action.kind == "snapshot_request":
            answer = await self._camera_task(uidd, "capturethumb")
            return ActionResult(result={"answer": answer})
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

    async def _camera_task(self, uidd: str, task: str) -> Any:
        status, payload = await self._get(
            self._logger_http(uidd), "/sendcameratask", {"uid": uidd, "action": task}
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
            }
        }

    async def recent_alarms(self, count: int) -> list[Alarm]:
        await self._ensure_devices()
        alarms: list[Alarm] = []
        for uidd in sorted(self._devices):
            alarms += [self._alarm(a) for a in await self._alert_page(uidd, 0, count)]
        return sorted(alarms, key=lambda alarm: alarm.occurred_at, reverse=True)[:count]

    async def close(self) -> None:
        for stream in self._streams.values():
            stream.task.cancel()
        if self._streams:
            await asyncio.wait([s.task for s in self._streams.values()], timeout=2)
        self._streams.clear()


# ---------------------------------------------------------------------- cursor


class _CursorState:
    """Per device: the newest alert id committed, and the last camera status seen."""

    def __init__(self, last_ids: dict[str, int], statuses: dict[str, str]) -> None:
        self._last_ids = last_ids
        self._statuses = statuses

    @classmethod
    def load(cls, cursor: Cursor | None) -> _CursorState:
        cursor = cursor or {}
        ids = cursor.get("last_ids") if isinstance(cursor.get("last_ids"), dict) else {}
        statuses = cursor.get("statuses") if isinstance(cursor.get("statuses"), dict) else {}
        return cls(
            {str(k): int(v) for k, v in (ids or {}).items()},
            {str(k): str(v) for k, v in (statuses or {}).items()},
        )

    def last_id(self, uidd: str) -> int | None:
        return self._last_ids.get(uidd)

    def advance(self, uidd: str, alert_id: int) -> None:
        self._last_ids[uidd] = max(alert_id, self._last_ids.get(uidd, 0))

    def status(self, uidd: str) -> str | None:
        return self._statuses.get(uidd)

    def set_status(self, uidd: str, status: str) -> None:
        self._statuses[uidd] = status

    def dump(self) -> dict[str, Any]:
        return {"last_ids": dict(self._last_ids), "statuses": dict(self._statuses)}


# ---------------------------------------------------------------------- helpers


def _result(payload: Any) -> Any:
    if isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    return payload if payload is not None else {}


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


def _flatten_devices(result: Any) -> dict[str, _Device]:
    """`{owner uid: {"devices": {id: {...}}, "alias": ...}}` -> {uidd: device}."""
    devices: dict[str, _Device] = {}
    if not isinstance(result, dict):
        return devices
    for owner in result.values():
        if not isinstance(owner, dict) or not isinstance(owner.get("devices"), dict):
            continue
        for item in owner["devices"].values():
            uidd_value = item.get("uidd") or item.get("uid") if isinstance(item, dict) else None
            if isinstance(item, dict) and uidd_value:
                uidd = str(uidd_value)
                devices[uidd] = _Device(
                    uidd=uidd,
                    name=str(item.get("phonename") or uidd),
                    logger=str(item["logger"]) if item.get("logger") else None,
                )
    return devices
