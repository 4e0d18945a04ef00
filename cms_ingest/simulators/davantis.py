"""A simulated Davantis site (or many of them) served over real HTTP.

The project's tests, the demo and the benchmark point the ingest daemon at this
server instead of a real video-analytics device. One process can host many
tenants: the ``default`` tenant answers at the root and every other tenant under
``/t/<tenant>``, so a benchmark can run thousands of sites behind one port.

Device behaviour reproduced (from the vendor manual and the integrators' notes):

* OAuth password and refresh-token grants on ``POST /oauth/token``; the form body
  is read whatever its Content-Type (or none) and a leading ``?`` is tolerated.
  Errors use the device's ``{"fault": {"faultstring", "detail": {"errorcode"}}}``
  shape with the ``keymanagement.service.*`` codes, including
  ``access_token_expired`` for an expired access token. A refresh consumes the
  old refresh token and its answer carries no ``token_type``.
* ``GET /alarms`` with the ``cra``, ``min_id``, ``min_date``/``max_date``,
  ``camera_id`` and ``event_id`` filters, newest first, capped at ``page_cap``
  (300 on the device) and ``204 No Content`` when a ``min_id`` poll finds nothing.
  The alarm object spells ``idcamera``/``idevent`` and has no armed/``cra`` field.
* Media status computed when asked: ``recording`` until the media is ready, then
  ``ready``; system events (0 and 102) never have media. The ``*_absolute`` URLs
  name a NAT address the client cannot reach, as field devices do. Snapshots are
  small valid JPEGs and videos ISO-BMFF (mp4) files, each tagged with the alarm id.
* Relays that switch themselves off after ``relay_on_seconds``; inputs that arm
  and disarm their cameras (raising an event-102 alarm), and a hardware-driven
  input that refuses ``PATCH`` with 403.

Things the manual leaves open, decided here: faults on malformed requests use
``errorcode`` values of this simulator's own (``alarms.invalid_filter``,
``relays.not_found``, ...); an unencoded ``+`` in a date filter decodes to a
space and is refused, as by any form-decoding server; a date filter without an
offset is the installation's local time (``time_zone``, UTC by default).

Switches for what the manual allows but does not pin down (constructor options, and the
command line's ``--order`` etc.); the defaults are the manual's reading:
``order`` ("time": newest ``started`` first, the manual's note; "id": the polling sample's
comment), ``max_date_exclusive``, ``min_date_exclusive`` and ``ignore_max_date``,
``no_content`` ("min_id": 204 when a ``min_id`` query finds nothing, the manual's sample,
else an empty list; "always": 204 for any query that finds nothing),
``utc_offset`` (whatever ``current_utc_offset`` says: "+01:00", 60, "Europe/Madrid"...),
``time_zone`` with
``local_times`` (``started`` written without an offset, in that zone), ``language`` (event
102 descriptions: "Désarmé", "Unscharf"...), ``token_error_status`` (the status of token
errors: the manual names only the errorcode), ``input_cameras`` ("cameras" on each input,
"on_cameras": ``inputs`` on each camera, "none") and ``factory_reset()`` (ids start at 1
again; also ``POST /_sim/faults {"factory_reset": true}``).

Test hooks (Python API and ``/_sim/...`` HTTP control surface): alarm creation,
a Poisson alarm generator shared by all tenants, failing / malformed / slow alarm
polls, token expiry and revocation, and a whole site going offline (503). A hostile
device: ``add_alarm(overrides={...})`` writes JSON fields verbatim over the alarm
object (foreign media URLs, odd camera ids, NUL bytes...), and the shared
``respond()`` / ``/_sim/respond`` scripts any answer (see ``base.py``).

Command line: ``python -m cms_ingest.simulators.davantis --sites 500 --rate 0.2``
prints one site URL per line, then ``READY``, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import dataclasses
import json
import random
import secrets
import string
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from aiohttp import web

from cms_ingest.simulators import base
from cms_ingest.simulators.base import (
    DEFAULT_TENANT,
    Route,
    TenantSimulator,
    as_bool,
    as_datetime,
    control_body,
    control_routes,
    parse_cli_args,
    serve_cli,
    tenant_names,
    to_ms,
)

DEFAULT_PORT = 21000
ARMING_EVENT = 102
SYSTEM_EVENTS = frozenset({0, ARMING_EVENT})
MEDIA_STATES = frozenset({"ready", "recording", "unavailable"})
EVENT_DESCRIPTIONS: dict[int, str] = {
    0: "System event",
    1: "Movement detected",
    2: "Person detected",
    3: "Vehicle detected",
    7: "Object detected",
    10: "Sabotage detected",
    11: "Intrusion detected",
    18: "External trigger",
}
CAMERA_ALIASES = ("North gate", "Car park", "Loading bay", "East fence", "Main entrance")
# The address the device believes it has (behind NAT): clients must never use it.
ADVERTISED_MEDIA_BASE = "http://10.20.30.40:8080"
TOKEN_LENGTH = 16
TOKEN_ALPHABET = string.ascii_letters + string.digits
MIN_VIDEO_SIZE = 32
ERR_INVALID_CREDENTIALS = "keymanagement.service.invalid_credentials"
ERR_INVALID_REFRESH = "keymanagement.service.invalid_refresh_token"
ERR_INVALID_ACCESS = "keymanagement.service.invalid_access_token"
ERR_ACCESS_EXPIRED = "keymanagement.service.access_token_expired"
ERR_GRANT_TYPE = "keymanagement.service.unsupported_grant_type"


class DeviceError(Exception):
    """An error the device answers with its ``fault`` JSON body."""

    def __init__(self, status: int, faultstring: str, errorcode: str) -> None:
        super().__init__(faultstring)
        self.status = status
        self.faultstring = faultstring
        self.errorcode = errorcode

    def response(self) -> web.Response:
        body = {"fault": {"faultstring": self.faultstring, "detail": {"errorcode": self.errorcode}}}
        return web.json_response(body, status=self.status)


def _now_ms() -> datetime:
    return to_ms(datetime.now(UTC))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _media_status(final: str, ready_at: float, now: float) -> str:
    return "recording" if final == "ready" and now < ready_at else final


# Event 102's description in the languages a device ships (the `language` switch).
ARMING_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "en": ("Armed", "Disarmed"),
    "es": ("Armado", "Desarmado"),
    "fr": ("Armé", "Désarmé"),
    "de": ("Scharf", "Unscharf"),
    "it": ("Inserito", "Disinserito"),
    "pt": ("Armado", "Desarmado"),
    "ca": ("Armat", "Desarmat"),
    "nl": ("Ingeschakeld", "Uitgeschakeld"),
}
ORDERS = ("time", "id")
NO_CONTENT = ("min_id", "always")  # which empty answers are 204 rather than []
INPUT_CAMERA_LINKS = ("cameras", "on_cameras", "none")


def _describe(event: int, armed: bool, language: str = "en") -> str:
    if event == ARMING_EVENT:
        armed_text, disarmed_text = ARMING_DESCRIPTIONS[language]
        return armed_text if armed else disarmed_text
    return EVENT_DESCRIPTIONS.get(event, f"Event {event}")


@dataclass(slots=True)
class SimAlarm:
    """One alarm as the simulated device stores it."""

    id: int
    event: int
    camera: int
    description: str
    started: datetime
    armed: bool
    ended: datetime | None = None
    snapshot: str = "ready"
    video: str = "ready"
    snapshot_ready_at: float = 0.0
    video_ready_at: float = 0.0
    video_bytes: int = 4096
    overrides: dict[str, Any] | None = None  # JSON fields written verbatim over the object

    def snapshot_status(self, now: float | None = None) -> str:
        return _media_status(self.snapshot, self.snapshot_ready_at, _clock(now))

    def video_status(self, now: float | None = None) -> str:
        return _media_status(self.video, self.video_ready_at, _clock(now))

    def to_json(self, now: float | None = None, local: tzinfo | None = None) -> dict[str, Any]:
        """The alarm object as ``GET /alarms`` renders it (statuses as of ``now``; times
        without an offset, in the zone ``local``, when given)."""
        now = _clock(now)
        media = f"{ADVERTISED_MEDIA_BASE}/alarms/{self.id}"
        rendered = {
            "id": self.id,
            "idmachine": 1,
            "idrule": 0 if self.event in SYSTEM_EVENTS else self.camera * 10 + 1,
            "idevent": self.event,
            "idcamera": self.camera,
            "description": self.description,
            "description_translation": self.description,
            "started": _iso(_local(self.started, local)),
            "ended": _iso(_local(self.ended, local)),
            "video_status": self.video_status(now),
            "video_absolute": f"{media}/video",
            "ack": False,
            "snapshot_status": self.snapshot_status(now),
            "snapshot_absolute": f"{media}/snapshot",
            "supportvideo_status": "unavailable",
            "supportvideo_absolute": f"{media}/supportvideo",
        }
        return rendered if self.overrides is None else {**rendered, **self.overrides}


def _local(moment: datetime | None, zone: tzinfo | None) -> datetime | None:
    if moment is None or zone is None:
        return moment
    return moment.astimezone(zone).replace(tzinfo=None)


def _clock(now: float | None) -> float:
    return time.monotonic() if now is None else now


@dataclass(frozen=True, slots=True)
class AlarmQuery:
    """The filters of ``GET /alarms``; ``None`` means "not filtered"."""

    min_id: int | None = None
    min_date: datetime | None = None
    max_date: datetime | None = None
    armed: bool | None = None
    cameras: frozenset[int] | None = None
    events: frozenset[int] | None = None
    max_exclusive: bool = False  # max_date: started < max_date instead of <=
    min_exclusive: bool = False  # min_date: started > min_date instead of >=

    def before_max(self, started: datetime) -> bool:
        if self.max_date is None:
            return True
        return started < self.max_date if self.max_exclusive else started <= self.max_date

    def after_min(self, started: datetime) -> bool:
        if self.min_date is None:
            return True
        return started > self.min_date if self.min_exclusive else started >= self.min_date

    def matches(self, alarm: SimAlarm) -> bool:
        return (
            (self.min_id is None or alarm.id > self.min_id)
            and self.after_min(alarm.started)
            and self.before_max(alarm.started)
            and (self.armed is None or alarm.armed == self.armed)
            and (self.cameras is None or alarm.camera in self.cameras)
            and (self.events is None or alarm.event in self.events)
        )


def _filter_error(name: str, value: str) -> DeviceError:
    return DeviceError(400, f"Invalid value for {name}: {value!r}", "alarms.invalid_filter")


def _query_date(name: str, value: str, zone: tzinfo = UTC) -> datetime:
    """A date filter; without an offset it is the installation's local time (manual)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _filter_error(name, value) from None
    return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment


