"""A simulated exacqVision server (Web Service HTTP API v1), or many of them, over real HTTP.

The project's tests, the demo and the benchmark point the ingest daemon at this server instead
of a real exacqVision web service. One process can host many tenants: the ``default`` tenant
answers at the root and every other tenant under ``/t/<tenant>``; every path below is relative
to the tenant's base URL.

Device behaviour reproduced (from the vendor manual and the integrators' notes):

* Sessions: ``POST /v1/login.web`` (form ``u``, ``p``, ``responseVersion=2``, ``s`` = server
  id, default 0) answers ``{"success": true, "<session key>": "<uuid>", "name": "Server 1",
  "id": "0", ...}``; the key is ``sessionId`` as working clients see it, or ``sessionID`` as
  the manual spells it (``session_key``). Bad credentials: 200 ``{"success": false, "error":
  "Invalid username or password"}``. ``POST /v1/logout.web?s=SID`` answers 200 text/html
  ``login.web``. Every other route needs ``s=<session>`` (query; for a POST also the form).
* An expired or unknown session shows as ``expiry_mode`` says: ``"401"``, ``"403"``, ``"302"``
  (``Location`` the tenant's ``/v1/login.web``, empty body), ``"html"`` (200 with the HTML
  login page) or ``"success_false"`` (200 ``{"success": false, "error": "Session expired"}``).
* Times are RFC 3339 in the server's offset (``utc_offset``): ``2026-11-21T05:00:00-05:00``;
  with ``naive_times`` events and links carry no offset (``2026-11-21T05:00:00``).
* ``config.web`` lists ``Cameras`` (with their video ``formats``) and ``Triggers``, and the
  server's ``timezone`` in hours as the manual's List Cameras sample shows it (``-5``).
* ``events.web`` lists the ACTIVE events only (``filter=N`` repeated keeps those types; none:
  every type, as the manual says), named after the manual's 29 event types, with an ``id``
  unless ``event_ids`` is false (then a client must identify an event by ``type`` +
  ``sourceId`` + ``start``). What the id names is ``event_id_style``: ``uuid`` (default, one per
  occurrence), ``counter`` (1, 2, ... per occurrence, starting again at 1 after
  ``reset_device()``) or ``definition`` (the event definition: repeats share it).
* Event Monitoring (the manual's List Event Monitoring Profiles and List Triggered Event
  Links), unless ``event_monitoring`` is false (then 404): ``GET /v1/eventmonitoring.web``
  answers ``{"profiles": [{"name": ...}], "success": true}`` for ``monitoring_profiles``
  (default one, ``CMS``); ``GET /v1/eventmonitoring.web/<profile>/triggered?duration=N`` (0-60,
  default 5, as the manual) answers ``{"success": true, "triggeredEvents": [...]}``: every
  profile has an any-source link that fires on every event, kept 60 s, as
  ``{"guid", "eventSourceType" (the manual's 1-20), "eventSourceId", "eventSourceName",
  "eventType", "time", "eventId"}`` (the paths and link fields are our assumption).
* ``reset_device()`` (control: ``{"reset_device": true}``): a factory reset, replaced box or
  reinstalled server: events, links, exports and sessions gone, a counter id restarts at 1.
* Soft triggers (``softtriggers.web``): each ``on`` keeps the trigger on for
  ``trigger_hold_s`` (the manual's ~3 s), then it drops to off by itself; ``off`` turns it off
  at once. Unknown ``tid``: 404 text/plain ``Invalid Request``; bad ``state``: 400.
* ``frame.web`` (the recorded frame nearest ``time``) and ``video.web`` (a live frame) answer a
  JPEG; without ``recorded`` (nothing was recorded) ``frame.web`` answers 404.
* ``export.web``: without parameters the formats; with ``camera``/``start``/``end``/``format``
  a new export (``end`` in the future: 400); with ``export=ID`` its ``progress`` (growing
  linearly 0..100 over ``export_seconds``, an int for even-numbered exports and a string for
  odd ones: both occur on real servers), ``&action=download`` (the MP4 once completed, else
  400) and ``&action=finish`` (frees it). Its ``status`` becomes ``completed``
  ``finalize_seconds`` after progress reached 100 (default 0: at once); a download before that
  is refused. The format list is ``export_formats`` (default ``ps_zip``, ``mp4``, ``avi``).
  An export no request named for ``export_idle_s`` (the manual: 15 minutes) is cleaned up:
  it answers 404 from then on (``cleaned`` true in ``exports``).
* Refusals: an unknown soft-trigger ``tid`` answers text/plain ``Invalid Request`` with
  ``refusal_status`` (default 404; the manual shows the text but no status, so ``200`` is a
  mode); ``export.web``'s ``{"success": false, "error": ...}`` answers come with their 4xx, or
  all with ``failure_status`` (e.g. 200) when set.

Things the manual leaves open, decided here:

* A session lasts ``session_ttl_s`` from its login, however busy it is, so a long-running
  client meets expiry; ``expire_sessions()`` invalidates every session at once.
* The login needs ``responseVersion=2`` (anything else: 400 ``Invalid Request``, the
  deprecated version 1 format is not simulated) and ``s`` absent or ``0``. The form may also
  come in the query. ``GET /v1/login.web`` answers the HTML login page (where a client that
  follows the ``302`` lands); logout also answers GET and never checks the session.
* A time without an offset is in the server's offset; a ``+`` that arrived as a space (not
  percent-encoded) is put back. A default event start is the server clock to the second.
* ``frame.web`` and ``video.web`` serve formats 0 and 6 (JPEG) only (400 for the others,
  streams are not simulated). The frame of any time, future included, is served (the nearest
  recorded frame is then the newest). ``recorded`` only affects ``frame.web``: exports work
  either way.
* Exports are numbered 1, 2, ... per site (the first export's progress is a string). The
  download is always an MP4 body (``video/mp4``, 8 KiB), whatever the format asked. A finished
  export answers 404 afterwards but stays in ``exports`` with ``finished`` true.
* Only cameras can be exported (``audio``/``serial`` are not simulated).
* ``trigger_sets`` records every set request with an integer ``tid``, refused ones too.

Test hooks (Python API and ``/_sim/...`` HTTP control surface): event activation and end, a
Poisson event generator shared by all tenants (each generated event ends after 2-10 s),
session expiry and the way it shows, soft-trigger history, exports.

Command line: ``python -m cms_ingest.simulators.exacq --sites 500 --rate 0.2`` prints one site
URL per line, then ``READY``, and serves until SIGTERM/SIGINT. Switches: ``--expiry-mode``,
``--session-key``, ``--session-ttl``, ``--export-seconds``, ``--utc-offset``, ``--no-event-ids``,
``--event-id-style``, ``--no-event-monitoring``, ``--naive-times``, ``--export-formats a,b``,
``--finalize-seconds``, ``--export-idle-seconds``, ``--refusal-status``, ``--failure-status``,
``--no-recorded``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import random
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from time import monotonic
from typing import Any, NamedTuple

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
)
from cms_ingest.simulators.davantis import snapshot_jpeg, video_mp4

DEFAULT_PORT = 21300
V1 = "/v1"
LOGIN_PATH = f"{V1}/login.web"
LOGOUT_PATH = f"{V1}/logout.web"
CONFIG_PATH = f"{V1}/config.web"
EVENTS_PATH = f"{V1}/events.web"
SOFTTRIGGERS_PATH = f"{V1}/softtriggers.web"
FRAME_PATH = f"{V1}/frame.web"
VIDEO_PATH = f"{V1}/video.web"
EXPORT_PATH = f"{V1}/export.web"
MONITORING_PATH = f"{V1}/eventmonitoring.web"
TRIGGERED_PATH = f"{MONITORING_PATH}/{{profile}}/triggered"

EXPIRY_MODES = ("401", "403", "302", "html", "success_false")
EVENT_ID_STYLES = ("uuid", "counter", "definition")
TRIGGERED_KEEP_S = 60.0  # the manual: triggered links are stored for at most 60 s
DEFAULT_PROFILE = "CMS"
# Event Monitoring source types (their own enumeration, 1-20) of the event types (1-29).
MONITOR_SOURCE_TYPES: dict[int, int] = {
    22: 1, 23: 2, 3: 3, 2: 4, 1: 5, 21: 6, 4: 7, 5: 8, 6: 10, 24: 11, 25: 15, 27: 17, 28: 17,
    29: 19,
}  # fmt: skip
HEALTH_SOURCE_TYPE = 9  # every other event type is a health event
SESSION_KEYS = ("sessionId", "sessionID")
JPEG_FORMATS = frozenset({0, 6})
CAMERA_FORMATS = (0, 5, 6)
EXPORT_FORMATS = ("ps_zip", "mp4", "avi")
DEFAULT_EXPORT_FORMAT = "ps_zip"
EXPORT_BYTES = 8192
SERVER_NAME = "Server 1"
SERVER_ID = "0"
MAX_KEPT_EVENTS = 10_000  # ended events beyond this are forgotten, oldest first
GENERATED_TYPES = (1, 3, 24)
GENERATED_DURATION_S = (2.0, 10.0)
INVALID_REQUEST = "Invalid Request"
LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>exacqVision Web Service</title></head><body>\n"
    '<form action="login.web" method="post">\n'
    '<input name="u"> <input name="p" type="password">\n'
    '<input name="responseVersion" type="hidden" value="2">\n'
    "<button>Log in</button></form>\n</body></html>\n"
)

EVENT_TYPES: dict[int, str] = {
    1: "Video motion",
    2: "Video loss",
    3: "Input trigger active",
    4: "Serial keyword match",
    5: "Serial rule match",
    6: "Button input active",
    7: "Device failure",
    8: "Device temperature alarm",
    9: "Device fan alarm",
    10: "Device PSU alarm",
    11: "Storage alarm",
    12: "License expired",
    13: "Video throttling",
    14: "System voltage alarm",
    15: "System temperature alarm",
    16: "System fan alarm",
    17: "Archive connection alarm",
    18: "Archive task alarm",
    19: "Stored content old",
    20: "Archived content old",
    21: "Device disconnected",
    22: "Soft trigger active",
    23: "Time trigger active",
    24: "Analytic rule triggered",
    25: "Outbound connection failure",
    26: "Security integration connection failure",
    27: "Security integration alert",
    28: "Security integration alarm",
    29: "Serial port connection error",
}


class Answer(Exception):
    """Raised by a handler (or the session check) to answer ``response`` instead."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _invalid(status: int = 400) -> Answer:
    return Answer(web.Response(status=status, text=INVALID_REQUEST, content_type="text/plain"))


