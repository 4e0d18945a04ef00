"""A simulated CamTrace CT-Server (Sirion 16, REST API v1.2), or many of them, over real HTTP.

The project's tests, the demo and the benchmark point the ingest daemon at this server instead
of a real CamTrace installation. One process can host many tenants: the ``default`` tenant
answers at the root and every other tenant under ``/t/<tenant>``.

Device behaviour reproduced (from the vendor manual and the integrators' notes):

* Every API path starts with ``/api/v1.2``; bodies are JSON, errors ``{"error": "..."}``.
  Every answer carries a ``Date`` header written in the *server's* clock, which runs
  ``clock_offset_s`` away from the real one (``getservertime`` and the WSSE time window use
  the same clock).
* Authentication: WSSE UsernameToken (``Authorization: WSSE profile="UsernameToken"`` plus an
  ``X-WSSE`` header, or the ``_username``/``_password``/``_nonce``/``_created_at`` query
  form), or HTTP Basic (header, or ``_username``/``_password`` without ``_nonce``). The digest
  is ``base64(sha1(nonce + created + hashed))`` where ``hashed`` is the whole 60-character
  bcrypt hash of the password with the account's salt, or the MD5 hex digest when the account
  has no salt. A ``Created`` more than ``window_s`` off the server clock and a nonce used twice
  are refused. ``users/<name>/auth`` (no auth) lists the methods and the salt.
* Alarms newest first, paged by ``limit``/``offset`` with ``from``/``to``/``q`` filters and a
  protocol-relative ``Link: <//host/...>; rel="next"`` while more remain. Alarms raised while a
  client pages shift every later page, as on a live server.
* A snapshot per alarm (404 until ``media_delay`` has passed, then a JPEG; no auth needed, like
  the manual's thumbnails). An alarm with a recording has a ``recordTime`` (5 s pre-alarm) and
  an alarm slice (type ``a``) on its camera from ``recordTime`` to ``slice_after_s`` after the
  alarm; until then the slice is listed with ``"stop": null`` and cannot be downloaded. Slices
  download as Matroska (an EBML header, then padding naming the alarm).
* Alarm trigger/untrigger per camera list, commands (``exturls``), scenarios (an ignored one
  answers 409), and ``health`` (also on the manual's misspelt ``/ap1/v1.2`` path).

Things the manual leaves open, decided here:

* An account with a salt accepts only the bcrypt digest, although the method list also shows
  the plain ``wsse`` entry (as the manual's example does); an account without a salt only MD5.
* ``X-WSSE`` is honoured even without the ``Authorization: WSSE`` header. In the query form a
  ``+`` that arrived as a space (not percent-encoded) is put back in the digest, nonce and
  ``Created``: none of them can contain a space.
* ``limit`` above 500 is capped at 500; ``q`` matches the description case-insensitively; the
  ``Link`` keeps every other query parameter except the one-time authentication ones.
* Times are written ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (``time_precision`` below); a date filter
  without an offset is UTC. An alarm's default time is the server's clock, so a clock jump
  shows in the alarm times.
* Only alarm slices exist (``type=r`` lists nothing). ``isRecordingAlarm`` is the live state
  the manual describes: true while an alarm slice of the camera is being written.
* The connection log (``GET`` or ``POST .../cameras[/<id>]/connections``, Admin profile) has a
  line per stream, newest first (same second: by id), ``paging`` as in the manual.

Switches (constructor options, ``--flags`` on the command line) for what the manual allows
but does not pin down; the defaults are listed first:

* ``order``: ``"id"`` (newest id first) or ``"time"`` (latest ``time`` first: after a clock
  step back, new alarms sort below older ones).
* ``link_host``: the host the ``Link`` header names; None = the request's own (behind NAT a
  server writes its own name, e.g. ``demo.camtrace.com`` as in the manual).
* ``open_slice_stop``: ``"null"`` (a slice being written lists ``"stop": null`` and is not
  downloadable) or ``"moving"`` (its ``stop`` is the end so far and a download gives the part
  recorded so far: a truncated file).
* ``trigger_description``: ``"suffixed"`` (``"<type> Alarm"``) or ``"bare"`` (``"<type>"``)
  for alarms raised by ``cameras/alarms/trigger``.
* ``time_precision``: ``"ms"`` (alarm times ``...:SS.mmmZ``) or ``"s"`` (``...:SSZ``, as every
  example of the manual writes them: alarms of one second share their time).
* ``admin``: False answers 403 on the connection log; ``connections_methods``: the HTTP
  methods the connection log answers (the manual lists GET and shows POST).
* ``add_alarm(snapshot=False)``: an alarm without image (``snapshot``/``thumbnail`` null).
* ``reset()`` (``/_sim/faults {"reset": true}``): a factory reset, ids start again at 1.
* ``triggers`` records the trigger calls that took effect, not refused ones.
* ``expire_all_digests()`` refuses the next WSSE request as stale whatever its ``Created``, so
  a client that re-synchronises and retries once gets through.

Test hooks (Python API and ``/_sim/...`` HTTP control surface): alarm creation, a Poisson alarm
generator shared by all tenants, failing alarm polls, alarms injected while a client pages,
clock offset, digest expiry, health errors, camera (dis)connections
(``camera_connection``), a reset, and a whole site going offline (503).

Command line: ``python -m cms_ingest.simulators.camtrace --sites 500 --rate 0.2`` prints one
site URL per line, then ``READY``, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import functools
import hashlib
import hmac
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from time import monotonic
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

import bcrypt
from aiohttp import web

from cms_ingest.simulators import base
from cms_ingest.simulators.base import (
    DEFAULT_TENANT,
    Route,
    TenantSimulator,
    as_bool,
    as_datetime,
    check_rate,
    control_body,
    control_routes,
    parse_cli_args,
    serve_cli,
    tenant_names,
    to_ms,
)
from cms_ingest.simulators.davantis import snapshot_jpeg

DEFAULT_PORT = 21100
API = "/api/v1.2"
API_MISSPELT = "/ap1/v1.2"  # the manual prints some paths this way: served too
DEFAULT_SALT = "$2y$10$CmsIngestSimulatorSalu"  # cost 10 + 22 characters, as the device hands out
SERVER_TIMEZONE = "Europe/Paris"
DEFAULT_LIMIT = 20
MAX_LIMIT = 500
PRE_ALARM = timedelta(seconds=5)
SLICE_BYTES = 4096
MIN_SLICE_BYTES = 64
NONCE_MEMORY_ABOVE = 4096
WWW_AUTHENTICATE = 'WSSE realm="CamTrace", profile="UsernameToken"'
AUTH_QUERY_PARAMS = frozenset({"_username", "_password", "_nonce", "_created_at"})
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
CAMERA_NAMES = ("Entrance", "Car park", "Loading bay", "North fence", "Reception")
GENERATED_DESCRIPTIONS = ("MOTION Alarm", "VIDEO LOSS Alarm", "TAMPERING Alarm")


class DeviceError(Exception):
    """An error the device answers with its ``{"error": ...}`` JSON body.

    ``detail`` (kept in ``last_auth_error``) may say more than the client is told."""

    def __init__(self, status: int, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or message

    def response(self) -> web.Response:
        response = web.json_response({"error": self.message}, status=self.status)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return response


# ------------------------------------------------------------------- time


def iso_z(moment: datetime) -> str:
    """``2026-11-21T10:00:00.123Z``."""
    moment = to_ms(moment)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _iso_seconds(moment: datetime) -> str:
    """``2026-11-21T10:00:00Z``, as the manual's examples write alarm times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def http_date(moment: datetime) -> str:
    """RFC 7231 date (``Sat, 21 Nov 2026 10:00:00 GMT``)."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_time(value: str) -> datetime | None:
    """ISO 8601 with ``Z`` or an offset (none = UTC), as aware UTC; ``None`` if unreadable."""
    try:
        moment = datetime.fromisoformat(value.strip().upper())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _query_time(name: str, value: str) -> datetime:
    moment = parse_time(value)
    if moment is None:
        raise DeviceError(400, f"Invalid date for {name}: {value!r} (ISO 8601 expected)")
    return moment


# ------------------------------------------------------------------- WSSE
def wsse_digest(nonce: str, created: str, hashed_password: str) -> str:
    """``base64(sha1(nonce + created + hashed_password))``, the nonce exactly as sent."""
    raw = hashlib.sha1((nonce + created + hashed_password).encode()).digest()  # noqa: S324 - the device's scheme
    return base64.b64encode(raw).decode()


@functools.lru_cache(maxsize=64)
def hash_password(password: str, salt: str | None) -> str:
    """The ``<hashed-password>``: the full 60-character bcrypt hash with the salt, else MD5 hex.

    Cached: bcrypt is slow on purpose and thousands of simulated sites share one account."""
    if not salt:
        return hashlib.md5(password.encode()).hexdigest()  # noqa: S324 - the device's scheme
    return bcrypt.hashpw(password.encode(), salt.encode()).decode()


_WSSE_FIELD = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,"]+))')


def parse_wsse_header(value: str) -> dict[str, str]:
    """``UsernameToken Username="u", PasswordDigest="d", ...`` -> lower-case keys to values.

    Tolerant: any order, optional spaces and commas, unquoted values."""
    return {
        match.group(1).lower(): match.group(2) if match.group(2) is not None else match.group(3)
        for match in _WSSE_FIELD.finditer(value)
    }


def _restore_plus(value: str | None) -> str | None:
    return None if value is None else value.replace(" ", "+")


def _refused(message: str, detail: str | None = None) -> DeviceError:
    return DeviceError(401, message, detail)


def _decode_basic(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _refused("Invalid Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise _refused("Invalid Basic credentials")
    return username, password


# ------------------------------------------------------------------ alarms
@dataclass(slots=True)
class CtAlarm:
    """One alarm as the simulated server stores it (times aware UTC, server clock)."""

    id: int
    time: datetime
    camera_id: int
    description: str
    record_time: datetime | None
    snapshot_ready_at: float  # monotonic
    has_recording: bool
    slice_stop: datetime | None
    has_snapshot: bool = True

    def snapshot_ready(self, now: float | None = None) -> bool:
        return (monotonic() if now is None else now) >= self.snapshot_ready_at

    def slice_open(self, server_now: datetime) -> bool:
        """True while the alarm slice is still being recorded."""
        return self.slice_stop is not None and self.slice_stop > server_now

    def to_json(self, precision: str = "ms") -> dict[str, Any]:
        """The alarm object as ``GET .../cameras/alarms`` renders it (times to ``precision``)."""
        snapshot = f"{API}/cameras/alarms/{self.id}.jpg" if self.has_snapshot else None
        written = iso_z if precision == "ms" else _iso_seconds
        return {
            "id": self.id,
            "time": written(self.time),
            "recordTime": None if self.record_time is None else written(self.record_time),
            "cameraId": self.camera_id,
            "description": self.description,
            "snapshot": snapshot,
            "thumbnail": None if snapshot is None else f"{snapshot}?w=50&h=50",
        }


@dataclass(frozen=True, slots=True)
class AlarmQuery:
    """The parameters of an alarm list request; ``None`` means "not filtered"."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    start: datetime | None = None
    end: datetime | None = None
    text: str | None = None
    camera: int | None = None

    def matches(self, alarm: CtAlarm) -> bool:
        return (
            (self.start is None or alarm.time >= self.start)
            and (self.end is None or alarm.time <= self.end)
            and (self.camera is None or alarm.camera_id == self.camera)
            and (self.text is None or self.text.lower() in alarm.description.lower())
        )

    @property
    def time_only(self) -> bool:
        return self.camera is None and self.text is None