def _query_ids(name: str, value: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise _filter_error(name, value) from None


def parse_alarm_query(query: Mapping[str, str], zone: tzinfo = UTC) -> AlarmQuery:
    """Read the alarm filters from a query string; unknown parameters are ignored. Dates
    without an offset are in ``zone``, the installation's."""
    params = {key: value for key, value in query.items() if value.strip()}
    cra = params.get("cra", "").lower()
    if cra not in ("", "yes", "no"):
        raise _filter_error("cra", cra)
    min_id = params.get("min_id")
    if min_id is not None and not min_id.strip().lstrip("-").isdigit():
        raise _filter_error("min_id", min_id)
    return AlarmQuery(
        min_id=None if min_id is None else int(min_id),
        min_date=_query_date("min_date", params["min_date"], zone)
        if "min_date" in params
        else None,
        max_date=_query_date("max_date", params["max_date"], zone)
        if "max_date" in params
        else None,
        armed=None if not cra else cra == "yes",
        cameras=_query_ids("camera_id", params["camera_id"]) if "camera_id" in params else None,
        events=_query_ids("event_id", params["event_id"]) if "event_id" in params else None,
    )


def _random_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


class _TokenStore:
    """Issued access tokens (with their expiry) and live refresh tokens."""

    PRUNE_ABOVE = 256
    KEEP_EXPIRED_FOR = 3600.0

    def __init__(self, ttl: float, error_status: int = 401) -> None:
        self.ttl = ttl
        self.error_status = error_status  # the manual names the errorcode, not the status
        self.access: dict[str, float] = {}
        self.refresh: set[str] = set()

    def issue(self) -> tuple[str, str]:
        self._prune()
        access, refresh = _random_token(), _random_token()
        self.access[access] = time.monotonic() + self.ttl
        self.refresh.add(refresh)
        return access, refresh

    def check(self, token: str) -> None:
        expires_at = self.access.get(token)
        if expires_at is None:
            raise DeviceError(self.error_status, "Invalid access token", ERR_INVALID_ACCESS)
        if time.monotonic() >= expires_at:
            raise DeviceError(self.error_status, "Access token expired", ERR_ACCESS_EXPIRED)

    def consume_refresh(self, token: str) -> bool:
        if token not in self.refresh:
            return False
        self.refresh.discard(token)
        return True

    def expire_all(self) -> None:
        now = time.monotonic()
        for token in self.access:
            self.access[token] = min(self.access[token], now)

    def revoke_all(self) -> None:
        self.access.clear()
        self.refresh.clear()

    def _prune(self) -> None:
        if len(self.access) > self.PRUNE_ABOVE:
            horizon = time.monotonic() - self.KEEP_EXPIRED_FOR
            self.access = {tok: exp for tok, exp in self.access.items() if exp > horizon}


@dataclass(slots=True)
class _PollFaults:
    fail: int = 0
    fail_status: int = 500
    malformed: int = 0
    slow: int = 0
    slow_delay: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "fail": self.fail,
            "status": self.fail_status,
            "malformed": self.malformed,
            "slow": self.slow,
            "delay": self.slow_delay,
        }


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, not {value!r}")