def _failure(status: int, error: str) -> Answer:
    return Answer(web.json_response({"success": False, "error": error}, status=status))


# ------------------------------------------------------------------- time
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def parse_offset(value: str) -> timezone:
    """``-05:00``, ``+01:00`` or ``Z`` as a fixed-offset timezone."""
    if value.strip().upper() == "Z":
        return UTC
    match = _OFFSET.match(value.strip())
    if match is None:
        raise ValueError(f"utc_offset must look like -05:00, got {value!r}")
    sign = -1 if match.group(1) == "-" else 1
    delta = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
    if delta >= timedelta(hours=24):
        raise ValueError(f"utc_offset out of range: {value!r}")
    return timezone(sign * delta)


def rfc3339(moment: datetime, tz: timezone) -> str:
    """``2026-11-21T05:00:00-05:00``: to the second, in the server's offset."""
    return moment.astimezone(tz).isoformat(timespec="seconds")


def parse_time(value: str, tz: timezone) -> datetime | None:
    """RFC 3339 (an offset or ``Z``; none = the server's offset); ``None`` if unreadable."""
    text = value.strip().replace(" ", "+")  # a "+" that was not percent-encoded
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        return None
    return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment


# ----------------------------------------------------------------- events
@dataclass(slots=True)
class ExEvent:
    """One event as the simulated server stores it; active while ``end`` is None."""

    id: str | None
    type: int
    source_id: int
    source_name: str
    start: datetime  # aware, in the server's offset
    end: datetime | None = None
    number: int = 0  # 1, 2, ... per site in activation order (the ``/_sim`` handle)

    @property
    def active(self) -> bool:
        return self.end is None

    def to_json(self, tz: timezone, with_id: bool, naive: bool = False) -> dict[str, Any]:
        """The event as ``events.web`` lists it (``naive``: the start without its offset)."""
        item: dict[str, Any] = {}
        if with_id and self.id is not None:
            item["id"] = self.id
        item.update(
            type=self.type,
            name=EVENT_TYPES.get(self.type, f"Event {self.type}"),
            sourceId=self.source_id,
            sourceName=self.source_name,
            start=rfc3339(self.start, tz)[:19] if naive else rfc3339(self.start, tz),
            active=self.active,
        )
        return item

    def link_json(self, tz: timezone, profile: str, naive: bool = False) -> dict[str, Any]:
        """The event as a triggered Event Monitoring link (field names assumed, see the
        driver's ``ExacqApi``)."""
        item: dict[str, Any] = {
            "guid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"exacq-link/{profile}/{self.type}")),
            "eventSourceType": MONITOR_SOURCE_TYPES.get(self.type, HEALTH_SOURCE_TYPE),
            "eventSourceId": self.source_id,
            "eventSourceName": self.source_name,
            "eventType": self.type,
            "time": rfc3339(self.start, tz)[:19] if naive else rfc3339(self.start, tz),
        }
        if self.id is not None:
            item["eventId"] = self.id
        return item

    def control_json(self, tz: timezone) -> dict[str, Any]:
        """The event as the ``/_sim`` surface shows it."""
        return {
            "id": self.id,
            "number": self.number,
            "type": self.type,
            "name": EVENT_TYPES.get(self.type, f"Event {self.type}"),
            "source_id": self.source_id,
            "source_name": self.source_name,
            "start": rfc3339(self.start, tz),
            "end": None if self.end is None else rfc3339(self.end, tz),
            "active": self.active,
        }