def _query_int(query: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = query.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DeviceError(400, f"Invalid value for {name}: {raw!r}") from None
    if value < minimum:
        raise DeviceError(400, f"Invalid value for {name}: {raw!r} (at least {minimum})")
    return value


def parse_alarm_query(query: Mapping[str, str], camera: int | None = None) -> AlarmQuery:
    """Read ``limit``/``offset``/``from``/``to``/``q``; unknown parameters are ignored."""
    start, end, text = query.get("from", ""), query.get("to", ""), query.get("q", "")
    return AlarmQuery(
        limit=min(_query_int(query, "limit", DEFAULT_LIMIT, 1), MAX_LIMIT),
        offset=_query_int(query, "offset", 0, 0),
        start=_query_time("from", start) if start.strip() else None,
        end=_query_time("to", end) if end.strip() else None,
        text=text.strip() or None,
        camera=camera,
    )


def _id_list(name: str, raw: str) -> list[int]:
    try:
        ids = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise DeviceError(400, f"Invalid value for {name}: {raw!r}") from None
    if not ids:
        raise DeviceError(400, f"Invalid value for {name}: {raw!r}")
    return ids


def _camera_param(query: Mapping[str, str]) -> str | None:
    value = query.get("cameraId", query.get("CameraId"))
    return value if value is not None and value.strip() else None


class _Injection(NamedTuple):
    page_index: int
    alarm_count: int
    alarm_kw: dict[str, Any]


@dataclass(slots=True)
class _PollFaults:
    fail: int = 0
    fail_status: int = 500

    def as_dict(self) -> dict[str, Any]:
        return {"fail": self.fail, "status": self.fail_status}


def _healthy() -> dict[str, Any]:
    return {"recorder": True, "cameras": True, "hardware": True, "errorDetails": {}}


def _default_exturls() -> dict[int, dict[str, Any]]:
    relay = "http://10.2.50.100/tgi/control.tgi"
    return {
        7: {
            "id": 7,
            "name": "Siren",
            "urls": [f"{relay}?port=u1uu", "delay=10", f"{relay}?port=u0uu"],
        },
        2: {"id": 2, "name": "Floodlight on", "urls": [f"{relay}?port=1uuu"]},
        3: {"id": 3, "name": "Floodlight off", "urls": [f"{relay}?port=0uuu"]},
    }


def _default_scenarios() -> dict[int, dict[str, Any]]:
    return {
        1: {"scenarioId": 1, "name": "Perimeter lockdown", "ignored": False},
        2: {"scenarioId": 2, "name": "Lights test", "ignored": True},
    }


class CamTraceSite:
    """The state and behaviour of one simulated CamTrace server."""

    def __init__(
        self,
        *,
        username: str = "cms",
        password: str = "secret",  # noqa: S107 - the simulated server's test account
        salt: str | None = DEFAULT_SALT,
        allow_basic: bool = True,
        cameras: int = 4,
        clock_offset_s: float = 0.0,
        window_s: float = 10.0,
        media_delay: float = 1.0,
        slice_after_s: float = 2.0,
        name: str = "CamTrace site",
        max_alarms: int | None = None,
        order: str = "id",
        link_host: str | None = None,
        open_slice_stop: str = "null",
        trigger_description: str = "suffixed",
        time_precision: str = "ms",
        admin: bool = True,
        connections_methods: tuple[str, ...] = ("GET", "POST"),
    ) -> None:
        if order not in ("id", "time"):
            raise ValueError("order must be 'id' or 'time'")
        if open_slice_stop not in ("null", "moving"):
            raise ValueError("open_slice_stop must be 'null' or 'moving'")
        if trigger_description not in ("suffixed", "bare"):
            raise ValueError("trigger_description must be 'suffixed' or 'bare'")
        if time_precision not in ("ms", "s"):
            raise ValueError("time_precision must be 'ms' or 's'")
        self.username, self.password, self.salt = username, password, salt
        self.allow_basic = allow_basic
        self.cameras = cameras
        self.clock_offset_s = clock_offset_s
        self.window_s = window_s
        self.media_delay = media_delay
        self.slice_after_s = slice_after_s
        self.name = name
        self.max_alarms = max_alarms
        self.order = order
        self.link_host = link_host
        self.open_slice_stop = open_slice_stop
        self.trigger_description = trigger_description
        self.time_precision = time_precision
        self.admin = admin
        self.connections_methods = connections_methods
        self.connections: list[dict[str, Any]] = []
        self.alarms: list[CtAlarm] = []
        self.offline = False
        self.requests: collections.Counter[str] = collections.Counter()
        self.triggers: list[tuple[str, dict[str, Any]]] = []
        self.auth_failures = 0
        self.last_auth_error = ""
        self.health: dict[str, Any] = _healthy()
        self.exturls: dict[int, dict[str, Any]] = _default_exturls()
        self.scenarios: dict[int, dict[str, Any]] = _default_scenarios()
        self._faults = _PollFaults()
        self._injections: list[_Injection] = []
        self._page_index = 0
        self._nonces: dict[str, float] = {}  # nonce -> monotonic time it may be forgotten
        self._stale_pending = 0
        self._next_id = 1
        self._next_connection_id = 1
        self._times_sorted = True
        self._longest_slice = timedelta(0)

    # ------------------------------------------------------------------ clock
    def now(self) -> datetime:
        """The server's clock: the real one plus ``clock_offset_s``."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset_s)

    # ----------------------------------------------------------------- alarms
    def add_alarm(
        self,
        *,
        camera: int = 1,
        description: str = "MOTION Alarm",
        time: datetime | None = None,
        recording: bool = True,
        media_delay: float | None = None,
        snapshot: bool = True,
    ) -> CtAlarm:
        """Record a new alarm (ids 1, 2, ...); see the module docstring for its media.
        ``snapshot=False``: the alarm has no image (``snapshot``/``thumbnail`` null, 404)."""
        stamp = to_ms(self.now() if time is None else time)
        if self.time_precision == "s":  # stored as written: filters see the same time
            stamp = stamp.replace(microsecond=0)
        if self.alarms and stamp < self.alarms[-1].time:
            self._times_sorted = False
        delay = self.media_delay if media_delay is None else media_delay
        slice_stop = to_ms(stamp + timedelta(seconds=self.slice_after_s)) if recording else None
        alarm = CtAlarm(
            id=self._next_id,
            time=stamp,
            camera_id=camera,
            description=description,
            record_time=stamp - PRE_ALARM if recording else None,
            snapshot_ready_at=monotonic() + delay,
            has_recording=recording,
            slice_stop=slice_stop,
            has_snapshot=snapshot,
        )
        if slice_stop is not None:
            self._longest_slice = max(self._longest_slice, slice_stop - stamp)
        self._next_id += 1
        self.alarms.append(alarm)
        self._trim()
        return alarm

    def add_alarms(self, n: int, **kw: Any) -> list[CtAlarm]:
        return [self.add_alarm(**kw) for _ in range(n)]

    def _trim(self) -> None:
        if self.max_alarms is not None and len(self.alarms) > self.max_alarms * 1.1 + 1:
            del self.alarms[: len(self.alarms) - self.max_alarms]

    def alarm(self, alarm_id: int) -> CtAlarm | None:
        index = bisect.bisect_left(self.alarms, alarm_id, key=lambda a: a.id)
        if index < len(self.alarms) and self.alarms[index].id == alarm_id:
            return self.alarms[index]
        return None

    def _time_range(self, start: datetime | None, end: datetime | None) -> tuple[int, int]:
        """Indexes of the alarms whose time may be in [start, end] (all when unsorted)."""
        low, high = 0, len(self.alarms)
        if self._times_sorted and start is not None:
            low = bisect.bisect_left(self.alarms, start, key=lambda a: a.time)
        if self._times_sorted and end is not None:
            high = bisect.bisect_right(self.alarms, end, key=lambda a: a.time)
        return low, max(low, high)

    def find_alarms(self, query: AlarmQuery) -> tuple[list[CtAlarm], bool]:
        """One page of matching alarms, newest (highest id) first, and whether more remain."""
        low, high = self._time_range(query.start, query.end)
        if self.order == "time" and not self._times_sorted:
            return self._find_by_time(query, low, high)
        if self._times_sorted and query.time_only:
            top = high - query.offset
            bottom = max(low, top - query.limit)
            newest_last = self.alarms[bottom:top] if top > low else []
            return newest_last[::-1], bottom > low
        page: list[CtAlarm] = []
        skipped = 0
        for index in range(high - 1, low - 1, -1):
            alarm = self.alarms[index]
            if not query.matches(alarm):
                continue
            if skipped < query.offset:
                skipped += 1
            elif len(page) == query.limit:
                return page, True
            else:
                page.append(alarm)
        return page, False

    def _find_by_time(self, query: AlarmQuery, low: int, high: int) -> tuple[list[CtAlarm], bool]:
        """``order="time"``: latest time first (ties: highest id first)."""
        matching = [alarm for alarm in self.alarms[low:high] if query.matches(alarm)]
        matching.sort(key=lambda alarm: (alarm.time, alarm.id), reverse=True)
        end = query.offset + query.limit
        return matching[query.offset : end], end < len(matching)

    def reset(self) -> None:
        """A factory reset, a replaced box or a reinstalled server under the same address: every
        alarm and connection entry gone, ids start again at 1."""
        self.alarms.clear()
        self.connections.clear()
        self._next_id = 1
        self._next_connection_id = 1
        self._times_sorted = True
        self._longest_slice = timedelta(0)

    def on_page_request(self, offset: int) -> None:
        """Count the pages of a paging sequence and add the alarms due before this one."""
        self._page_index = 0 if offset == 0 else self._page_index + 1
        due = [inj for inj in self._injections if inj.page_index == self._page_index]
        for injection in due:
            self._injections.remove(injection)
            self.add_alarms(injection.alarm_count, **injection.alarm_kw)

    # ----------------------------------------------------------------- slices
    def slices(
        self,
        cameras: Iterable[int] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        kind: str | None = None,
    ) -> list[dict[str, Any]]:
        """Alarm slices overlapping [start, end], oldest first (``stop`` null while open)."""
        if kind not in (None, "a"):
            return []  # only alarm recordings are simulated
        wanted = None if cameras is None else frozenset(cameras)
        now = self.now()
        low, high = self._time_range(
            None if start is None else start - self._longest_slice,
            None if end is None else end + PRE_ALARM,
        )
        found = []
        for alarm in self.alarms[low:high]:
            if alarm.record_time is None or alarm.slice_stop is None:
                continue
            if wanted is not None and alarm.camera_id not in wanted:
                continue
            is_open = alarm.slice_open(now)
            if end is not None and alarm.record_time > end:
                continue
            if start is not None and not is_open and alarm.slice_stop < start:
                continue
            found.append(self._slice_json(alarm, now))
        return found

    def _slice_json(self, alarm: CtAlarm, now: datetime) -> dict[str, Any]:
        assert alarm.record_time is not None
        assert alarm.slice_stop is not None
        is_open = alarm.slice_open(now)
        start = iso_z(alarm.record_time)
        if is_open:
            done = (now - alarm.record_time) / (alarm.slice_stop - alarm.record_time)
            size = max(0, int(SLICE_BYTES * min(done, 1.0)))
        else:
            size = SLICE_BYTES
        return {
            "cameraId": alarm.camera_id,
            "cameraName": self.camera_name(alarm.camera_id),
            "start": start,
            "stop": iso_z(alarm.slice_stop) if not is_open else self._open_stop(now),
            "type": "a",
            "downloadUrl": f"{API}/slices/{alarm.camera_id}/{quote(start, safe='')}/a/download",
            "size": size,
            "protected": False,
        }

    def _open_stop(self, now: datetime) -> str | None:
        """``stop`` of a slice still being written: null, or (``open_slice_stop="moving"``)
        the end recorded so far, which moves on until the slice closes."""
        return iso_z(now) if self.open_slice_stop == "moving" else None

    def slice_body(self, alarm: CtAlarm) -> bytes | None:
        """What downloading an alarm's slice gives now: None (404) while it is written, or, when
        open slices show a moving ``stop``, the part recorded so far (a truncated file)."""
        assert alarm.record_time is not None
        assert alarm.slice_stop is not None
        if not alarm.slice_open(self.now()):
            return slice_mkv(alarm.id)
        if self.open_slice_stop != "moving":
            return None
        done = (self.now() - alarm.record_time) / (alarm.slice_stop - alarm.record_time)
        return slice_mkv(alarm.id, max(MIN_SLICE_BYTES, int(SLICE_BYTES * min(done, 1.0))))

    def recording_alarm(self, camera: int) -> bool:
        """``isRecordingAlarm``: whether an alarm slice of the camera is being written now."""
        now = self.now()
        for alarm in reversed(self.alarms):
            if alarm.time < now - self._longest_slice - PRE_ALARM:
                break
            if alarm.camera_id == camera and alarm.slice_open(now):
                return True
        return False

    # -------------------------------------------------------- connection log
    def camera_connection(
        self, camera: int, connected: bool, *, time: datetime | None = None, streams: int = 2
    ) -> list[dict[str, Any]]:
        """Log a camera's streams (dis)connecting at ``time`` (default: the server's clock)."""
        stamp = (self.now() if time is None else time).astimezone(UTC)
        added = []
        for stream in range(1, streams + 1):
            added.append(
                {
                    "id": self._next_connection_id,
                    "cameraId": camera,
                    "cameraName": self.camera_name(camera),
                    "streamId": stream,
                    "streamName": f"MsMediaProfile{stream}",
                    "dateTime": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "connected": connected,
                }
            )
            self._next_connection_id += 1
        self.connections.extend(added)
        return added

    def find_connections(self, query: Mapping[str, str], camera: int | None) -> dict[str, Any]:
        """The connection log newest first (same second: by id), filtered and paged."""
        start, end = query.get("from", ""), query.get("to", "")
        low = _query_time("from", start) if start.strip() else None
        high = _query_time("to", end) if end.strip() else None
        cameras = _id_list("id_cams", query["id_cams"]) if query.get("id_cams") else None
        state = query.get("connected", "").strip().lower()
        found = []
        for entry in self.connections:
            when = parse_time(entry["dateTime"])
            assert when is not None
            if (low is not None and when < low) or (high is not None and when > high):
                continue
            if camera is not None and entry["cameraId"] != camera:
                continue
            if cameras is not None and entry["cameraId"] not in cameras:
                continue
            if state in ("true", "false") and entry["connected"] != (state == "true"):
                continue
            found.append(entry)
        found.sort(key=lambda entry: (entry["dateTime"], -entry["id"]), reverse=True)
        limit = min(_query_int(query, "limit", DEFAULT_LIMIT, 1), MAX_LIMIT)
        offset = _query_int(query, "offset", 0, 0)
        page = found[offset : offset + limit]
        paging = {"total": len(found), "offset": offset + len(page), "limit": limit}
        return {"connections": page, "paging": paging}

    def slice_alarm(self, camera: int, start: datetime, kind: str) -> CtAlarm | None:
        """The alarm whose slice on ``camera`` starts at ``start`` (to the millisecond)."""
        if kind != "a":
            return None
        start = to_ms(start)
        low, high = self._time_range(start + PRE_ALARM, start + PRE_ALARM)
        for alarm in self.alarms[low:high]:
            if alarm.camera_id == camera and alarm.record_time == start:
                return alarm
        return None

    # ---------------------------------------------------------------- cameras
    def has_camera(self, camera: int) -> bool:
        return 1 <= camera <= self.cameras

    def camera_name(self, camera: int) -> str:
        return CAMERA_NAMES[camera - 1] if 1 <= camera <= len(CAMERA_NAMES) else f"Camera {camera}"

    def camera_json(self, camera: int) -> dict[str, Any]:
        errors = self.health.get("errorDetails", {}).get("cameras", [])
        failing = any(isinstance(e, dict) and e.get("id") == camera for e in errors)
        return {
            "id": camera,
            "name": self.camera_name(camera),
            "hdStream": f"/live/view/{camera}.1",
            "hdId": 1,
            "hdEncoding": "H264",
            "hdWidth": 1920,
            "hdHeight": 1080,
            "alStream": f"/live/view/{camera}.2",
            "alId": 2,
            "alEncoding": "H264",
            "alWidth": 640,
            "alHeight": 480,
            "isIgnored": False,
            "isRecording": True,
            "isRecordingAlarm": self.recording_alarm(camera),
            "isRecordingForced": False,
            "isRemote": False,
            "isReplayEnabled": False,
            "isUpsideDown": False,
            "model": "camtrace-sim",
            "playLiveAllowed": True,
            "playRecordsAllowed": True,
            "ptzAllowed": False,
            "refUrl": None,
            "status": -1 if failing else 2,
        }

    def check_cameras(self, cameras: Iterable[int]) -> None:
        for camera in cameras:
            if not self.has_camera(camera):
                raise DeviceError(404, f"Camera {camera} not found")

    # ------------------------------------------------------- triggers (actions)
    def trigger_alarm(self, cameras: Sequence[int], kind: str | None = None) -> list[CtAlarm]:
        """Raise one alarm per camera (``"<type> Alarm"``, else ``"TRIGGER Alarm"``)."""
        self.check_cameras(cameras)
        if self.trigger_description == "bare":
            description = kind or "TRIGGER"
        else:
            description = f"{kind} Alarm" if kind else "TRIGGER Alarm"
        raised = [self.add_alarm(camera=camera, description=description) for camera in cameras]
        params: dict[str, Any] = {"cameraId": list(cameras)}
        if kind:
            params["type"] = kind
        self.triggers.append(("alarm_trigger", params))
        return raised

    def untrigger_alarm(self, cameras: Sequence[int]) -> None:
        self.check_cameras(cameras)
        self.triggers.append(("alarm_untrigger", {"cameraId": list(cameras)}))

    def trigger_exturl(self, exturl_id: int) -> None:
        if exturl_id not in self.exturls:
            raise DeviceError(404, f"Command {exturl_id} not found")
        self.triggers.append(("exturl", {"id": exturl_id}))

    def trigger_scenario(self, scenario_id: int) -> None:
        scenario = self.scenarios.get(scenario_id)
        if scenario is None:
            raise DeviceError(404, f"Scenario {scenario_id} not found")
        if scenario.get("ignored"):
            raise DeviceError(409, "scenario is ignored")
        self.triggers.append(("scenario", {"id": scenario_id}))

    # ----------------------------------------------------------------- health
    def set_camera_error(self, camera_id: int, error: str, stream: str = "HD stream") -> None:
        self.health["cameras"] = False
        details = self.health.setdefault("errorDetails", {})
        entries = [e for e in details.get("cameras", []) if e.get("id") != camera_id]
        entries.append(
            {
                "id": camera_id,
                "name": self.camera_name(camera_id),
                "streamName": stream,
                "error": error,
            }
        )
        details["cameras"] = entries

    def set_recorder_error(self, message: str) -> None:
        self.health["recorder"] = False
        self.health.setdefault("errorDetails", {}).setdefault("recorder", []).append(message)

    def clear_errors(self) -> None:
        self.health.clear()
        self.health.update(_healthy())

    # --------------------------------------------------------- authentication
    @property
    def hashed_password(self) -> str:
        return hash_password(self.password, self.salt)

    def auth_methods(self, username: str) -> list[dict[str, str]]:
        """What ``users/<name>/auth`` lists; an unknown user gets the plain WSSE entry only."""
        known = username == self.username
        methods = [{"type": "wsse", "salt": self.salt}] if known and self.salt else []
        methods.append({"type": "wsse"})
        if known and self.allow_basic:
            methods.append({"type": "basic"})
        return methods

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
        """Check a request's credentials: ``"wsse"`` or ``"basic"``, else DeviceError(401)."""
        try:
            return self._authenticate(headers, query)
        except DeviceError as error:
            self.auth_failures += 1
            self.last_auth_error = error.detail
            raise

    def _authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
        x_wsse = headers.get("X-WSSE")
        scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
        if x_wsse is not None:
            token = parse_wsse_header(x_wsse)
            self._check_wsse(
                token.get("username"),
                token.get("passworddigest"),
                token.get("nonce"),
                token.get("created"),
            )
            return "wsse"
        if scheme.lower() == "wsse":
            raise _refused("WSSE authorization without an X-WSSE header")
        if scheme.lower() == "basic":
            self._check_basic(*_decode_basic(credentials))
            return "basic"
        if "_username" in query:
            if "_nonce" in query or "_created_at" in query:
                self._check_wsse(
                    query.get("_username"),
                    _restore_plus(query.get("_password")),
                    _restore_plus(query.get("_nonce")),
                    _restore_plus(query.get("_created_at")),
                )
                return "wsse"
            self._check_basic(query["_username"], query.get("_password", ""))
            return "basic"
        raise _refused("Authentication required")

    def _check_wsse(
        self, username: str | None, digest: str | None, nonce: str | None, created: str | None
    ) -> None:
        if not (username and digest and nonce and created):
            raise _refused("Invalid WSSE token: Username, PasswordDigest, Nonce and Created needed")
        if username != self.username:
            raise _refused("Invalid credentials", f"unknown user {username!r}")
        moment = parse_time(created)
        if moment is None:
            raise _refused(f"Invalid Created date {created!r}")
        skew = (moment - self.now()).total_seconds()
        if abs(skew) > self.window_s:
            raise _refused(
                f"Digest is stale: Created is {skew:+.1f} s from the server time, outside the "
                f"{self.window_s:g} s time window"
            )
        if not hmac.compare_digest(wsse_digest(nonce, created, self.hashed_password), digest):
            raise _refused("Invalid credentials", "wrong PasswordDigest")
        if self._nonce_seen(nonce):
            raise _refused("Nonce already used (replay)")
        self._remember_nonce(nonce)
        if self._stale_pending > 0:
            self._stale_pending -= 1
            raise _refused("Digest is stale: expired by the server, create a new one")

    def _check_basic(self, username: str, password: str) -> None:
        if not self.allow_basic:
            raise _refused("Basic authentication is not allowed")
        if username != self.username:
            raise _refused("Invalid credentials", f"unknown user {username!r}")
        if not hmac.compare_digest(password.encode(), self.password.encode()):
            raise _refused("Invalid credentials", "wrong password")

    def _nonce_seen(self, nonce: str) -> bool:
        forget_at = self._nonces.get(nonce)
        return forget_at is not None and forget_at > monotonic()

    def _remember_nonce(self, nonce: str) -> None:
        now = monotonic()
        if len(self._nonces) > NONCE_MEMORY_ABOVE:
            self._nonces = {key: until for key, until in self._nonces.items() if until > now}
        # A Created may be window_s early or late: the nonce can be replayed for 2 windows.
        self._nonces[nonce] = now + 2 * self.window_s + 1.0

    # ----------------------------------------------------------------- faults
    def inject_on_page_request(self, page_index: int, count: int, **alarm_kw: Any) -> None:
        """Add ``count`` alarms just before answering page ``page_index`` of the next paging
        sequence (0 = the ``offset=0`` request, 1 = the first request with ``offset > 0``)."""
        self._injections.append(_Injection(page_index, count, dict(alarm_kw)))

    def fail_alarm_polls(self, count: int, status: int = 500) -> None:
        self._faults.fail, self._faults.fail_status = count, status

    def expire_all_digests(self) -> None:
        """Refuse the next WSSE-authenticated request as stale (401), whatever its Created."""
        self._stale_pending = 1

    def poll_fault(self) -> web.Response | None:
        """Apply a pending alarm-list fault; a response means "answer this"."""
        if self._faults.fail > 0:
            self._faults.fail -= 1
            return web.json_response(
                {"error": "simulated failure"}, status=self._faults.fail_status
            )
        return None

    def state(self) -> dict[str, Any]:
        return {
            "alarms": len(self.alarms),
            "last_id": self.alarms[-1].id if self.alarms else 0,
            "requests": dict(self.requests),
            "offline": self.offline,
            "clock_offset_s": self.clock_offset_s,
            "auth_failures": self.auth_failures,
            "last_auth_error": self.last_auth_error,
            "triggers": [[kind, params] for kind, params in self.triggers],
            "faults": {
                **self._faults.as_dict(),
                "pending_injections": len(self._injections),
                "expire_digests": self._stale_pending,
            },
            "health": self.health,
        }