def _check_media_state(name: str, state: str) -> None:
    if state not in MEDIA_STATES:
        raise ValueError(f"{name} must be one of {sorted(MEDIA_STATES)}, not {state!r}")


class DavantisSite:
    """The state and behaviour of one simulated Davantis installation."""

    def __init__(
        self,
        *,
        username: str = "cms",
        password: str = "secret",  # noqa: S107 - the simulated device's test account
        access_ttl: float = 3599.0,
        page_cap: int = 300,
        cameras: int = 4,
        media_delay: float = 1.0,
        video_size: int = 4096,
        relay_on_seconds: float = 30.0,
        name: str = "DAVANTIS site",
        max_alarms: int | None = None,
        order: str = "time",
        max_date_exclusive: bool = False,
        min_date_exclusive: bool = False,
        ignore_max_date: bool = False,
        utc_offset: Any = "+00:00",
        time_zone: str = "UTC",
        local_times: bool = False,
        language: str = "en",
        token_error_status: int = 401,
        input_cameras: str = "cameras",
        no_content: str = "min_id",
    ) -> None:
        if video_size < MIN_VIDEO_SIZE:
            raise ValueError(f"video_size must be at least {MIN_VIDEO_SIZE}")
        _check_choice("order", order, ORDERS)
        _check_choice("no_content", no_content, NO_CONTENT)
        _check_choice("language", language, tuple(ARMING_DESCRIPTIONS))
        _check_choice("input_cameras", input_cameras, INPUT_CAMERA_LINKS)
        # Switches for what the manual leaves open (see the module docstring).
        self.order = order
        self.max_date_exclusive = max_date_exclusive
        self.min_date_exclusive = min_date_exclusive
        self.ignore_max_date = ignore_max_date
        self.no_content = no_content
        self.utc_offset = utc_offset
        self.zone: tzinfo = ZoneInfo(time_zone)
        self.local_times = local_times
        self.language = language
        self.input_cameras = input_cameras
        self.username, self.password = username, password
        self.page_cap = page_cap
        self.cameras = cameras
        self.media_delay = media_delay
        self.video_size = video_size
        self.relay_on_seconds = relay_on_seconds
        self.name = name
        self.max_alarms = max_alarms
        self.alarms: list[SimAlarm] = []
        self.offline = False
        self.requests: collections.Counter[str] = collections.Counter()
        self.logins = 0
        self.refreshes = 0
        self.relay_log: list[tuple[int, bool]] = []
        self.input_log: list[tuple[int, bool]] = []
        self.inputs: dict[int, dict[str, Any]] = _default_inputs(cameras)
        self._relays: dict[int, dict[str, Any]] = {
            1: {"id": 1, "alias": "sound", "status": False},
            2: {"id": 2, "alias": "light", "status": False},
        }
        self._relay_off_at: dict[int, float] = {}
        self._tokens = _TokenStore(access_ttl, token_error_status)
        self._faults = _PollFaults()
        self._next_id = 1
        self._started_sorted = True

    # ----------------------------------------------------------------- alarms
    def add_alarm(
        self,
        *,
        event: int = 11,
        camera: int = 1,
        description: str | None = None,
        armed: bool | None = None,
        started: datetime | None = None,
        snapshot: str = "ready",
        video: str = "ready",
        media_delay: float | None = None,
        video_size: int | None = None,
        ended: datetime | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> SimAlarm:
        """Record a new alarm (ids 1, 2, ...); see the module docstring for media.

        ``overrides``: JSON fields written verbatim over the alarm object as ``GET /alarms``
        renders it (a hostile or broken device); the simulator itself keeps using its own
        id, camera and media state."""
        _check_media_state("snapshot", snapshot)
        _check_media_state("video", video)
        size = self.video_size if video_size is None else video_size
        if size < MIN_VIDEO_SIZE:
            raise ValueError(f"video_size must be at least {MIN_VIDEO_SIZE}")
        if event in SYSTEM_EVENTS:
            snapshot = video = "unavailable"
        is_armed = self.camera_armed(camera) if armed is None else armed
        ready_at = time.monotonic() + (self.media_delay if media_delay is None else media_delay)
        alarm = SimAlarm(
            id=self._next_id,
            event=event,
            camera=camera,
            description=(
                _describe(event, is_armed, self.language) if description is None else description
            ),
            started=self._stamp(started),
            armed=is_armed,
            ended=None if ended is None else to_ms(ended),
            snapshot=snapshot,
            video=video,
            snapshot_ready_at=ready_at,
            video_ready_at=ready_at,
            video_bytes=size,
            overrides=None if overrides is None else dict(overrides),
        )
        self._next_id += 1
        self.alarms.append(alarm)
        self._trim()
        return alarm

    def add_alarms(self, n: int, **kw: Any) -> list[SimAlarm]:
        return [self.add_alarm(**kw) for _ in range(n)]

    def _stamp(self, started: datetime | None) -> datetime:
        """Default start times never go backwards and differ by at least 1 ms,
        so paging back with an inclusive ``max_date`` always makes progress."""
        last = self.alarms[-1].started if self.alarms else None
        if started is None:
            stamp = _now_ms()
            return stamp if last is None or stamp > last else last + timedelta(milliseconds=1)
        stamp = to_ms(started)
        if last is not None and stamp < last:
            self._started_sorted = False
        return stamp

    def _trim(self) -> None:
        if self.max_alarms is not None and len(self.alarms) > self.max_alarms * 1.1 + 1:
            del self.alarms[: len(self.alarms) - self.max_alarms]

    def alarm(self, alarm_id: int) -> SimAlarm | None:
        index = bisect.bisect_left(self.alarms, alarm_id, key=lambda a: a.id)
        if index < len(self.alarms) and self.alarms[index].id == alarm_id:
            return self.alarms[index]
        return None

    def find_alarms(self, query: AlarmQuery) -> list[SimAlarm]:
        """Matching alarms, newest first, at most ``page_cap``: by ``started`` (the manual's
        note; ties by id), or by id with ``order="id"`` (the manual's polling sample)."""
        query = self._as_device_reads(query)
        if self.order == "time" and not self._started_sorted:
            low, high = self._candidate_range(query)
            matching = [alarm for alarm in self.alarms[low:high] if query.matches(alarm)]
            matching.sort(key=lambda alarm: (alarm.started, alarm.id), reverse=True)
            return matching[: self.page_cap]
        low, high = self._candidate_range(query)
        found: list[SimAlarm] = []
        for index in range(high - 1, low - 1, -1):
            alarm = self.alarms[index]
            if query.matches(alarm):
                found.append(alarm)
                if len(found) >= self.page_cap:
                    break
        return found

    def _as_device_reads(self, query: AlarmQuery) -> AlarmQuery:
        return dataclasses.replace(
            query,
            max_date=None if self.ignore_max_date else query.max_date,
            max_exclusive=self.max_date_exclusive,
            min_exclusive=self.min_date_exclusive,
        )

    def factory_reset(self) -> None:
        """The box reset, replaced or reinstalled under the same site: its alarms are gone,
        ids start again at 1, and tokens issued before are void."""
        self.alarms.clear()
        self._next_id = 1
        self._started_sorted = True
        self._tokens.revoke_all()

    def _candidate_range(self, query: AlarmQuery) -> tuple[int, int]:
        low, high = 0, len(self.alarms)
        if query.min_id is not None:
            low = bisect.bisect_right(self.alarms, query.min_id, key=lambda a: a.id)
        if self._started_sorted and query.min_date is not None:
            cut = bisect.bisect_right if query.min_exclusive else bisect.bisect_left
            start = cut(self.alarms, query.min_date, key=lambda a: a.started)
            low = max(low, start)
        if self._started_sorted and query.max_date is not None:
            cut = bisect.bisect_left if query.max_exclusive else bisect.bisect_right
            high = cut(self.alarms, query.max_date, key=lambda a: a.started)
        return low, high

    # ------------------------------------------------------- inputs and relays
    def camera_armed(self, camera: int) -> bool:
        """A camera is armed while any input it belongs to is armed; camera 0
        (the system) and cameras on no input follow all inputs."""
        covering = [inp for inp in self.inputs.values() if camera in inp["cameras"]]
        return any(inp["status"] for inp in covering or self.inputs.values())

    def set_input(self, input_id: int, status: bool) -> dict[str, Any]:
        """Arm or disarm an input (hardware ones too: this is the on-site keyswitch).
        A change of state raises an event-102 alarm on camera 0."""
        inp = self.inputs[input_id]
        self.input_log.append((input_id, status))
        if inp["status"] != status:
            inp["status"] = status
            self.add_alarm(
                event=ARMING_EVENT,
                camera=0,
                description=_describe(ARMING_EVENT, status, self.language),
            )
        return inp

    @property
    def relays(self) -> dict[int, dict[str, Any]]:
        now = time.monotonic()
        for relay_id, off_at in list(self._relay_off_at.items()):
            if now >= off_at:
                self._relays[relay_id]["status"] = False
                del self._relay_off_at[relay_id]
        return self._relays

    def set_relay(self, relay_id: int, status: bool) -> dict[str, Any]:
        relay = self.relays[relay_id]
        relay["status"] = status
        self.relay_log.append((relay_id, status))
        if status:
            self._relay_off_at[relay_id] = time.monotonic() + self.relay_on_seconds
        else:
            self._relay_off_at.pop(relay_id, None)
        return relay

    # ------------------------------------------------------------------ oauth
    def grant(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Answer a ``POST /oauth/token`` form, or raise the device's fault."""
        grant_type = form.get("grant_type", "")
        if grant_type == "password":
            return self._login(form.get("username", ""), form.get("password", ""))
        if grant_type == "refresh_token":
            return self._refresh(form.get("refresh_token", ""))
        raise DeviceError(400, f"Unsupported grant type: {grant_type!r}", ERR_GRANT_TYPE)

    def _login(self, username: str, password: str) -> dict[str, Any]:
        if (username, password) != (self.username, self.password):
            raise DeviceError(401, "Invalid credentials", ERR_INVALID_CREDENTIALS)
        self.logins += 1
        access, refresh = self._tokens.issue()
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": int(self._tokens.ttl),
            "refresh_token": refresh,
        }

    def _refresh(self, token: str) -> dict[str, Any]:
        if not self._tokens.consume_refresh(token):
            raise DeviceError(401, "Invalid refresh token", ERR_INVALID_REFRESH)
        self.refreshes += 1
        access, refresh = self._tokens.issue()
        return {
            "access_token": access,
            "expires_in": int(self._tokens.ttl),
            "refresh_token": refresh,
        }

    def check_access(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise DeviceError(self._tokens.error_status, "Invalid access token", ERR_INVALID_ACCESS)
        self._tokens.check(token.strip())

    # ----------------------------------------------------------------- faults
    def fail_alarm_polls(self, count: int, status: int = 500) -> None:
        self._faults.fail, self._faults.fail_status = count, status

    def malformed_alarm_polls(self, count: int) -> None:
        self._faults.malformed = count

    def slow_alarm_polls(self, count: int, delay: float) -> None:
        self._faults.slow, self._faults.slow_delay = count, delay

    def expire_access_tokens(self) -> None:
        self._tokens.expire_all()

    def revoke_tokens(self) -> None:
        self._tokens.revoke_all()

    async def poll_fault(self) -> web.Response | None:
        """Apply the pending ``GET /alarms`` faults; a response means "answer this"."""
        faults = self._faults
        if faults.slow > 0:
            faults.slow -= 1
            await asyncio.sleep(faults.slow_delay)
        if faults.fail > 0:
            faults.fail -= 1
            return web.Response(status=faults.fail_status, text="simulated failure")
        if faults.malformed > 0:
            faults.malformed -= 1
            broken = b'[{"id": 1, "idmachine": 1, "started": "20'
            return web.Response(body=broken, content_type="application/json")
        return None

    def state(self) -> dict[str, Any]:
        return {
            "alarms": len(self.alarms),
            "last_id": self.alarms[-1].id if self.alarms else 0,
            "logins": self.logins,
            "refreshes": self.refreshes,
            "requests": dict(self.requests),
            "offline": self.offline,
            "faults": self._faults.as_dict(),
        }


def _default_inputs(cameras: int) -> dict[int, dict[str, Any]]:
    half = max(1, (cameras + 1) // 2)
    return {
        1: {
            "id": 1,
            "alias": "Perimeter",
            "status": True,
            "hardware": False,
            "cameras": list(range(1, min(half, cameras) + 1)),
        },
        2: {
            "id": 2,
            "alias": "Keyswitch",
            "status": True,
            "hardware": True,
            "cameras": list(range(half + 1, cameras + 1)),
        },
    }


def _camera_list(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": cam,
            "alias": CAMERA_ALIASES[cam - 1] if cam <= len(CAMERA_ALIASES) else f"Camera {cam}",
            "thermal": cam % 3 == 0,
            "active": True,
        }
        for cam in range(1, count + 1)
    ]


# ------------------------------------------------------------------- media
_JPEG_AFTER_COMMENT = b"".join(
    (
        b"\xff\xdb\x00\x43\x00" + b"\x01" * 64,  # DQT: table 0, all ones
        b"\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00",  # SOF0: 1x1, grey
        b"\xff\xc4\x00\x14\x00\x01" + bytes(15) + b"\x00",  # DHT DC0: code "0" -> size 0
        b"\xff\xc4\x00\x14\x10\x01" + bytes(15) + b"\x00",  # DHT AC0: code "0" -> EOB
        b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00",  # SOS: one component
        b"\x3f",  # scan: DC diff 0, EOB, padded with 1 bits (one mid-grey pixel)
        b"\xff\xd9",  # EOI
    )
)


def snapshot_jpeg(alarm_id: int) -> bytes:
    """A 1x1 baseline JPEG whose COM segment names the alarm."""
    comment = f"davantis-sim alarm {alarm_id}".encode()
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return b"\xff\xd8" + segment + _JPEG_AFTER_COMMENT


def video_mp4(alarm_id: int, size: int) -> bytes:
    """``size`` bytes: an ISO-BMFF ``ftyp`` box, then a ``free`` box naming the alarm."""
    ftyp = struct.pack(">I4s4sI8s", 24, b"ftyp", b"mp42", 0, b"isommp42")
    free = struct.pack(">I4s", size - len(ftyp), b"free") + f"alarm {alarm_id}".encode()
    return (ftyp + free)[:size].ljust(size, b"\x00")


# ---------------------------------------------------------------- handlers
SiteHandler = base.SiteHandler[DavantisSite]
# Names this module has always offered, now defined in base.py.
Handler = base.Handler
GENERATOR_TICK = base.GENERATOR_TICK


def _parse_form(body: str) -> dict[str, str]:
    parsed = parse_qs(body.strip().lstrip("?"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


async def _json_body(request: web.Request) -> Any:
    """Decode a JSON body whatever Content-Type it came with."""
    raw = await request.read()
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise DeviceError(400, "Body is not valid JSON", "request.invalid_body") from None


def _path_id(request: web.Request, kind: str) -> int:
    value = request.match_info["item_id"]
    if not value.isdigit():
        raise DeviceError(404, f"{kind.capitalize()} {value} not found", f"{kind}s.not_found")
    return int(value)


async def _status_patch(request: web.Request) -> bool:
    body = await _json_body(request)
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, bool):
        raise DeviceError(400, 'Body must be {"status": true|false}', "request.invalid_body")
    return status


async def _token(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    return web.json_response(site.grant(_parse_form(await request.text())))


async def _installation(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"name": site.name, "current_utc_offset": site.utc_offset, "version": "6.4.2"}
    )


async def _cameras(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    cameras = _camera_list(site.cameras)
    if site.input_cameras == "on_cameras":  # the link on the camera's side instead
        for camera in cameras:
            camera["inputs"] = [
                inp["id"] for inp in site.inputs.values() if camera["id"] in inp["cameras"]
            ]
    return web.json_response(cameras)


async def _alarms(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    query = parse_alarm_query(request.query, site.zone)
    found = site.find_alarms(query)
    if not found and (query.min_id is not None or site.no_content == "always"):
        return web.Response(status=204)
    now = time.monotonic()
    local = site.zone if site.local_times else None
    return web.json_response([alarm.to_json(now, local) for alarm in found])


def _ready_alarm(site: DavantisSite, request: web.Request, media: str) -> SimAlarm:
    value = request.match_info["alarm_id"]
    alarm = site.alarm(int(value)) if value.isdigit() else None
    if alarm is None:
        raise DeviceError(404, f"Alarm {value} not found", "alarms.not_found")
    status = alarm.snapshot_status() if media == "snapshot" else alarm.video_status()
    if status != "ready":
        raise DeviceError(
            404, f"The {media} of alarm {value} is {status}", "alarms.media_not_ready"
        )
    return alarm


async def _snapshot(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    alarm = _ready_alarm(site, request, "snapshot")
    return web.Response(body=snapshot_jpeg(alarm.id), content_type="image/jpeg")


async def _video(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    alarm = _ready_alarm(site, request, "video")
    return web.Response(body=video_mp4(alarm.id, alarm.video_bytes), content_type="video/mp4")


async def _relays(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    return web.json_response(list(site.relays.values()))


async def _patch_relay(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    relay_id = _path_id(request, "relay")
    if relay_id not in site.relays:
        raise DeviceError(404, f"Relay {relay_id} not found", "relays.not_found")
    return web.json_response(site.set_relay(relay_id, await _status_patch(request)))


async def _inputs(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    if site.input_cameras == "cameras":
        return web.json_response(list(site.inputs.values()))
    # The manual shows no field linking an input to its cameras: a device may have none.
    return web.json_response(
        [{k: v for k, v in inp.items() if k != "cameras"} for inp in site.inputs.values()]
    )


async def _patch_input(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    input_id = _path_id(request, "input")
    if input_id not in site.inputs:
        raise DeviceError(404, f"Input {input_id} not found", "inputs.not_found")
    status = await _status_patch(request)
    if site.inputs[input_id]["hardware"]:
        raise DeviceError(
            403,
            f"Input {input_id} is controlled by hardware and cannot be changed through the API",
            "inputs.hardware_controlled",
        )
    return web.json_response(site.set_input(input_id, status))


DEVICE_ROUTES = (
    Route("POST", "/oauth/token", _token, auth=False),
    Route("GET", "/installation", _installation),
    Route("GET", "/cameras", _cameras),
    Route("GET", "/alarms", _alarms, poll_faults=True),
    Route("GET", "/alarms/{alarm_id}/snapshot", _snapshot),
    Route("GET", "/alarms/{alarm_id}/video", _video),
    Route("GET", "/relays", _relays),
    Route("PATCH", "/relays/{item_id}", _patch_relay),
    Route("GET", "/inputs", _inputs),
    Route("PATCH", "/inputs/{item_id}", _patch_input),
)


# ----------------------------------------------------- /_sim control surface
def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("overrides must be a JSON object")
    return value


_ALARM_FIELDS: dict[str, Callable[[Any], Any]] = {
    "event": int,
    "camera": int,
    "description": str,
    "armed": as_bool,
    "started": as_datetime,
    "ended": as_datetime,
    "snapshot": str,
    "video": str,
    "media_delay": float,
    "video_size": int,
    "overrides": _json_object,
}


async def _sim_faults(site: DavantisSite, request: web.Request) -> web.StreamResponse:
    body = await control_body(request)
    if "fail" in body:
        site.fail_alarm_polls(int(body["fail"]), int(body.get("status", 500)))
    if "malformed" in body:
        site.malformed_alarm_polls(int(body["malformed"]))
    if "slow" in body:
        site.slow_alarm_polls(int(body["slow"]), float(body.get("delay", 1.0)))
    if body.get("expire_tokens"):
        site.expire_access_tokens()
    if body.get("revoke_tokens"):
        site.revoke_tokens()
    if body.get("factory_reset"):
        site.factory_reset()
    if "offline" in body:
        site.offline = as_bool(body["offline"])
    return web.json_response(site.state())


CONTROL_ROUTES = control_routes(_ALARM_FIELDS, _sim_faults)


# --------------------------------------------------------------- the server
class DavantisSimulator(TenantSimulator[DavantisSite]):
    """An HTTP server hosting one or many simulated Davantis sites (tenants)."""

    def __init__(self, sites: dict[str, DavantisSite] | None = None) -> None:
        super().__init__(sites if sites is not None else {DEFAULT_TENANT: DavantisSite()})

    def _device_routes(self) -> Iterable[Route[DavantisSite]]:
        return DEVICE_ROUTES

    def _control_routes(self) -> Iterable[Route[DavantisSite]]:
        return CONTROL_ROUTES

    async def _answer(
        self, site: DavantisSite, route: Route[DavantisSite], request: web.Request
    ) -> web.StreamResponse:
        if site.offline:
            return web.Response(status=503, text="site offline")
        try:
            if route.poll_faults and (answer := await site.poll_fault()) is not None:
                return answer
            if route.auth:
                site.check_access(request.headers.get("Authorization"))
            return await route.handler(site, request)
        except DeviceError as fault:
            return fault.response()

    def start_generator(
        self,
        rate_per_site: float,
        *,
        events: Sequence[int] = (1, 2, 3, 11),
        seed: int | None = None,
    ) -> None:
        """Add alarms to every site as independent Poisson processes (one task for all)."""
        choices = tuple(events)
        self._start_generator(
            rate_per_site, seed, lambda site, rng: _generated_alarm(site, choices, rng)
        )


def _generated_alarm(site: DavantisSite, events: tuple[int, ...], rng: random.Random) -> None:
    site.add_alarm(event=rng.choice(events), camera=rng.randint(1, max(1, site.cameras)))


# ------------------------------------------------------------ command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-cap", type=int, default=300)
    parser.add_argument("--media-delay", type=float, default=1.0)
    # What the manual leaves open; the defaults are its reading.
    parser.add_argument("--order", choices=ORDERS, default="time")
    parser.add_argument("--max-date-exclusive", action="store_true")
    parser.add_argument("--min-date-exclusive", action="store_true")
    parser.add_argument("--ignore-max-date", action="store_true")
    parser.add_argument("--no-content", choices=NO_CONTENT, default="min_id")
    parser.add_argument("--utc-offset", default="+00:00")
    parser.add_argument("--time-zone", default="UTC")
    parser.add_argument("--local-times", action="store_true")
    parser.add_argument("--language", choices=sorted(ARMING_DESCRIPTIONS), default="en")
    parser.add_argument("--token-error-status", type=int, default=401)
    parser.add_argument("--input-cameras", choices=INPUT_CAMERA_LINKS, default="cameras")


async def serve(args: argparse.Namespace) -> None:
    sites = {
        name: DavantisSite(
            page_cap=args.page_cap,
            media_delay=args.media_delay,
            name=f"DAVANTIS {name}",
            order=args.order,
            max_date_exclusive=args.max_date_exclusive,
            min_date_exclusive=args.min_date_exclusive,
            ignore_max_date=args.ignore_max_date,
            no_content=args.no_content,
            utc_offset=args.utc_offset,
            time_zone=args.time_zone,
            local_times=args.local_times,
            language=args.language,
            token_error_status=args.token_error_status,
            input_cameras=args.input_cameras,
        )
        for name in tenant_names(args.sites)
    }
    await serve_cli(DavantisSimulator(sites), args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli_args(
        argv,
        description="Serve simulated Davantis sites.",
        default_port=DEFAULT_PORT,
        add_arguments=_add_arguments,
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