class Activation(NamedTuple):
    """What ``add_alarms`` answers: the shared plumbing wants an integer ``id`` (the event's
    number), exacq event ids are uuids or absent."""

    id: int
    event: ExEvent


def _check_type(event_type: int) -> int:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type must be 1-29, got {event_type!r}")
    return event_type


def _default_cameras() -> dict[int, str]:
    return {11: "Gate cam", 12: "Yard cam", 13: "Dock cam"}


def _default_triggers() -> dict[int, str]:
    return {3: "Siren", 4: "Floodlight"}


class ExacqSite:
    """The state and behaviour of one simulated exacqVision server."""

    def __init__(
        self,
        *,
        username: str = "cms",
        password: str = "secret",  # noqa: S107 - the simulated server's test account
        cameras: dict[int, str] | None = None,
        triggers: dict[int, str] | None = None,
        utc_offset: str = "-05:00",
        session_ttl_s: float = 3600.0,
        expiry_mode: str = "401",
        session_key: str = "sessionId",
        event_ids: bool = True,
        export_seconds: float = 2.0,
        trigger_hold_s: float = 3.0,
        recorded: bool = True,
        event_id_style: str = "uuid",
        event_monitoring: bool = True,
        monitoring_profiles: Sequence[str] = (DEFAULT_PROFILE,),
        naive_times: bool = False,
        export_formats: Sequence[str] = EXPORT_FORMATS,
        finalize_seconds: float = 0.0,
        export_idle_s: float = 900.0,
        refusal_status: int = 404,
        failure_status: int | None = None,
    ) -> None:
        if session_key not in SESSION_KEYS:
            raise ValueError(f"session_key must be one of {SESSION_KEYS}, got {session_key!r}")
        if event_id_style not in EVENT_ID_STYLES:
            raise ValueError(f"event_id_style must be one of {EVENT_ID_STYLES}")
        self.event_id_style = event_id_style
        self.event_monitoring = event_monitoring
        self.monitoring_profiles = tuple(monitoring_profiles)
        self.naive_times = naive_times
        self.export_formats = tuple(export_formats)
        self.finalize_seconds = finalize_seconds
        self.export_idle_s = export_idle_s
        self.refusal_status = refusal_status
        self.failure_status = failure_status
        self.triggered: collections.deque[tuple[float, ExEvent]] = collections.deque()
        self._id_counter = 0
        self.username, self.password = username, password
        self.cameras = dict(_default_cameras() if cameras is None else cameras)
        self.triggers = dict(_default_triggers() if triggers is None else triggers)
        self.tz = parse_offset(utc_offset)
        self.utc_offset = utc_offset
        self.session_ttl_s = session_ttl_s
        self._expiry_mode = "401"
        self.expiry_mode = expiry_mode
        self.session_key = session_key
        self.event_ids = event_ids
        self.export_seconds = export_seconds
        self.trigger_hold_s = trigger_hold_s
        self.recorded = recorded
        self.events: list[ExEvent] = []
        self.logins = 0
        self.logouts = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.exports: dict[str, dict[str, Any]] = {}
        self.trigger_transitions: dict[int, list[tuple[float, str]]] = {
            tid: [] for tid in self.triggers
        }
        self.trigger_sets: list[tuple[int, str, float]] = []
        self._sessions: dict[str, float] = {}  # session id -> monotonic expiry
        self._trigger_states: dict[int, str] = dict.fromkeys(self.triggers, "off")
        self._trigger_timers: dict[int, asyncio.TimerHandle] = {}
        self._endings: set[asyncio.TimerHandle] = set()
        self._next_number = 1
        self._export_count = 0

    # ------------------------------------------------------------------ clock
    def now(self) -> datetime:
        """The server's clock, in its offset."""
        return datetime.now(self.tz)

    # --------------------------------------------------------------- sessions
    @property
    def expiry_mode(self) -> str:
        return self._expiry_mode

    @expiry_mode.setter
    def expiry_mode(self, mode: str) -> None:
        if mode not in EXPIRY_MODES:
            raise ValueError(f"expiry_mode must be one of {EXPIRY_MODES}, got {mode!r}")
        self._expiry_mode = mode

    def login(self, username: str, password: str) -> str | None:
        """A new session id, or ``None`` for bad credentials."""
        good_user = hmac.compare_digest(username.encode(), self.username.encode())
        good_password = hmac.compare_digest(password.encode(), self.password.encode())
        if not (good_user and good_password):
            return None
        now = monotonic()
        if len(self._sessions) > 1000:
            self._sessions = {sid: until for sid, until in self._sessions.items() if until > now}
        session = str(uuid.uuid4())
        self._sessions[session] = now + self.session_ttl_s
        self.logins += 1
        return session

    def logout(self, session: str | None) -> None:
        self.logouts += 1
        if session is not None:
            self._sessions.pop(session, None)

    def session_valid(self, session: str | None) -> bool:
        if session is None:
            return False
        until = self._sessions.get(session)
        return until is not None and until > monotonic()

    def expire_sessions(self) -> None:
        """Every session is invalid from now on (shows as ``expiry_mode``)."""
        self._sessions.clear()

    @property
    def sessions(self) -> int:
        """How many sessions are still valid."""
        now = monotonic()
        return sum(1 for until in self._sessions.values() if until > now)

    # ----------------------------------------------------------------- events
    def source_name(self, source_id: int) -> str:
        return self.cameras.get(source_id) or self.triggers.get(source_id) or f"Source {source_id}"

    def activate_event(
        self, type: int = 1, source_id: int = 11, *, start: datetime | None = None
    ) -> ExEvent:
        """A new active event (``start`` defaults to the server clock, to the second)."""
        if start is None:
            start = self.now().replace(microsecond=0)
        elif start.tzinfo is None:
            start = start.replace(tzinfo=self.tz)
        event = ExEvent(
            id=self._event_id(type, source_id) if self.event_ids else None,
            type=_check_type(type),
            source_id=source_id,
            source_name=self.source_name(source_id),
            start=start.astimezone(self.tz),
            number=self._next_number,
        )
        self._next_number += 1
        self.events.append(event)
        self._trim()
        self._trigger_links(event)
        return event

    def _event_id(self, event_type: int, source_id: int) -> str:
        """As ``event_id_style`` says: a uuid per occurrence, a counter per occurrence (1, 2,
        ... restarting at a reset), or the id of the event definition (repeats share it)."""
        if self.event_id_style == "counter":
            self._id_counter += 1
            return str(self._id_counter)
        if self.event_id_style == "definition":
            return str(uuid.uuid5(uuid.NAMESPACE_OID, f"exacq-event/{event_type}/{source_id}"))
        return str(uuid.uuid4())

    def _trigger_links(self, event: ExEvent) -> None:
        """Every profile's any-source link fires on every event; kept 60 s (the manual)."""
        self.triggered.append((monotonic(), event))
        self._forget_triggered()

    def _forget_triggered(self) -> None:
        horizon = monotonic() - TRIGGERED_KEEP_S
        while self.triggered and self.triggered[0][0] < horizon:
            self.triggered.popleft()

    def triggered_since(self, seconds: float) -> list[tuple[float, ExEvent]]:
        """The links triggered in the last ``seconds`` (at most 60), oldest first."""
        self._forget_triggered()
        horizon = monotonic() - min(max(seconds, 0.0), TRIGGERED_KEEP_S)
        return [(at, event) for at, event in self.triggered if at >= horizon]

    def reset_device(self) -> None:
        """A factory reset, a replaced box or a reinstalled server: events, links, exports and
        sessions are gone, and a ``counter`` id starts again at 1."""
        self.events.clear()
        self.triggered.clear()
        self.exports.clear()
        self._sessions.clear()
        self._id_counter = 0
        self._export_count = 0

    def add_alarms(self, n: int, **kw: Any) -> list[Activation]:
        """``n`` events (``activate_event``'s keyword arguments), for the shared plumbing."""
        events = [self.activate_event(**kw) for _ in range(n)]
        return [Activation(event.number, event) for event in events]

    def end_event(self, event: ExEvent) -> None:
        """The event is no longer active (nothing if it already ended)."""
        if event.end is None:
            event.end = self.now()

    def end_event_later(self, event: ExEvent, delay_s: float) -> None:
        """End ``event`` after ``delay_s`` (needs a running event loop)."""
        loop = asyncio.get_running_loop()

        def end() -> None:
            self._endings.discard(handle)
            self.end_event(event)

        handle = loop.call_later(delay_s, end)
        self._endings.add(handle)

    def find_event(self, key: Any) -> ExEvent | None:
        """The event whose id is ``key``, or whose number is ``key`` (an int)."""
        for event in reversed(self.events):
            if (event.id is not None and event.id == key) or (
                isinstance(key, int) and not isinstance(key, bool) and event.number == key
            ):
                return event
        return None

    def active_events(self, types: Iterable[int] | None = None) -> list[ExEvent]:
        wanted = None if types is None else frozenset(types)
        return [
            event
            for event in self.events
            if event.end is None and (wanted is None or event.type in wanted)
        ]

    def _trim(self) -> None:
        if len(self.events) <= MAX_KEPT_EVENTS * 1.1:
            return
        ended = sum(1 for event in self.events if event.end is not None)
        drop = min(ended, len(self.events) - MAX_KEPT_EVENTS)
        kept: list[ExEvent] = []
        for event in self.events:
            if drop > 0 and event.end is not None:
                drop -= 1
            else:
                kept.append(event)
        self.events = kept

    # ----------------------------------------------------------- soft triggers
    def trigger_state(self, tid: int) -> str:
        """``"on"`` or ``"off"`` now."""
        if tid not in self.triggers:
            raise KeyError(tid)
        return self._trigger_states.get(tid, "off")

    def set_trigger(self, tid: int, state: str) -> None:
        """Apply one valid set request (needs a running event loop for the automatic drop)."""
        if tid not in self.triggers:
            raise KeyError(tid)
        if state not in ("on", "off"):
            raise ValueError(f"state must be on or off, got {state!r}")
        timer = self._trigger_timers.pop(tid, None)
        if timer is not None:
            timer.cancel()
        if state == "on":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.trigger_hold_s
            self._trigger_timers[tid] = loop.call_at(deadline, self._drop_trigger, tid)
        self._transition(tid, state)

    def _drop_trigger(self, tid: int) -> None:
        self._trigger_timers.pop(tid, None)
        self._transition(tid, "off")

    def _transition(self, tid: int, state: str) -> None:
        if self._trigger_states.get(tid, "off") != state:
            self._trigger_states[tid] = state
            self.trigger_transitions.setdefault(tid, []).append((monotonic(), state))

    # ----------------------------------------------------------------- exports
    def create_export(self, camera: int, start: datetime, end: datetime, fmt: str) -> str:
        export_id = str(uuid.uuid4())
        self._export_count += 1
        self.exports[export_id] = {
            "camera": camera,
            "start": start,
            "end": end,
            "format": fmt,
            "created": monotonic(),
            "touched": monotonic(),
            "finished": False,
            "cleaned": False,
            "downloaded": False,
            "number": self._export_count,
        }
        return export_id

    def export_completed(self, export: Mapping[str, Any]) -> bool:
        """Completed ``finalize_seconds`` after progress reached 100 (0: at once)."""
        done_at = float(export["created"]) + max(self.export_seconds, 0.0) + self.finalize_seconds
        return self.export_progress(export) >= 100 and monotonic() >= done_at

    def export_progress(self, export: Mapping[str, Any]) -> int:
        """0..100, linear over ``export_seconds`` from the export's creation."""
        if self.export_seconds <= 0:
            return 100
        done = (monotonic() - float(export["created"])) / self.export_seconds
        return max(0, min(100, int(100 * done)))

    # ------------------------------------------------------------------ misc
    def close(self) -> None:
        """Cancel the pending timers (trigger drops, scheduled event ends)."""
        for timer in [*self._trigger_timers.values(), *self._endings]:
            timer.cancel()
        self._trigger_timers.clear()
        self._endings.clear()

    def state(self) -> dict[str, Any]:
        return {
            "events": len(self.events),
            "active_events": [event.control_json(self.tz) for event in self.active_events()],
            "sessions": self.sessions,
            "logins": self.logins,
            "logouts": self.logouts,
            "expiry_mode": self.expiry_mode,
            "session_key": self.session_key,
            "event_ids": self.event_ids,
            "event_id_style": self.event_id_style,
            "event_monitoring": self.event_monitoring,
            "naive_times": self.naive_times,
            "recorded": self.recorded,
            "utc_offset": self.utc_offset,
            "triggers": {str(tid): self.trigger_state(tid) for tid in self.triggers},
            "trigger_sets": len(self.trigger_sets),
            "exports": {
                export_id: {
                    "camera": export["camera"],
                    "format": export["format"],
                    "progress": self.export_progress(export),
                    "finished": export["finished"],
                    "downloaded": export["downloaded"],
                }
                for export_id, export in self.exports.items()
            },
            "requests": dict(self.requests),
        }