# ------------------------------------------------------------------- media
def _ebml_size(size: int) -> bytes:
    return b"\x01" + size.to_bytes(7, "big")  # an 8-byte EBML variable-size integer


def _ebml(element_id: bytes, payload: bytes) -> bytes:
    return element_id + _ebml_size(len(payload)) + payload


_EBML_HEADER = _ebml(
    EBML_MAGIC,
    _ebml(b"\x42\x82", b"matroska") + _ebml(b"\x42\x87", b"\x04") + _ebml(b"\x42\x85", b"\x02"),
)


def slice_mkv(alarm_id: int, size: int = SLICE_BYTES) -> bytes:
    """``size`` bytes: a Matroska EBML header, then a Void element naming the alarm."""
    if size < MIN_SLICE_BYTES:
        raise ValueError(f"size must be at least {MIN_SLICE_BYTES}")
    room = size - len(_EBML_HEADER) - 1 - 8
    tag = f"camtrace-sim alarm {alarm_id}".encode()
    return _EBML_HEADER + b"\xec" + _ebml_size(room) + tag.ljust(room, b"\x00")[:room]


# ---------------------------------------------------------------- handlers
SiteHandler = base.SiteHandler[CamTraceSite]
# Names this module has always offered, now defined in base.py.
Handler = base.Handler
GENERATOR_TICK = base.GENERATOR_TICK


