"""A simulated Videoloft account served over real HTTP: authenticators and loggers.

The project's tests, the demo and the benchmark point the ingest daemon at this simulator
instead of the Videoloft cloud. Unlike the other vendors, one simulated account is served by
several HTTP servers, each on its own loopback port, as the real service spreads an account
over several hosts:

* the regional **authenticator** (the site URL unless ``redirect``): ``/login``,
  ``/devices``, ``/devices/viewerInfo`` and the ``/_sim/...`` control surface;
* optionally a **global** authenticator (``redirect=True``, then it is the site URL) whose
  ``/login`` only ever answers ``{"location": "host:port"}`` of the regional one;
* ``loggers`` **loggers** (default 2); every device lives on exactly one of them and a logger
  only serves the devices allocated to it (``/alert``, ``/alertthumb``, ``/alerturl.m3u8``,
  ``/sendcameratask``, ``/cameras/status``, ``/cameras/realtime/live``).

Service behaviour reproduced (from the vendor manual and the integrators' notes):

* Login with JSON ``{email, password}`` (also a form body, or ``GET`` with the query
  parameters); the answer carries ``uid``, ``authToken``, ``authenticator`` (host:port, no
  scheme), ``accountInfo.maxAge`` (days) and sets an ``mt_session`` cookie; ``GET
  /login?caller=cookielogin`` with that cookie gives a fresh token without the password.
* Tokens are ``base64("uid:issued_epoch:ttl:0") + "*" + signature`` (URL-safe alphabet, so
  a token can travel in a query or a path), so a client can read the expiry locally. Each
  route reads it only where the manual puts it (``TOKEN_PLACES``): the ``Authorization:
  ManythingToken <token>`` header for ``/devices``, ``viewerInfo``, ``/cameras/status`` and
  ``/cameras/realtime/live``; ``?token=`` for ``/alert``, ``/sendcameratask`` and
  ``alerturl.m3u8``; the last path segment for ``/alertthumb``, ``/getthumb`` and
  ``/getstill``. A token anywhere else is no token: 401 ``{"error": "Unauthorized"}``, as for
  an expired or unknown one (``token_anywhere=True`` / ``--token-anywhere``: any place).
* ``/devices`` groups the devices by owner uid with the owner's ``alias`` (a multi-user
  account: the default account also sees a device of user 40012); ``viewerInfo`` adds the
  device's ``logger`` (host:port), ``wowza`` and ``streamname``.
* Alerts: the id is the start time in whole seconds (bumped by one while taken on that
  device), newest first, paged by ``offset``/``limit``, filtered by ``maxage`` (ms) and
  ``startt`` (ms). With ``field_variants`` the items use every spelling the manual shows: the
  id as ``alert`` or ``id``, the end as ``endt``, ``endtt``, ``enddt`` or ``end`` (rotating
  with the id), and one alert in five (id divisible by 5) has its times in seconds. An ongoing
  alert's end is null.
* ``rom`` is 1, or 0 for a device in ``continuous`` (24/7 recording, the manual); an MP4
  asked for with the other ``rom`` is 404 (the clip is looked up in the wrong store). Every
  MP4 request is kept in ``mp4_requests`` (without the token). ``extend_alert`` moves an
  ended alert's end later (motion went on).
* ``/getthumb/<uid>/<time>/<token>`` and ``/getstill/...`` give the image captured at
  ``time`` (``lastthumb``/``laststill`` of ``/cameras/status``), else 404.
* Thumbs 404 until ``media_delay`` has passed; ``buildmp4=1`` gives an mp4 (ISO-BMFF) once the
  alert has ended and ``tail_s`` more has passed (the camera records on after the event),
  else 404 ``{"error": "video not ready"}``; ``buildmp4=0`` a small HLS playlist.
* ``sendcameratask``: ``triggerevent`` starts a "triggered" motion alert (or extends the open
  one); it ends ``tail_s`` after the last call, its end being the time of that last call, so
  its mp4 is ready the moment it ends. ``capturethumb``/``capturestill`` update
  ``lastthumb``/``laststill``; ``livecommand`` makes the camera stream for 60 s.
* ``/cameras/realtime/live`` is a long-lived streaming response: one record per new alert
  (``{"type": "alert", "data": <item as in /alert>}``) or status change (``{"type":
  "liveSession", "data": {...}}``), framed as SSE ``data:`` lines, NDJSON or back-to-back
  JSON objects. It sends nothing on connect (no history) and ends cleanly after
  ``live_max_s``. The logger registers a connection ``live_connect_delay`` = ``(low, high)``
  seconds after the request, uniformly drawn (default ``(0, 0)``); nothing from before the
  registration is ever sent. The manual does not say when the answer (status, headers)
  starts: by default once registered; ``live_answer_first`` (``--live-answer-first``) answers
  at once and registers afterwards.

Things the manual leaves open, decided here:

* The global authenticator checks only the email (unknown: 401), not the password, and
  serves nothing but ``/login`` (anything else: 404 ``{"error": ...}``). Its answer is the
  same for a cookie login.
* A device id not in the account answers 403 ``{"error": "device not authorized"}``; one of
  another logger 404 ``{"error": "device not resident"}``. Lists (``viewerInfo``,
  ``cameras/status``) answer 200 with an ``errors`` list of ``{uidd: reason}``; a realtime
  request covering no resident device answers 404, one covering some silently ignores the
  others. A device moved away is silently dropped from its old logger's open streams.
* Realtime alert records are sent only when an alert is created (the manual: "newly created
  motion events"), not when it ends: poll ``/alert`` for the end.
* ``liveSession``/status ``live`` is true while the camera streams (``status == "live"`` and a
  ``livecommand`` in the last 60 s); ``status`` is ``live``/``offline``/``novideo``.
  ``/cameras/status`` spells the device ``uid`` (as the manual), realtime ``uidd``.
* ``/cameras/status`` takes its devices from ``uid=`` (the manual) and ``uidd=`` (working
  clients); ``status_param="uid"`` or ``"uidd"`` reads only that one, and a request naming
  devices only by the other gets every resident device, as one naming none.
* ``lastactivity`` (never defined by the manual; its sample is two years older than
  ``lastthumb``): ``"alert"`` (default) is the time of the device's last alert, ``"status"``
  also moves on each status change, ``"fixed"`` is the manual's sample value for ever.
* A device ``unallocate``-d has ``logger: null`` in ``viewerInfo`` and no logger serves it.
* Without ``field_variants``, items use ``id`` and ``endt`` in milliseconds. An audio alert
  carries its magnitude in ``aud`` and ``smx`` null. Every device's ``tz`` is 0.
* ``sendcameratask`` knows the manual's actions (``triggerevent``, ``livecommand``,
  ``capturethumb``, ``capturestill`` and the PTZ ones); anything else answers 400.
* ``drop_live_connections()`` resets the TCP connections (RST, no final chunk);
  ``stop()`` ends open streams cleanly first.

Test hooks (Python API and ``/_sim/...`` on the regional authenticator): alerts, ending
them, device status and moves, token expiry and revocation, dropping the realtime streams,
changing the framing, a Poisson alert generator, hostile hooks (``ignore_alert_offset``,
``push_raw`` bytes on the streams, ``refused_paths`` answering 401 (``refuse_after``: after
so many more requests), ``set_logger_hanging``:
connections accepted, never answered), and counters (``requests``, ``logins``,
``live_connections``, ``open_live``, ``tasks``).

Command line: ``python -m cms_ingest.simulators.videoloft --rate 0.2 --framing ndjson``
prints the site URL (one per account with ``--sites N``), then ``READY``, and serves until
SIGTERM/SIGINT. ``base.serve_cli`` expects a single-port ``TenantSimulator``, so this module
has its own small ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import hmac
import json
import random
import secrets
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

from aiohttp import web

from cms_ingest.simulators.base import (
    Handler,
    Route,
    as_bool,
    as_datetime,
    base_url,
    check_rate,
    control_body,
    control_routes,
    parse_cli_args,
    poisson_arrivals,
)
from cms_ingest.simulators.davantis import snapshot_jpeg, video_mp4

DEFAULT_PORT = 21200
AUTH_SCHEME = "manythingtoken"
COOKIE_NAME = "mt_session"
DEFAULT_DEVICES = {"12345.1": "Front door", "12345.2": "Yard", "40012.7": "Shop floor"}
FRAMINGS = ("sse", "ndjson", "concat")
FRAMING_CONTENT_TYPES = {
    "sse": "text/event-stream",
    "ndjson": "application/x-ndjson",
    "concat": "application/json",
}
STATUSES = ("live", "offline", "novideo")
LASTACTIVITY_MODES = ("alert", "status", "fixed")
# Which query parameters /cameras/status reads its devices from: the manual writes `uid=`,
# working clients send `uidd=`. A logger reading only the other one sees no device named and
# answers every resident device (the manual: "If you provide none, you will get all").
STATUS_PARAMS = {"both": ("uidd", "uid"), "uid": ("uid",), "uidd": ("uidd",)}
MANUAL_LASTACTIVITY_MS = 1520250794022  # the manual's /cameras/status sample
NO_LOGGER = -1
# Where the manual puts the token, route by route (paths as in LOGGER_ROUTES/AUTH_ROUTES).
HEADER, QUERY, PATH = "header", "query", "path"
TOKEN_PLACES = {
    "/devices": HEADER,
    "/devices/viewerInfo": HEADER,
    "/cameras/status": HEADER,
    "/cameras/status/": HEADER,
    "/cameras/realtime/live": HEADER,
    "/alert": QUERY,
    "/sendcameratask": QUERY,
    "/alerturl.m3u8": QUERY,
    "/alert.m3u8": QUERY,
    "/alertthumb/{uidd}/{alertid}/{token}": PATH,
    "/alertthumb/{uidd}/{alertid}": PATH,  # no token segment: refused unless token_anywhere
    "/getthumb/{uidd}/{time}/{token}": PATH,
    "/getstill/{uidd}/{time}/{token}": PATH,
}
ALERT_TYPES = ("motion", "audio")
END_KEYS = ("endt", "endtt", "enddt", "end")
ID_KEYS = ("alert", "id")
SECONDS_EVERY = 5  # with field_variants, alerts whose id is a multiple of this use seconds
TASK_ACTIONS = frozenset(
    {"triggerevent", "livecommand", "capturethumb", "capturestill", "ptzstop"}
    | {f"{kind}_{way}" for kind in ("ptz", "ptzstart") for way in ("up", "down", "left", "right")}
    | {f"{kind}_{way}" for kind in ("ptz", "ptzstart") for way in ("in", "out")}
)
LIVE_COMMAND_S = 60.0
LIVE_PROBE_S = 0.5  # how often an idle stream checks that its client is still there
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
VIDEO_BYTES = 4096
HLS_SEGMENT_S = 10
WOWZA_HOST = "wowza-1.videoloft-sim.invalid"
REGION = "sim1"
TOKEN_MEMORY_ABOVE = 1024
MS = 1000


class VlError(Exception):
    """An error the service answers with its ``{"error": ...}`` JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return web.json_response({"error": self.message}, status=self.status)