# ---------------------------------------------------------------- handlers
SiteHandler = base.SiteHandler[ExacqSite]


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html")


async def _params(request: web.Request) -> dict[str, str]:
    """The query, then (for a POST) the form on top of it."""
    params = dict(request.query.items())
    if request.method == "POST":
        form = await request.post()
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    return params


def _int_param(params: Mapping[str, str], name: str) -> int:
    raw = params.get(name, "").strip()
    try:
        return int(raw)
    except ValueError:
        raise _invalid() from None


def _session_expired(site: ExacqSite, request: web.Request) -> web.Response:
    mode = site.expiry_mode
    if mode == "401":
        return web.Response(status=401, text="Unauthorized", content_type="text/plain")
    if mode == "403":
        return web.Response(status=403, text="Forbidden", content_type="text/plain")
    if mode == "302":
        tenant = request.match_info.get("tenant")
        prefix = "" if tenant is None else f"/t/{tenant}"
        return web.Response(status=302, headers={"Location": f"{prefix}{LOGIN_PATH}"})
    if mode == "html":
        return _html(LOGIN_PAGE)
    return web.json_response({"success": False, "error": "Session expired"})


async def _login(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    if params.get("responseVersion", "").strip() != "2":
        raise _invalid()
    if params.get("s", SERVER_ID).strip() not in ("", SERVER_ID):
        return web.json_response({"success": False, "error": "Invalid server"})
    session = site.login(params.get("u", ""), params.get("p", ""))
    if session is None:
        return web.json_response({"success": False, "error": "Invalid username or password"})
    return web.json_response(
        {
            "success": True,
            site.session_key: session,
            "canAutoLogin": False,
            "daysRecordedVideo": 30 if site.recorded else 0,
            "address": "127.0.0.1",
            "serial": "18-62-66-32-4E-AF",
            "login": False,
            "name": SERVER_NAME,
            "restricted": False,
            "id": SERVER_ID,
            "port": 22609,
            "version": "",
            "model": "unknown",
        }
    )


async def _login_page(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    return _html(LOGIN_PAGE)


async def _logout(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    site.logout(params.get("s"))
    return _html("login.web")


async def _config(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    cameras = [
        {"id": cid, "name": name, "formats": list(CAMERA_FORMATS)}
        for cid, name in site.cameras.items()
    ]
    triggers = [{"id": tid, "name": name} for tid, name in site.triggers.items()]
    offset = site.tz.utcoffset(None).total_seconds() / 3600
    hours: int | float = int(offset) if offset.is_integer() else offset  # the manual: -4
    return web.json_response(
        {
            "success": True,
            "timezone": hours,
            "name": SERVER_NAME,
            "Cameras": cameras,
            "Triggers": triggers,
        }
    )


def _filters(request: web.Request) -> list[int] | None:
    raw = [part for value in request.query.getall("filter", []) for part in value.split(",")]
    raw = [part.strip() for part in raw if part.strip()]
    if not raw:
        return None
    try:
        return [int(part) for part in raw]
    except ValueError:
        raise _invalid() from None


async def _events(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    listed = [
        event.to_json(site.tz, site.event_ids, site.naive_times)
        for event in site.active_events(_filters(request))
    ]
    return web.json_response({"success": True, "events": listed})


def _monitoring_offered(site: ExacqSite) -> None:
    if not site.event_monitoring:
        raise Answer(web.Response(status=404, text="Not Found", content_type="text/plain"))


async def _profiles(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    _monitoring_offered(site)
    profiles = [{"name": name, "type": 0} for name in site.monitoring_profiles]
    return web.json_response({"profiles": profiles, "success": True})


async def _triggered(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    _monitoring_offered(site)
    profile = request.match_info["profile"]
    if profile not in site.monitoring_profiles:
        raise _failure(404, f"unknown profile {profile!r}")
    raw = request.query.get("duration", "5").strip()  # the manual's default: 5 s
    try:
        duration = float(raw)
    except ValueError:
        raise _invalid() from None
    if not 0 <= duration <= TRIGGERED_KEEP_S:
        raise _invalid()
    links = [
        event.link_json(site.tz, profile, site.naive_times)
        for _, event in site.triggered_since(duration)
    ]
    return web.json_response({"success": True, "triggeredEvents": links})


async def _soft_triggers(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    triggers = [
        {"id": tid, "name": name, "state": site.trigger_state(tid)}
        for tid, name in site.triggers.items()
    ]
    return web.json_response({"Triggers": triggers})


async def _set_soft_trigger(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    tid = _int_param(params, "tid")
    state = params.get("state", "").strip()
    site.trigger_sets.append((tid, state, monotonic()))
    if tid not in site.triggers:
        raise _invalid(site.refusal_status)
    if state not in ("on", "off"):
        raise _invalid(400)
    site.set_trigger(tid, state)
    return web.json_response({"success": True})


def _camera(site: ExacqSite, params: Mapping[str, str]) -> int:
    camera = _int_param(params, "camera")
    if camera not in site.cameras:
        raise Answer(web.Response(status=404, text="Camera not found", content_type="text/plain"))
    return camera


def _check_jpeg_format(params: Mapping[str, str]) -> None:
    raw = params.get("format", "").strip()
    if raw and (not raw.isdigit() or int(raw) not in JPEG_FORMATS):
        raise _invalid()


async def _frame(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    camera = _camera(site, params)
    _check_jpeg_format(params)
    if parse_time(params.get("time", ""), site.tz) is None:
        raise _invalid()
    if not site.recorded:
        raise Answer(web.Response(status=404, text="No video found", content_type="text/plain"))
    return web.Response(body=snapshot_jpeg(camera), content_type="image/jpeg")


async def _video(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    camera = _camera(site, params)
    _check_jpeg_format(params)
    return web.Response(body=snapshot_jpeg(camera), content_type="image/jpeg")


_EXPORT_CREATE_PARAMS = ("camera", "audio", "serial", "start", "end", "format", "name")


async def _export(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    try:
        if "export" in params:
            return _export_status(site, params)
        if not any(key in params for key in (*_EXPORT_CREATE_PARAMS, "action")):
            return web.json_response({"success": True, "formats": list(site.export_formats)})
        return _export_create(site, params)
    except Answer as answer:
        if site.failure_status is None or answer.response.content_type != "application/json":
            raise
        answer.response.set_status(site.failure_status)  # `success: false` with this status
        raise


def _export_create(site: ExacqSite, params: Mapping[str, str]) -> web.StreamResponse:
    if not all(params.get(key, "").strip() for key in ("camera", "start", "end")):
        raise _failure(400, "camera, start and end are required")
    camera = _int_param(params, "camera")
    if camera not in site.cameras:
        raise _failure(400, f"unknown camera {camera}")
    start = parse_time(params["start"], site.tz)
    end = parse_time(params["end"], site.tz)
    if start is None or end is None:
        raise _failure(400, "start and end must be RFC 3339 times")
    if end > site.now():
        raise _failure(400, "end time is in the future")
    if start > end:
        raise _failure(400, "start time is after end time")
    fmt = params.get("format", "").strip() or DEFAULT_EXPORT_FORMAT
    if fmt not in site.export_formats:
        raise _failure(400, f"unknown export format {fmt!r}")
    export_id = site.create_export(camera, start, end, fmt)
    return web.json_response({"success": True, "export": export_id})


def _export_status(site: ExacqSite, params: Mapping[str, str]) -> web.StreamResponse:
    export_id = params["export"].strip()
    export = site.exports.get(export_id)
    if export is not None and monotonic() - float(export["touched"]) > site.export_idle_s:
        export["cleaned"] = True  # the manual: cleaned up after 15 minutes of inactivity
    if export is None or export["finished"] or export["cleaned"]:
        raise _failure(404, "unknown export")
    export["touched"] = monotonic()
    action = params.get("action", "").strip()
    progress = site.export_progress(export)
    completed = site.export_completed(export)
    if action == "download":
        if not completed:
            raise _failure(400, "export not complete")
        export["downloaded"] = True
        return web.Response(
            body=video_mp4(int(export["number"]), EXPORT_BYTES),
            content_type="video/mp4",
            headers={"Content-Disposition": 'attachment; filename="Export.mp4"'},
        )
    if action == "finish":
        export["finished"] = True
        return web.json_response({"success": True})
    if action:
        raise _failure(400, f"unknown action {action!r}")
    shown: int | str = progress if int(export["number"]) % 2 == 0 else str(progress)
    status = "completed" if completed else "in progress"
    return web.json_response({"success": True, "progress": shown, "status": status})


DEVICE_ROUTES: tuple[Route[ExacqSite], ...] = (
    Route("POST", LOGIN_PATH, _login, auth=False),
    Route("GET", LOGIN_PATH, _login_page, auth=False),
    Route("POST", LOGOUT_PATH, _logout, auth=False),
    Route("GET", LOGOUT_PATH, _logout, auth=False),
    Route("GET", CONFIG_PATH, _config),
    Route("GET", EVENTS_PATH, _events),
    Route("GET", SOFTTRIGGERS_PATH, _soft_triggers),
    Route("POST", SOFTTRIGGERS_PATH, _set_soft_trigger),
    Route("GET", FRAME_PATH, _frame),
    Route("GET", VIDEO_PATH, _video),
    Route("GET", EXPORT_PATH, _export),
    Route("GET", MONITORING_PATH, _profiles),
    Route("GET", TRIGGERED_PATH, _triggered),
)


# ----------------------------------------------------- /_sim control surface
_ALARM_FIELDS: dict[str, Callable[[Any], Any]] = {
    "type": int,
    "source_id": int,
    "start": as_datetime,
}


async def _sim_events(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    """``{"type", "source_id"[, "start"]}`` activates an event; ``{"end": id or number}``
    ends one. Answers the event."""
    body = await control_body(request)
    if "end" in body:
        event = site.find_event(body["end"])
        if event is None:
            raise ValueError(f"no event {body['end']!r}")
        site.end_event(event)
    else:
        unknown = set(body) - set(_ALARM_FIELDS)
        if unknown:
            raise ValueError(f"unknown event fields: {sorted(unknown)}")
        event = site.activate_event(**{key: _ALARM_FIELDS[key](val) for key, val in body.items()})
    return web.json_response(event.control_json(site.tz))


async def _sim_faults(site: ExacqSite, request: web.Request) -> web.StreamResponse:
    body = await control_body(request)
    if "expiry_mode" in body:
        site.expiry_mode = str(body["expiry_mode"])
    if body.get("expire_sessions"):
        site.expire_sessions()
    if "recorded" in body:
        site.recorded = as_bool(body["recorded"])
    if "event_ids" in body:
        site.event_ids = as_bool(body["event_ids"])
    if "event_monitoring" in body:
        site.event_monitoring = as_bool(body["event_monitoring"])
    if "naive_times" in body:
        site.naive_times = as_bool(body["naive_times"])
    if body.get("reset_device"):
        site.reset_device()
    return web.json_response(site.state())


CONTROL_ROUTES: tuple[Route[ExacqSite], ...] = (
    *control_routes(_ALARM_FIELDS, _sim_faults),
    Route("POST", "/_sim/events", _sim_events, auth=False),
)


# --------------------------------------------------------------- the server
class ExacqSimulator(TenantSimulator[ExacqSite]):
    """An HTTP server hosting one or many simulated exacqVision servers (tenants)."""

    def __init__(self, sites: dict[str, ExacqSite] | None = None) -> None:
        super().__init__(sites if sites is not None else {DEFAULT_TENANT: ExacqSite()})

    def _device_routes(self) -> Iterable[Route[ExacqSite]]:
        return DEVICE_ROUTES

    def _control_routes(self) -> Iterable[Route[ExacqSite]]:
        return CONTROL_ROUTES

    async def _answer(
        self, site: ExacqSite, route: Route[ExacqSite], request: web.Request
    ) -> web.StreamResponse:
        try:
            if route.auth:
                params = await _params(request)
                if not site.session_valid(params.get("s")):
                    return _session_expired(site, request)
            return await route.handler(site, request)
        except Answer as answer:
            return answer.response

    async def stop(self) -> None:
        await super().stop()
        for site in self.sites.values():
            site.close()

    def start_generator(
        self,
        rate_per_site: float,
        *,
        types: Sequence[int] = GENERATED_TYPES,
        seed: int | None = None,
    ) -> None:
        """Activate events on every site as independent Poisson processes (one task for
        all); each ends after 2-10 s."""
        check_rate(rate_per_site)
        chosen = tuple(_check_type(event_type) for event_type in types)
        if not chosen:
            raise ValueError("types must not be empty")
        self._start_generator(
            rate_per_site, seed, lambda site, rng: _generated_event(site, chosen, rng)
        )


def _generated_event(site: ExacqSite, types: tuple[int, ...], rng: random.Random) -> None:
    source = rng.choice(list(site.cameras)) if site.cameras else 1
    event = site.activate_event(rng.choice(types), source)
    site.end_event_later(event, rng.uniform(*GENERATED_DURATION_S))


# ------------------------------------------------------------ command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expiry-mode", choices=EXPIRY_MODES, default="401")
    parser.add_argument("--session-key", choices=SESSION_KEYS, default="sessionId")
    parser.add_argument("--session-ttl", type=float, default=3600.0)
    parser.add_argument("--export-seconds", type=float, default=2.0)
    parser.add_argument("--utc-offset", default="-05:00")
    parser.add_argument("--no-event-ids", action="store_true")
    parser.add_argument("--event-id-style", choices=EVENT_ID_STYLES, default="uuid")
    parser.add_argument("--no-event-monitoring", action="store_true")
    parser.add_argument("--naive-times", action="store_true")
    parser.add_argument("--export-formats", default=",".join(EXPORT_FORMATS))
    parser.add_argument("--finalize-seconds", type=float, default=0.0)
    parser.add_argument("--export-idle-seconds", type=float, default=900.0)
    parser.add_argument("--refusal-status", type=int, default=404)
    parser.add_argument("--failure-status", type=int, default=None)
    parser.add_argument("--no-recorded", action="store_true")


async def serve(args: argparse.Namespace) -> None:
    sites = {
        name: ExacqSite(
            expiry_mode=args.expiry_mode,
            session_key=args.session_key,
            session_ttl_s=args.session_ttl,
            export_seconds=args.export_seconds,
            utc_offset=args.utc_offset,
            event_ids=not args.no_event_ids,
            event_id_style=args.event_id_style,
            event_monitoring=not args.no_event_monitoring,
            naive_times=args.naive_times,
            export_formats=tuple(f for f in args.export_formats.split(",") if f),
            finalize_seconds=args.finalize_seconds,
            export_idle_s=args.export_idle_seconds,
            refusal_status=args.refusal_status,
            failure_status=args.failure_status,
            recorded=not args.no_recorded,
        )
        for name in tenant_names(args.sites)
    }
    await serve_cli(ExacqSimulator(sites), args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli_args(
        argv,
        description="Serve simulated exacqVision servers.",
        default_port=DEFAULT_PORT,
        add_arguments=_add_arguments,
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