def _empty_html() -> web.Response:
    return web.Response(status=200, body=b"", content_type="text/html")


async def _auth_methods(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    return web.json_response({"auth": site.auth_methods(request.match_info["name"])})


async def _server_time(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    stamp = int(site.now().timestamp())
    return web.json_response({"serverTime": {"timestamp": stamp, "timezone": SERVER_TIMEZONE}})


async def _cameras(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    cameras = [site.camera_json(camera) for camera in range(1, site.cameras + 1)]
    return web.json_response({"cameras": cameras})


def _path_camera(site: CamTraceSite, request: web.Request) -> int:
    camera = int(request.match_info["camera_id"])
    site.check_cameras([camera])
    return camera


async def _camera(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    return web.json_response(site.camera_json(_path_camera(site, request)))


def _next_link(request: web.Request, query: AlarmQuery, host: str | None = None) -> str:
    """``<//host/path?limit=L&offset=O+L&...>; rel="next"``: protocol-relative, the request's
    own host (or ``host``: the name the server knows itself by) and path (tenant prefix
    included), the other parameters kept."""
    params = [("limit", str(query.limit)), ("offset", str(query.offset + query.limit))]
    params += [
        (key, value)
        for key, value in request.query.items()
        if key not in ("limit", "offset") and key not in AUTH_QUERY_PARAMS
    ]
    encoded = urlencode(params, safe=":,", quote_via=quote)
    target = f"//{host or request.host}{request.rel_url.raw_path}?{encoded}"
    return f'<{target}>; rel="next"'


async def _alarms(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    camera = _path_camera(site, request) if "camera_id" in request.match_info else None
    query = parse_alarm_query(request.query, camera)
    site.on_page_request(query.offset)
    page, more = site.find_alarms(query)
    response = web.json_response({"alarms": [alarm.to_json(site.time_precision) for alarm in page]})
    if more:
        response.headers["Link"] = _next_link(request, query, site.link_host)
    return response


async def _snapshot(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    alarm_id = int(request.match_info["alarm_id"])
    alarm = site.alarm(alarm_id)
    if alarm is None or not alarm.has_snapshot or not alarm.snapshot_ready():
        return web.Response(status=404)  # the manual's images answer 404 with no content
    return web.Response(body=snapshot_jpeg(alarm.id), content_type="image/jpeg")


def _trigger_cameras(request: web.Request) -> list[int]:
    raw = _camera_param(request.query)
    if raw is None:
        raise DeviceError(400, "cameraId is required")
    return _id_list("cameraId", raw)


async def _trigger(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    kind = request.query.get("type", "").strip() or None
    site.trigger_alarm(_trigger_cameras(request), kind)
    return _empty_html()


async def _untrigger(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    site.untrigger_alarm(_trigger_cameras(request))
    return _empty_html()


async def _exturls(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    listed = [
        {"id": item["id"], "name": item["name"], "href": f"{API}/exturls/{item['id']}"}
        for item in site.exturls.values()
    ]
    return web.json_response({"exturls": listed})


async def _exturl(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    exturl_id = int(request.match_info["item_id"])
    item = site.exturls.get(exturl_id)
    if item is None:
        raise DeviceError(404, f"Command {exturl_id} not found")
    return web.json_response({"exturls": item})


async def _exturl_trigger(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    site.trigger_exturl(int(request.match_info["item_id"]))
    return web.json_response({"triggered": True})


async def _scenarios(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    return web.json_response({"scenarios": list(site.scenarios.values())})


async def _scenario_trigger(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    site.trigger_scenario(int(request.match_info["item_id"]))
    return web.json_response({"triggered": True})


async def _slices(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    query = request.query
    raw_cameras = _camera_param(query)
    kind = query.get("type", "").strip() or None
    if kind not in (None, "a", "r"):
        raise DeviceError(400, f"Invalid value for type: {kind!r} (a or r)")
    start, end = query.get("from", ""), query.get("to", "")
    found = site.slices(
        None if raw_cameras is None else _id_list("cameraId", raw_cameras),
        _query_time("from", start) if start.strip() else None,
        _query_time("to", end) if end.strip() else None,
        kind,
    )
    return web.json_response({"slices": found})


async def _slice_download(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    camera = int(request.match_info["camera_id"])
    start = parse_time(request.match_info["start"])
    alarm = None if start is None else site.slice_alarm(camera, start, request.match_info["kind"])
    if alarm is None:
        raise DeviceError(404, "Slice not found")
    body = site.slice_body(alarm)
    if body is None:
        raise DeviceError(404, "Slice is still being recorded")
    return web.Response(body=body, content_type="video/x-matroska")


async def _connections(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    if request.method not in site.connections_methods:
        raise DeviceError(405, "Method not allowed")
    if not site.admin:
        raise DeviceError(403, "Access denied: Admin profile required")
    camera = _path_camera(site, request) if "camera_id" in request.match_info else None
    return web.json_response(site.find_connections(request.query, camera))


async def _health(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    return web.json_response({"health": site.health})


DEVICE_ROUTES = (
    Route("GET", f"{API}/users/{{name}}/auth", _auth_methods, auth=False),
    Route("GET", f"{API_MISSPELT}/users/{{name}}/auth", _auth_methods, auth=False),
    Route("GET", f"{API}/getservertime", _server_time, auth=False),
    Route("GET", f"{API}/cameras", _cameras),
    Route("GET", f"{API}/cameras/alarms", _alarms, poll_faults=True),
    Route("GET", f"{API}/cameras/alarms/trigger", _trigger),
    Route("GET", f"{API}/cameras/alarms/untrigger", _untrigger),
    Route("GET", f"{API}/cameras/alarms/{{alarm_id:\\d+}}.jpg", _snapshot, auth=False),
    Route("GET", f"{API}/cameras/connections", _connections),
    Route("POST", f"{API}/cameras/connections", _connections),
    Route("GET", f"{API}/cameras/{{camera_id:\\d+}}/connections", _connections),
    Route("POST", f"{API}/cameras/{{camera_id:\\d+}}/connections", _connections),
    Route("GET", f"{API}/cameras/{{camera_id:\\d+}}", _camera),
    Route("GET", f"{API}/cameras/{{camera_id:\\d+}}/alarms", _alarms, poll_faults=True),
    Route("GET", f"{API}/exturls", _exturls),
    Route("GET", f"{API}/exturls/{{item_id:\\d+}}", _exturl),
    Route("GET", f"{API}/exturls/{{item_id:\\d+}}/trigger", _exturl_trigger),
    Route("GET", f"{API}/scenarios", _scenarios),
    Route("GET", f"{API}/scenarios/{{item_id:\\d+}}/trigger", _scenario_trigger),
    Route("GET", f"{API}/slices", _slices),
    Route("GET", f"{API}/slices/{{camera_id:\\d+}}/{{start}}/{{kind}}/download", _slice_download),
    Route("GET", f"{API}/health", _health),
    Route("GET", f"{API_MISSPELT}/health", _health),
)


# ----------------------------------------------------- /_sim control surface
_ALARM_FIELDS: dict[str, Callable[[Any], Any]] = {
    "camera": int,
    "description": str,
    "time": as_datetime,
    "recording": as_bool,
    "media_delay": float,
    "snapshot": as_bool,
}


async def _sim_faults(site: CamTraceSite, request: web.Request) -> web.StreamResponse:
    body = await control_body(request)
    if "fail" in body:
        site.fail_alarm_polls(int(body["fail"]), int(body.get("status", 500)))
    if "offline" in body:
        site.offline = as_bool(body["offline"])
    if "clock_offset_s" in body:
        site.clock_offset_s = float(body["clock_offset_s"])
    if body.get("expire_digests"):
        site.expire_all_digests()
    if "camera_error" in body:
        error = body["camera_error"]
        site.set_camera_error(int(error["camera"]), str(error["error"]))
    if body.get("clear_errors"):
        site.clear_errors()
    if body.get("reset"):
        site.reset()
    if "camera_connection" in body:
        change = body["camera_connection"]
        site.camera_connection(int(change["camera"]), as_bool(change["connected"]))
    return web.json_response(site.state())


CONTROL_ROUTES = control_routes(_ALARM_FIELDS, _sim_faults)


# --------------------------------------------------------------- the server
class CamTraceSimulator(TenantSimulator[CamTraceSite]):
    """An HTTP server hosting one or many simulated CamTrace servers (tenants)."""

    control_errors = (ValueError, TypeError, KeyError)

    def __init__(self, sites: dict[str, CamTraceSite] | None = None) -> None:
        super().__init__(sites if sites is not None else {DEFAULT_TENANT: CamTraceSite()})

    def _device_routes(self) -> Iterable[Route[CamTraceSite]]:
        return DEVICE_ROUTES

    def _control_routes(self) -> Iterable[Route[CamTraceSite]]:
        return CONTROL_ROUTES

    async def _answer(
        self, site: CamTraceSite, route: Route[CamTraceSite], request: web.Request
    ) -> web.StreamResponse:
        response = await _respond(site, route, request)
        response.headers["Date"] = http_date(site.now())  # the server's clock, not ours
        return response

    def start_generator(
        self,
        rate_per_site: float,
        *,
        descriptions: Sequence[str] = GENERATED_DESCRIPTIONS,
        seed: int | None = None,
    ) -> None:
        """Add alarms to every site as independent Poisson processes (one task for all)."""
        check_rate(rate_per_site)
        if not descriptions:
            raise ValueError("descriptions must not be empty")
        choices = tuple(descriptions)
        self._start_generator(
            rate_per_site, seed, lambda site, rng: _generated_alarm(site, choices, rng)
        )


def _generated_alarm(site: CamTraceSite, texts: tuple[str, ...], rng: random.Random) -> None:
    site.add_alarm(camera=rng.randint(1, max(1, site.cameras)), description=rng.choice(texts))


async def _respond(
    site: CamTraceSite, route: Route[CamTraceSite], request: web.Request
) -> web.StreamResponse:
    if site.offline:
        return web.json_response({"error": "Service unavailable"}, status=503)
    try:
        if route.poll_faults and (answer := site.poll_fault()) is not None:
            return answer
        if route.auth:
            site.authenticate(request.headers, request.query)
        return await route.handler(site, request)
    except DeviceError as error:
        return error.response()


# ------------------------------------------------------------ command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--media-delay", type=float, default=1.0)
    parser.add_argument("--slice-after", type=float, default=2.0)
    parser.add_argument("--order", choices=("id", "time"), default="id")
    parser.add_argument("--link-host", default=None, help="host the Link header names")
    parser.add_argument("--open-slice-stop", choices=("null", "moving"), default="null")
    parser.add_argument("--trigger-description", choices=("suffixed", "bare"), default="suffixed")
    parser.add_argument("--time-precision", choices=("ms", "s"), default="ms")
    parser.add_argument("--no-admin", action="store_true", help="connection log answers 403")


async def serve(args: argparse.Namespace) -> None:
    sites = {
        name: CamTraceSite(
            media_delay=args.media_delay,
            slice_after_s=args.slice_after,
            name=f"CamTrace {name}",
            order=args.order,
            link_host=args.link_host,
            open_slice_stop=args.open_slice_stop,
            trigger_description=args.trigger_description,
            time_precision=args.time_precision,
            admin=not args.no_admin,
        )
        for name in tenant_names(args.sites)
    }
    await serve_cli(CamTraceSimulator(sites), args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli_args(
        argv,
        description="Serve simulated CamTrace servers.",
        default_port=DEFAULT_PORT,
        add_arguments=_add_arguments,
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