def _unauthorized() -> VlError:
    return VlError(401, "Unauthorized")


def _now_ms() -> int:
    return int(time.time() * MS)


def _epoch(moment: datetime) -> float:
    return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).timestamp()


# ------------------------------------------------------------------ alerts
@dataclass(slots=True)
class VlAlert:
    """One alert (event) as the simulated service stores it; times are epoch milliseconds,
    readiness times ``time.monotonic()``."""

    uidd: str
    id: int
    start_ms: int
    end_ms: int | None
    type: str
    smx: str | None
    aud: str | None
    tz: int
    thumb_ready_at: float
    mp4_ready_at: float | None
    triggered: bool = False
    rom: int = 1  # 0 when the camera records 24/7 (the manual)

    def thumb_ready(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.thumb_ready_at

    def mp4_ready(self, now: float | None = None) -> bool:
        ready_at = self.mp4_ready_at
        return ready_at is not None and (time.monotonic() if now is None else now) >= ready_at

    def item(self, variants: bool = True) -> dict[str, Any]:
        """The item as ``/alert`` and the realtime stream render it (see the module doc)."""
        seconds = variants and self.id % SECONDS_EVERY == 0

        def stamp(ms: int | None) -> int | None:
            return None if ms is None else (ms // MS if seconds else ms)

        id_key = ID_KEYS[(self.id // len(END_KEYS)) % len(ID_KEYS)] if variants else "id"
        end_key = END_KEYS[self.id % len(END_KEYS)] if variants else "endt"
        device = self.uidd.partition(".")[2]
        return {
            "uid": self.uidd,
            id_key: self.id,
            "deviceid": int(device) if device.isdigit() else device,
            "startt": stamp(self.start_ms),
            end_key: stamp(self.end_ms),
            "rom": self.rom,
            "smx": self.smx,
            "aud": self.aud,
            "tz": self.tz,
            "type": self.type,
            "has_hdstill": 0,
        }


@dataclass(slots=True)
class _Device:
    uidd: str
    owner: str
    device_id: str
    name: str
    logger: int
    status: str = "live"
    last_activity_ms: int = field(default_factory=_now_ms)
    last_alert: int = 0  # seconds
    last_thumb: int | None = None  # seconds
    last_still: int | None = None  # seconds
    streaming_until: float = 0.0  # monotonic
    session: int = field(default_factory=lambda: int(time.time()))
    trigger: VlAlert | None = None
    trigger_last: tuple[float, float] = (0.0, 0.0)  # (epoch, monotonic) of the last call
    trigger_timer: asyncio.TimerHandle | None = None

    @property
    def streaming(self) -> bool:
        return self.status == "live" and time.monotonic() < self.streaming_until

    def state(self) -> dict[str, Any]:
        """The fields ``/cameras/status`` and ``liveSession`` records share."""
        return {
            "session": self.session,
            "live": self.streaming,
            "startt": 0,
            "lastchunkend": None,
            "endt": None,
            "lastactivity": self.last_activity_ms,
            "lastthumb": self.last_thumb,
            "laststill": self.last_still,
            "stillmode": "video_only",
            "wowza": WOWZA_HOST,
            "device": True,
            "status": self.status,
            "lastalert": self.last_alert,
            "battery": None,
            "power": None,
            "stalepower": 1,
            "facebookStreamId": None,
            "queue_mb": None,
            "queue_sec": None,
        }


_END = "end"  # a stream's clean end
_DROP = "drop"  # a stream's abrupt end (connection reset)
Record = dict[str, Any]


@dataclass(eq=False, slots=True)
class _LiveFeed:
    """One open ``/cameras/realtime/live`` stream."""

    logger: int
    devices: set[str]
    queue: asyncio.Queue[Record | str | bytes] = field(default_factory=asyncio.Queue)


# ----------------------------------------------------------------- account
class VideoloftAccount:
    """The state and behaviour of one simulated Videoloft account (its devices, alerts,
    tokens and open realtime streams), whichever of its servers a request reaches."""

    def __init__(
        self,
        *,
        email: str = "cms@example.com",
        password: str = "secret",  # noqa: S107 - the simulated service's test account
        uid: int = 12345,
        token_ttl_s: float = 1200.0,
        devices: dict[str, str] | None = None,
        loggers: int = 2,
        live_max_s: float = 300.0,
        framing: str = "sse",
        media_delay: float = 1.0,
        tail_s: float = 20.0,
        redirect: bool = False,
        max_age_days: int = 7,
        field_variants: bool = True,
        token_anywhere: bool = False,
        live_connect_delay: tuple[float, float] = (0.0, 0.0),
        live_answer_first: bool = False,
        lastactivity: str = "alert",
        continuous: Iterable[str] = (),
        ignore_alert_offset: bool = False,
        status_param: str = "both",
    ) -> None:
        if loggers < 1:
            raise ValueError("loggers must be at least 1")
        self.email, self.password, self.uid = email, password, uid
        self.token_ttl_s = token_ttl_s
        self.loggers = loggers
        self.live_max_s = live_max_s
        self.framing = _check_framing(framing)
        self.media_delay = media_delay
        self.tail_s = tail_s
        self.redirect = redirect
        self.max_age_days = max_age_days
        self.field_variants = field_variants
        self.token_anywhere = token_anywhere
        low, high = live_connect_delay
        if not 0 <= low <= high:
            raise ValueError(
                f"live_connect_delay must be (low, high), 0 <= low <= high: {low, high}"
            )
        self.live_connect_delay = (low, high)
        self.live_answer_first = live_answer_first
        if lastactivity not in LASTACTIVITY_MODES:
            raise ValueError(f"lastactivity must be one of {LASTACTIVITY_MODES}: {lastactivity!r}")
        self.lastactivity = lastactivity
        self.continuous = set(continuous)  # devices recording 24/7: their alerts have rom 0
        self.ignore_alert_offset = ignore_alert_offset
        if status_param not in STATUS_PARAMS:
            raise ValueError(
                f"status_param must be one of {tuple(STATUS_PARAMS)}: {status_param!r}"
            )
        self.status_param = status_param
        self.mp4_requests: list[dict[str, str]] = []
        self.hung_loggers: dict[int, asyncio.Event] = {}
        self.refused_paths: set[str] = set()  # test hook: these routes answer 401 to anyone
        # test hook: a route answers this many more requests, then joins refused_paths
        self.refuse_after: dict[str, int] = {}
        named = DEFAULT_DEVICES if devices is None else devices
        self.devices: dict[str, _Device] = {}
        for index, (uidd, name) in enumerate(named.items()):
            owner, sep, device_id = uidd.partition(".")
            if not (sep and owner and device_id):
                raise ValueError(f"a device id is uid.deviceid, got {uidd!r}")
            self.devices[uidd] = _Device(uidd, owner, device_id, name, index % loggers)
            if lastactivity == "fixed":
                self.devices[uidd].last_activity_ms = MANUAL_LASTACTIVITY_MS
        owners = list(dict.fromkeys(device.owner for device in self.devices.values()))
        self.aliases = {owner: f"Customer {index}" for index, owner in enumerate(owners, 1)}
        self.alerts: dict[str, list[VlAlert]] = {uidd: [] for uidd in self.devices}
        self._alert_index: dict[str, dict[int, VlAlert]] = {uidd: {} for uidd in self.devices}
        self.tasks: list[tuple[str, str, float]] = []
        self.logins = 0
        self.cookie_logins = 0
        self.live_connections = 0
        self.offline_loggers: set[int] = set()
        self.requests: collections.Counter[str] = collections.Counter()
        self.auth_host: str | None = None  # host:port, set by the simulator
        self.logger_hosts: list[str] = []  # host:port per logger, set by the simulator
        self._tokens: dict[str, float] = {}  # token -> epoch it expires
        self._cookies: set[str] = set()
        self._feeds: list[_LiveFeed] = []

    # ----------------------------------------------------------------- alerts
    def add_alert(
        self,
        uidd: str,
        *,
        type: str = "motion",
        ended: bool = True,
        duration_s: float = 5.0,
        start: datetime | None = None,
        smx: str = "07",
    ) -> VlAlert:
        """Record a new alert (see the module docstring) and push it to the open realtime
        streams covering the device. ``ended=False`` leaves it open until ``end_alert``."""
        device = self.device(uidd)
        if type not in ALERT_TYPES:
            raise ValueError(f"type must be one of {ALERT_TYPES}, got {type!r}")
        now_wall, now_mono = time.time(), time.monotonic()
        start_ms = int((now_wall if start is None else _epoch(start)) * MS)
        index = self._alert_index[uidd]
        alert_id = start_ms // MS
        while alert_id in index:
            alert_id += 1
        end_ms = start_ms + int(duration_s * MS) if ended else None
        mp4_ready_at = None if end_ms is None else now_mono + (end_ms / MS - now_wall) + self.tail_s
        alert = VlAlert(
            uidd=uidd,
            id=alert_id,
            start_ms=start_ms,
            end_ms=end_ms,
            type=type,
            smx=smx if type == "motion" else None,
            aud=smx if type == "audio" else None,
            tz=0,
            thumb_ready_at=now_mono + self.media_delay,
            mp4_ready_at=mp4_ready_at,
            rom=0 if uidd in self.continuous else 1,
        )
        bisect.insort(self.alerts[uidd], alert, key=lambda a: a.id)
        index[alert_id] = alert
        device.last_alert = max(device.last_alert, start_ms // MS)
        if self.lastactivity != "fixed":
            device.last_activity_ms = int(now_wall * MS)
        self._push(uidd, {"type": "alert", "data": alert.item(self.field_variants)})
        return alert

    def add_alarms(self, n: int, **kw: Any) -> list[VlAlert]:
        """``n`` alerts (``/_sim/alerts``); ``uidd`` defaults to the first device."""
        uidd = kw.pop("uidd", None) or next(iter(self.devices))
        return [self.add_alert(uidd, **kw) for _ in range(n)]

    def end_alert(self, alert: VlAlert) -> None:
        """End an ongoing alert now; its mp4 is ready ``tail_s`` later."""
        if alert.end_ms is not None:
            return
        alert.end_ms = max(alert.start_ms, _now_ms())
        alert.mp4_ready_at = time.monotonic() + self.tail_s

    def extend_alert(self, alert: VlAlert, seconds: float) -> None:
        """Motion goes on: the alert's end moves ``seconds`` later (its mp4 is ready
        ``tail_s`` after the new end)."""
        if alert.end_ms is None:
            return
        alert.end_ms += int(seconds * MS)
        ready_at = alert.mp4_ready_at if alert.mp4_ready_at is not None else time.monotonic()
        alert.mp4_ready_at = ready_at + seconds

    def alert(self, uidd: str, alert_id: int) -> VlAlert | None:
        return self._alert_index.get(uidd, {}).get(alert_id)

    def find_alerts(
        self,
        uidd: str,
        *,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        maxage_ms: int | None = None,
        startt_ms: int | None = None,
    ) -> list[VlAlert]:
        """One page of the device's alerts, newest first."""
        oldest = None if maxage_ms is None else _now_ms() - maxage_ms
        if startt_ms is not None:
            oldest = startt_ms if oldest is None else max(oldest, startt_ms)
        found: list[VlAlert] = []
        skipped = 0
        for alert in reversed(self.alerts[uidd]):
            if oldest is not None and alert.start_ms < oldest:
                continue
            if skipped < offset:
                skipped += 1
                continue
            if len(found) >= limit:
                break
            found.append(alert)
        return found

    # ---------------------------------------------------------------- devices
    def device(self, uidd: str) -> _Device:
        device = self.devices.get(uidd)
        if device is None:
            raise VlError(403, "device not authorized")
        return device

    def alias(self, owner: str) -> str:
        return self.aliases.get(owner, f"Customer {owner}")

    def set_status(self, uidd: str, status: str) -> None:
        """``live``, ``offline`` or ``novideo``; pushes a ``liveSession`` record."""
        device = self.device(uidd)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        device.status = status
        if self.lastactivity == "status":
            device.last_activity_ms = _now_ms()
        self._push(uidd, {"type": "liveSession", "data": {"uidd": uidd, **device.state()}})

    def move_device(self, uidd: str, logger_index: int) -> None:
        """Allocate the device to another logger; the old one no longer serves it."""
        device = self.device(uidd)
        if not 0 <= logger_index < self.loggers:
            raise ValueError(f"logger must be in 0..{self.loggers - 1}, got {logger_index}")
        device.logger = logger_index
        for feed in self._feeds:
            if feed.logger != logger_index:
                feed.devices.discard(uidd)

    def unallocate(self, uidd: str) -> None:
        """The device has no logger (``viewerInfo`` gives ``logger: null``); no logger
        serves it."""
        self.move_device(uidd, 0)
        self.device(uidd).logger = NO_LOGGER
        for feed in self._feeds:
            feed.devices.discard(uidd)

    def resident(self, uidd: str, logger: int) -> _Device:
        """The device if it lives on ``logger``, else the service's error."""
        device = self.device(uidd)
        if device.logger != logger:
            raise VlError(404, "device not resident")
        return device

    # ------------------------------------------------------------ camera tasks
    def send_task(self, uidd: str, action: str, logger: int) -> None:
        if action not in TASK_ACTIONS:
            raise VlError(400, f"unknown action {action!r}")
        device = self.resident(uidd, logger)
        now = time.monotonic()
        self.tasks.append((uidd, action, now))
        if action == "triggerevent":
            self.trigger_event(uidd)
        elif action == "capturethumb":
            device.last_thumb = int(time.time())
        elif action == "capturestill":
            device.last_still = int(time.time())
        elif action == "livecommand":
            device.streaming_until = now + LIVE_COMMAND_S

    def trigger_event(self, uidd: str) -> VlAlert:
        """Start (or extend) the device's triggered alert; it ends ``tail_s`` after the
        last call. Needs a running event loop (for the timer)."""
        device = self.device(uidd)
        alert = device.trigger
        if alert is None or alert.end_ms is not None:
            alert = self.add_alert(uidd, ended=False, smx="0a")
            alert.triggered = True
            device.trigger = alert
        device.trigger_last = (time.time(), time.monotonic())
        if device.trigger_timer is not None:
            device.trigger_timer.cancel()
        loop = asyncio.get_running_loop()
        device.trigger_timer = loop.call_later(self.tail_s, self._close_trigger, device)
        return alert

    def _close_trigger(self, device: _Device) -> None:
        alert, device.trigger, device.trigger_timer = device.trigger, None, None
        if alert is None or alert.end_ms is not None:
            return
        last_wall, last_mono = device.trigger_last
        alert.end_ms = max(alert.start_ms, int(last_wall * MS))
        alert.mp4_ready_at = last_mono + self.tail_s

    def cancel_timers(self) -> None:
        for device in self.devices.values():
            if device.trigger_timer is not None:
                device.trigger_timer.cancel()
                device.trigger_timer = None
                self._close_trigger(device)

    # ---------------------------------------------------------------- tokens
    def issue_token(self) -> str:
        issued = time.time()
        payload = f"{self.uid}:{int(issued)}:{int(self.token_ttl_s)}:0"
        encoded = base64.urlsafe_b64encode(payload.encode()).decode()
        token = f"{encoded}*{secrets.token_urlsafe(48)}."
        if len(self._tokens) > TOKEN_MEMORY_ABOVE:
            self._tokens = {key: until for key, until in self._tokens.items() if until > issued}
        self._tokens[token] = issued + self.token_ttl_s
        return token

    def check_token(self, token: str | None) -> None:
        expires = self._tokens.get(token or "")
        if expires is None or expires <= time.time():
            raise _unauthorized()

    def login(self, email: str, password: str) -> tuple[str, str]:
        """A password login: a fresh token and a fresh session cookie."""
        if not (self.email_matches(email) and hmac.compare_digest(password, self.password)):
            raise VlError(401, "Invalid email or password")
        self.logins += 1
        cookie = secrets.token_urlsafe(24)
        self._cookies.add(cookie)
        return self.issue_token(), cookie

    def cookie_login(self, cookie: str | None) -> str:
        if cookie is None or cookie not in self._cookies:
            raise _unauthorized()
        self.cookie_logins += 1
        return self.issue_token()

    def email_matches(self, email: str) -> bool:
        return email.strip().lower() == self.email.lower()

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired; the cookies still work."""
        self._tokens = dict.fromkeys(self._tokens, 0.0)

    def revoke_all(self) -> None:
        """Tokens and cookies are invalid: only a password login works."""
        self._tokens.clear()
        self._cookies.clear()

    # -------------------------------------------------------- realtime streams
    @property
    def open_live(self) -> int:
        return len(self._feeds)

    def open_feed(self, logger: int, devices: Iterable[str]) -> _LiveFeed:
        feed = _LiveFeed(logger, set(devices))
        self._feeds.append(feed)
        self.live_connections += 1
        return feed

    def close_feed(self, feed: _LiveFeed) -> None:
        with contextlib.suppress(ValueError):
            self._feeds.remove(feed)

    def _push(self, uidd: str, record: Record) -> None:
        for feed in self._feeds:
            if uidd in feed.devices:
                feed.queue.put_nowait(record)

    def push_raw(self, uidd: str, data: bytes) -> None:
        """Send ``data`` as it is on the open streams covering the device (hostile input:
        a record without its end, garbage)."""
        for feed in self._feeds:
            if uidd in feed.devices:
                feed.queue.put_nowait(data)

    def _end_feeds(self, signal_: str) -> None:
        feeds, self._feeds = self._feeds, []
        for feed in feeds:
            feed.queue.put_nowait(signal_)

    def drop_live_connections(self) -> None:
        """Reset every open realtime stream (no final chunk)."""
        self._end_feeds(_DROP)

    def set_logger_offline(self, logger: int, offline: bool = True) -> None:
        """A logger server going down (503 to everything, its streams reset) or coming back."""
        if offline:
            self.offline_loggers.add(logger)
            feeds = [feed for feed in self._feeds if feed.logger == logger]
            for feed in feeds:
                self._feeds.remove(feed)
                feed.queue.put_nowait(_DROP)
        else:
            self.offline_loggers.discard(logger)

    def set_logger_hanging(self, logger: int, hanging: bool = True) -> None:
        """A logger that accepts connections and never answers (until released); its
        open streams go silent."""
        if hanging:
            self.hung_loggers.setdefault(logger, asyncio.Event())
        else:
            released = self.hung_loggers.pop(logger, None)
            if released is not None:
                released.set()

    def end_live_connections(self) -> None:
        """End every open realtime stream cleanly."""
        self._end_feeds(_END)

    def set_framing(self, framing: str) -> None:
        """The framing of streams opened from now on."""
        self.framing = _check_framing(framing)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "alerts": {uidd: len(alerts) for uidd, alerts in self.alerts.items()},
            "devices": {
                uidd: {"logger": device.logger, "status": device.status}
                for uidd, device in self.devices.items()
            },
            "auth_host": self.auth_host,
            "logger_hosts": list(self.logger_hosts),
            "framing": self.framing,
            "logins": self.logins,
            "cookie_logins": self.cookie_logins,
            "live_connections": self.live_connections,
            "open_live": self.open_live,
            "tasks": [list(task) for task in self.tasks],
            "requests": dict(self.requests),
        }


def _check_framing(framing: str) -> str:
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    return framing


def frame(record: Record, framing: str) -> bytes:
    """One realtime record in the stream's framing."""
    text = json.dumps(record, separators=(",", ":"))
    if framing == "sse":
        return f"data: {text}\n\n".encode()
    if framing == "ndjson":
        return f"{text}\n".encode()
    return text.encode()


# ------------------------------------------------------------ request parts
_ROLE = web.AppKey("videoloft_role", str)
_LOGGER = web.AppKey("videoloft_logger", int)


def _logger_of(request: web.Request) -> int:
    return request.app[_LOGGER]


def request_token(request: web.Request, place: str | None = None) -> str | None:
    """The token from where the manual puts it for this route (``place``: the path's last
    segment, the Authorization header or ``?token=``); from any of them when ``place`` is
    None (``token_anywhere``)."""
    if place in (PATH, None) and request.match_info.get("token"):
        return request.match_info["token"]
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if place in (HEADER, None) and scheme.lower() == AUTH_SCHEME and value.strip():
        return value.strip()
    if place in (QUERY, None):
        return request.query.get("token") or None
    return None


def _query_int(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = query.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise VlError(400, f"invalid {name}: {raw!r}") from None
    if value < 0:
        raise VlError(400, f"invalid {name}: {raw!r}")
    return value


def _uidds(request: web.Request, names: Sequence[str] = STATUS_PARAMS["both"]) -> list[str]:
    """Every value of the ``names`` parameters (default ``uidd=``/``uid=``; repeated or
    comma-separated), in order."""
    raw = [value for name in names for value in request.query.getall(name, [])]
    parts = (part.strip() for value in raw for part in value.split(","))
    return list(dict.fromkeys(part for part in parts if part))


def _one_uidd(request: web.Request) -> str:
    uidds = _uidds(request)
    if len(uidds) != 1:
        raise VlError(400, "one uid (uid.deviceid) is required")
    return uidds[0]


async def _login_params(request: web.Request) -> dict[str, str]:
    """Query parameters, overridden by a JSON or form body."""
    params = dict(request.query)
    if request.method == "POST":
        raw = (await request.read()).decode(errors="replace").strip()
        body: Any = None
        if raw.startswith("{"):
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        if isinstance(body, dict):
            params.update({str(key): str(value) for key, value in body.items()})
        elif raw:
            parsed = parse_qs(raw, keep_blank_values=True)
            params.update({key: values[0] for key, values in parsed.items()})
    return params


def _group(
    account: VideoloftAccount,
    devices: Iterable[_Device],
    render: Callable[[_Device], dict[str, Any]],
    aliases: bool = True,
) -> dict[str, Any]:
    """Devices grouped by owner uid, the way every Videoloft list is."""
    result: dict[str, Any] = {}
    for device in devices:
        group = result.setdefault(device.owner, {"devices": {}})
        if aliases:
            group["alias"] = account.alias(device.owner)
        group["devices"][device.device_id] = render(device)
    return result


def _select(
    account: VideoloftAccount,
    request: web.Request,
    logger: int | None = None,
    names: Sequence[str] = STATUS_PARAMS["both"],
) -> tuple[list[_Device], list[dict[str, str]]]:
    """The requested devices (named by the ``names`` parameters; all when none named; on
    ``logger`` if given) and the errors."""
    named = _uidds(request, names)
    if not named:
        return [
            device
            for device in account.devices.values()
            if logger is None or device.logger == logger
        ], []
    found: list[_Device] = []
    errors: list[dict[str, str]] = []
    for uidd in named:
        device = account.devices.get(uidd)
        if device is None:
            errors.append({uidd: "Unauthorized"})
        elif logger is not None and device.logger != logger:
            errors.append({uidd: "device not resident"})
        else:
            found.append(device)
    return found, errors


def _listing(result: dict[str, Any], errors: list[dict[str, str]]) -> web.Response:
    body: dict[str, Any] = {"result": result}
    if errors:
        body["errors"] = errors
    return web.json_response(body)


# ------------------------------------------------------- authenticator API
def _login_answer(account: VideoloftAccount, token: str, cookie: str) -> web.Response:
    result = {
        "uid": account.uid,
        "authToken": token,
        "authenticator": account.auth_host,
        "accountInfo": {"maxAge": account.max_age_days, "type": "paid", "maxDevices": 100},
        "time": _now_ms(),
        "region": REGION,
        "email": account.email,
    }
    response = web.json_response({"result": result})
    response.set_cookie(COOKIE_NAME, cookie, path="/", httponly=True)
    return response


async def _login(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    params = await _login_params(request)
    if params.get("caller") == "cookielogin" and "password" not in params:
        cookie = request.cookies.get(COOKIE_NAME)
        token = account.cookie_login(cookie)
        assert cookie is not None
        return _login_answer(account, token, cookie)
    token, cookie = account.login(params.get("email", ""), params.get("password", ""))
    return _login_answer(account, token, cookie)


async def _global_login(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    params = await _login_params(request)
    cookie_login = params.get("caller") == "cookielogin" and "email" not in params
    if not (cookie_login or account.email_matches(params.get("email", ""))):
        raise VlError(401, "Invalid email or password")
    return web.json_response({"location": account.auth_host})


async def _devices(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    def render(device: _Device) -> dict[str, Any]:
        return {
            "uidd": device.uidd,
            "phonename": device.name,
            "permissions": _perm(account, device),
        }

    return _listing(_group(account, account.devices.values(), render), [])


def _perm(account: VideoloftAccount, device: _Device) -> list[str]:
    return ["a"] if device.owner == str(account.uid) else ["r"]


async def _viewer_info(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    devices, errors = _select(account, request)

    def render(device: _Device) -> dict[str, Any]:
        hosts = account.logger_hosts
        return {
            "uidd": device.uidd,
            "phonename": device.name,
            "permissions": _perm(account, device),
            "wowza": WOWZA_HOST,
            "logger": hosts[device.logger] if 0 <= device.logger < len(hosts) else None,
            "cloudRecordingEnabled": 1,
            "appVersion": "4.2.0",
            "deviceType": "ipcam201701",
            "streamname": f"{device.uidd}_{device.session % 100000}-nr",
            "language": "en-GB",
        }

    return _listing(_group(account, devices, render), errors)


async def _global_elsewhere(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    raise VlError(404, "the global authenticator only serves /login: use your authenticator")


# ---------------------------------------------------------------- logger API
async def _alert_list(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    uidd = _one_uidd(request)
    account.resident(uidd, _logger_of(request))
    query = request.query
    limit = _query_int(query, "limit", DEFAULT_LIMIT)
    offset = _query_int(query, "offset", 0) or 0
    found = account.find_alerts(
        uidd,
        offset=0 if account.ignore_alert_offset else offset,
        limit=min(DEFAULT_LIMIT if limit is None else limit, MAX_LIMIT),
        maxage_ms=_query_int(query, "maxage", None),
        startt_ms=_query_int(query, "startt", None),
    )
    return web.json_response({"result": [alert.item(account.field_variants) for alert in found]})


def _path_alert(account: VideoloftAccount, request: web.Request) -> VlAlert:
    uidd = request.match_info["uidd"]
    account.resident(uidd, _logger_of(request))
    raw = request.match_info["alertid"]
    alert = account.alert(uidd, int(raw)) if raw.isdigit() else None
    if alert is None:
        raise VlError(404, "alert not found")
    return alert


async def _alert_thumb(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    alert = _path_alert(account, request)
    if not alert.thumb_ready():
        raise VlError(404, "thumb not ready")
    return web.Response(body=snapshot_jpeg(alert.id), content_type="image/jpeg")


def _query_alert(account: VideoloftAccount, request: web.Request) -> VlAlert:
    uidd = _one_uidd(request)
    account.resident(uidd, _logger_of(request))
    alert_id = _query_int(request.query, "id", None)
    if alert_id is not None:
        alert = account.alert(uidd, alert_id)
    else:  # no id: the alert starting at startt (seconds)
        start = _query_int(request.query, "startt", None)
        alert = next((a for a in account.alerts[uidd] if a.start_ms // MS == start), None)
    if alert is None:
        raise VlError(404, "alert not found")
    return alert


def playlist(alert: VlAlert) -> str:
    """A small HLS playlist for the alert (the segments are not served)."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{HLS_SEGMENT_S}"]
    lines.append("#EXT-X-MEDIA-SEQUENCE:0")
    end_ms = alert.end_ms
    if end_ms is None:
        lines.append("#EXT-X-PLAYLIST-TYPE:EVENT")
        return "\n".join(lines) + "\n"
    lines.append("#EXT-X-PLAYLIST-TYPE:VOD")
    remaining = max(0.001, (end_ms - alert.start_ms) / MS)
    segment = 0
    while remaining > 0:
        length = min(float(HLS_SEGMENT_S), remaining)
        lines += [f"#EXTINF:{length:.3f},", f"/alertts/{alert.uidd}/{alert.id}/{segment}.ts"]
        remaining -= length
        segment += 1
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


async def _captured_image(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    """``/getthumb`` and ``/getstill``: the image captured at ``time`` (``lastthumb`` /
    ``laststill``); any other time answers 404."""
    uidd = request.match_info["uidd"]
    device = account.resident(uidd, _logger_of(request))
    still = request.path.startswith("/getstill/")
    taken = device.last_still if still else device.last_thumb
    if taken is None or request.match_info["time"].strip() != str(taken):
        raise VlError(404, "image not found")
    return web.Response(body=snapshot_jpeg(taken), content_type="image/jpeg")


async def _alert_video(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    alert = _query_alert(account, request)
    if request.query.get("buildmp4", "0").strip() == "1":
        account.mp4_requests.append(
            {key: value for key, value in request.query.items() if key != "token"}
        )
        if request.query.get("rom", "1").strip() != str(alert.rom):
            raise VlError(404, "alert not found")  # the clip is looked up in the wrong store
        if not alert.mp4_ready():
            raise VlError(404, "video not ready")
        return web.Response(body=video_mp4(alert.id, VIDEO_BYTES), content_type="video/mp4")
    return web.Response(text=playlist(alert), content_type="application/vnd.apple.mpegurl")


async def _send_task(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    uidd = _one_uidd(request)
    account.send_task(uidd, request.query.get("action", "").strip(), _logger_of(request))
    return web.json_response({"result": "request sent to camera"})


async def _camera_status(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    names = STATUS_PARAMS[account.status_param]
    devices, errors = _select(account, request, _logger_of(request), names)

    def render(device: _Device) -> dict[str, Any]:
        return {"uid": device.uidd, "permissions": _perm(account, device), **device.state()}

    return _listing(_group(account, devices, render, aliases=False), errors)


def _reset(request: web.Request) -> None:
    """Close the client's connection abruptly (RST, no final chunk)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _realtime(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    logger = _logger_of(request)
    devices, errors = _select(account, request, logger)
    if not devices:
        return web.json_response({"error": "device not resident", "errors": errors}, status=404)
    framing = account.framing
    uidds = [device.uidd for device in devices]
    feed = None
    try:
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = FRAMING_CONTENT_TYPES[framing]
        response.enable_chunked_encoding()
        if account.live_answer_first:
            await response.prepare(request)
            feed = await _register(account, logger, uidds)
        else:
            feed = await _register(account, logger, uidds)
            await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + account.live_max_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(feed.queue.get(), min(remaining, LIVE_PROBE_S))
            except TimeoutError:
                if _gone(request):
                    return response
                continue
            if item == _DROP:
                _reset(request)
                return response
            if item == _END:
                break
            if isinstance(item, dict):
                await response.write(frame(item, framing))
            elif isinstance(item, bytes):  # push_raw: exactly these bytes
                await response.write(item)
        await response.write_eof()
        return response
    finally:
        if feed is not None:
            account.close_feed(feed)


async def _register(account: VideoloftAccount, logger: int, uidds: list[str]) -> _LiveFeed:
    """The logger registers a realtime connection ``live_connect_delay`` after the request;
    only updates from then on are sent on it."""
    low, high = account.live_connect_delay
    if high > 0:
        await asyncio.sleep(random.uniform(low, high))
    return account.open_feed(logger, uidds)


# ----------------------------------------------------- /_sim control surface
_ALERT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "uidd": str,
    "type": str,
    "ended": as_bool,
    "duration_s": float,
    "start": as_datetime,
    "smx": str,
}
_FAULT_KEYS = frozenset(
    {"drop_live", "expire_tokens", "revoke_all", "move", "status", "framing", "end_live"}
)


async def _sim_faults(account: VideoloftAccount, request: web.Request) -> web.StreamResponse:
    body = await control_body(request)
    unknown = set(body) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown faults: {sorted(unknown)}")
    if "framing" in body:
        account.set_framing(str(body["framing"]))
    if "move" in body:
        move = body["move"]
        account.move_device(str(move["uidd"]), int(move["logger"]))
    if "status" in body:
        status = body["status"]
        account.set_status(str(status["uidd"]), str(status["status"]))
    if body.get("expire_tokens"):
        account.expire_tokens()
    if body.get("revoke_all"):
        account.revoke_all()
    if body.get("drop_live"):
        account.drop_live_connections()
    if body.get("end_live"):
        account.end_live_connections()
    return web.json_response(account.state())


def _control_routes() -> tuple[Route[VideoloftAccount], ...]:
    """``/_sim/alerts`` (also ``/_sim/alarms``, as the other simulators), ``/_sim/faults``,
    ``/_sim/state``."""
    routes = control_routes(_ALERT_FIELDS, _sim_faults)
    alarms = next(route for route in routes if route.path == "/_sim/alarms")
    return (*routes, alarms._replace(path="/_sim/alerts"))


CONTROL_ROUTES = _control_routes()
AUTH_ROUTES: tuple[Route[VideoloftAccount], ...] = (
    Route("GET", "/login", _login, auth=False),
    Route("POST", "/login", _login, auth=False),
    Route("GET", "/devices", _devices),
    Route("GET", "/devices/viewerInfo", _viewer_info),
)
GLOBAL_ROUTES: tuple[Route[VideoloftAccount], ...] = (
    Route("GET", "/login", _global_login, auth=False),
    Route("POST", "/login", _global_login, auth=False),
    Route("*", "/{tail:.*}", _global_elsewhere, auth=False),
)
LOGGER_ROUTES: tuple[Route[VideoloftAccount], ...] = (
    Route("GET", "/alert", _alert_list),
    Route("GET", "/alertthumb/{uidd}/{alertid}/{token}", _alert_thumb),
    Route("GET", "/alertthumb/{uidd}/{alertid}", _alert_thumb),
    Route("GET", "/getthumb/{uidd}/{time}/{token}", _captured_image),
    Route("GET", "/getstill/{uidd}/{time}/{token}", _captured_image),
    Route("GET", "/alerturl.m3u8", _alert_video),
    Route("GET", "/alert.m3u8", _alert_video),
    Route("GET", "/sendcameratask", _send_task),
    Route("GET", "/cameras/status", _camera_status),
    Route("GET", "/cameras/status/", _camera_status),
    Route("GET", "/cameras/realtime/live", _realtime),
)


def _count_key(path: str) -> str:
    """``/alertthumb/{uidd}/...`` -> ``/alertthumb``: the path without its variable part."""
    return path.split("{", 1)[0].rstrip("/") or "/"


def _device_handler(account: VideoloftAccount, route: Route[VideoloftAccount]) -> Handler:
    key = _count_key(route.path)
    place = TOKEN_PLACES.get(route.path)

    async def handle(request: web.Request) -> web.StreamResponse:
        account.requests[f"{request.app[_ROLE]} {request.method} {key}"] += 1
        if request.app[_LOGGER] in account.offline_loggers:
            return web.json_response({"error": "logger unavailable"}, status=503)
        released = account.hung_loggers.get(request.app[_LOGGER])
        if released is not None:
            await released.wait()  # accepts the connection, answers only once released
        if key in account.refuse_after:
            account.refuse_after[key] -= 1
            if account.refuse_after[key] < 0:
                del account.refuse_after[key]
                account.refused_paths.add(key)
        if key in account.refused_paths:
            return _unauthorized().response()
        try:
            if route.auth:
                account.check_token(
                    request_token(request, None if account.token_anywhere else place)
                )
            return await route.handler(account, request)
        except VlError as error:
            return error.response()

    return handle


def _control_handler(account: VideoloftAccount, route: Route[VideoloftAccount]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await route.handler(account, request)
        except (ValueError, TypeError, KeyError, VlError) as error:
            return web.json_response({"error": str(error)}, status=400)

    return handle


def _build_app(
    account: VideoloftAccount,
    role: str,
    routes: Iterable[Route[VideoloftAccount]],
    control: Iterable[Route[VideoloftAccount]] = (),
    logger: int = -1,
) -> web.Application:
    app = web.Application()
    app[_ROLE] = role
    app[_LOGGER] = logger
    for route in control:
        app.router.add_route(route.method, route.path, _control_handler(account, route))
    for route in routes:
        app.router.add_route(route.method, route.path, _device_handler(account, route))
    return app


def _host_port(runner: web.AppRunner) -> str:
    return base_url(runner.addresses[0]).removeprefix("http://")


# --------------------------------------------------------------- the servers
class VideoloftSimulator:
    """One simulated account: its loggers, its regional authenticator and, with
    ``redirect``, a global authenticator, each on its own port."""

    def __init__(self, account: VideoloftAccount | None = None) -> None:
        self.account = account if account is not None else VideoloftAccount()
        self._runners: list[web.AppRunner] = []
        self._url: str | None = None
        self._generator: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def logger_hosts(self) -> list[str]:
        """``host:port`` per logger (no scheme, as ``viewerInfo`` gives them)."""
        return self.account.logger_hosts

    @property
    def url(self) -> str:
        """The site URL: the global authenticator with ``redirect``, else the regional one."""
        if self._url is None:
            raise RuntimeError("the simulator is not started")
        return self._url

    @property
    def auth_url(self) -> str:
        """The regional authenticator (where ``/_sim`` lives)."""
        if self.account.auth_host is None:
            raise RuntimeError("the simulator is not started")
        return f"http://{self.account.auth_host}"

    def logger_url(self, index: int) -> str:
        return f"http://{self.logger_hosts[index]}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve every server (the site URL's on ``port``, the others on free ports) and
        return the site URL."""
        if self._runners:
            raise RuntimeError("the simulator is already started")
        account = self.account
        try:
            account.logger_hosts = []
            for index in range(account.loggers):
                app = _build_app(account, f"logger{index}", LOGGER_ROUTES, logger=index)
                account.logger_hosts.append(await self._serve(app, host, 0))
            regional = _build_app(account, "auth", AUTH_ROUTES, CONTROL_ROUTES)
            account.auth_host = await self._serve(regional, host, 0 if account.redirect else port)
            site = account.auth_host
            if account.redirect:
                site = await self._serve(_build_app(account, "global", GLOBAL_ROUTES), host, port)
        except BaseException:
            await self.stop()
            raise
        self._url = f"http://{site}"
        return self._url

    async def _serve(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port).start()
        return _host_port(runner)

    async def stop(self) -> None:
        await self.stop_generator()
        self.account.end_live_connections()
        self.account.cancel_timers()
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        self._url = None

    # -------------------------------------------------------------- generator
    def start_generator(self, rate: float, *, seed: int | None = None) -> None:
        """Ended alerts on random devices, a Poisson process at ``rate`` per second."""
        check_rate(rate)
        if self._generator is not None:
            raise RuntimeError("the generator is already running")
        work = self._generate(rate, random.Random(seed))
        self._generator = asyncio.get_running_loop().create_task(work)

    async def stop_generator(self) -> None:
        task, self._generator = self._generator, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _generate(self, rate: float, rng: random.Random) -> None:
        await poisson_arrivals(lambda: rate, rng, lambda: _generated_alert(self.account, rng))


def _generated_alert(account: VideoloftAccount, rng: random.Random) -> None:
    kind = rng.choice(("motion", "motion", "motion", "audio"))
    account.add_alert(
        rng.choice(list(account.devices)),
        type=kind,
        duration_s=rng.uniform(2.0, 15.0),
        smx=f"{rng.randint(1, 10):02x}",
    )


# ------------------------------------------------------------ command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framing", choices=FRAMINGS, default="sse")
    parser.add_argument("--loggers", type=int, default=2)
    parser.add_argument("--redirect", action="store_true", help="serve a global authenticator")
    parser.add_argument("--media-delay", type=float, default=1.0)
    parser.add_argument("--tail", type=float, default=20.0, help="seconds of video after an end")
    parser.add_argument("--live-max", type=float, default=300.0)
    parser.add_argument("--token-ttl", type=float, default=1200.0)
    parser.add_argument(
        "--token-anywhere",
        action="store_true",
        help="accept the token in the header, the query or the path on every route",
    )
    parser.add_argument(
        "--live-connect-delay",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("LOW", "HIGH"),
        help="seconds before a realtime request is registered and answered (uniform)",
    )
    parser.add_argument(
        "--live-answer-first",
        action="store_true",
        help="answer a realtime request at once, register it after --live-connect-delay",
    )
    parser.add_argument("--lastactivity", choices=LASTACTIVITY_MODES, default="alert")
    parser.add_argument(
        "--status-param",
        choices=tuple(STATUS_PARAMS),
        default="both",
        help="the query parameter(s) /cameras/status reads its devices from",
    )
    parser.add_argument(
        "--continuous", nargs="*", default=[], metavar="UIDD", help="devices recording 24/7"
    )
    parser.add_argument(
        "--ignore-alert-offset", action="store_true", help="hostile: /alert ignores offset"
    )


def account_from_args(args: argparse.Namespace) -> VideoloftAccount:
    return VideoloftAccount(
        framing=args.framing,
        loggers=args.loggers,
        redirect=args.redirect,
        media_delay=args.media_delay,
        tail_s=args.tail,
        live_max_s=args.live_max,
        token_ttl_s=args.token_ttl,
        token_anywhere=args.token_anywhere,
        live_connect_delay=tuple(args.live_connect_delay),
        live_answer_first=args.live_answer_first,
        lastactivity=args.lastactivity,
        continuous=args.continuous,
        ignore_alert_offset=args.ignore_alert_offset,
        status_param=args.status_param,
    )


async def serve(args: argparse.Namespace) -> None:
    """One simulator per ``--sites`` (the first on ``--port`` when alone, else free ports),
    alerts at ``--rate`` per account; print the site URLs then ``READY``; run until
    SIGTERM/SIGINT."""
    simulators = [VideoloftSimulator(account_from_args(args)) for _ in range(args.sites)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        urls = []
        for index, simulator in enumerate(simulators):
            urls.append(await simulator.start(args.host, args.port if args.sites == 1 else 0))
            if args.rate > 0:
                seed = None if args.seed is None else args.seed + index
                simulator.start_generator(args.rate, seed=seed)
        for url in urls:
            print(url, flush=True)
        print("READY", flush=True)
        await stop.wait()
    finally:
        for simulator in simulators:
            await simulator.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli_args(
        argv,
        description="Serve a simulated Videoloft account (authenticator and loggers).",
        default_port=DEFAULT_PORT,
        add_arguments=_add_arguments,
    )
    if args.loggers < 1:
        raise SystemExit("--loggers must be at least 1")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
