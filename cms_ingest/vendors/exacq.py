"""exacqVision Web Service (API v1). One site is one exacqVision server behind the web service.

How we use it:
- Session: `POST /v1/login.web` (`u`, `p`, `responseVersion=2`, `s` = options.server); the
  session id comes back as `sessionId` (or `sessionID`, as the manual spells it). An expired
  session shows in any of five ways (401, 403, a 302 to login.web, an HTML page, or
  `success: false`): each means one new login and one retry. Logout on shutdown.
- Alarms: the server lists the events that are active *now*. An event that appears is one
  alarm; while it stays listed it is the same event (also across a restart: the set of
  active events is part of the cursor); once it drops out it has ended, and an event that
  starts again is a new alarm.
- Media: a JPEG frame at the alarm time (the recorded frame; the live one if none), and an
  export (MP4) from `pre_seconds` before to `post_seconds` after the alarm, created once that
  window has passed, polled until complete, downloaded, then finished so the server frees it.
- Soft triggers fall back to off about 3 s after the last `on`: a hold re-sends `on` every
  second and ends with `off` (also when the daemon stops mid-hold).

Unknown (nobody public shows them): the paths and item fields of active events, soft
triggers and recorded frames. They are assumptions, kept in `ExacqApi` below so that a
correction from the field is a one-line change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import structlog
from pydantic import ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
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
from cms_ingest.vendors.common import as_id, as_int, error_text, parse_time, read_json

VENDOR = "exacq"
log = structlog.get_logger("cms_ingest.vendors.exacq")


@dataclass(frozen=True, slots=True)
class ExacqApi:
    """Every path and field name the client relies on. Assumed ones are marked."""

    login: str = "/v1/login.web"
    logout: str = "/v1/logout.web"
    config: str = "/v1/config.web"
    cameras_key: str = "Cameras"
    session_keys: tuple[str, ...] = ("sessionId", "sessionID")
    events: str = "/v1/events.web"  # assumed
    events_key: str = "events"  # assumed, and the event fields below
    event_id: str = "id"
    event_type: str = "type"
    event_name: str = "name"
    event_source: str = "sourceId"
    event_source_name: str = "sourceName"
    event_start: str = "start"
    event_active: str = "active"
    soft_triggers: str = "/v1/softtriggers.web"  # assumed (GET lists, POST sets)
    triggers_key: str = "Triggers"  # assumed
    recorded_frame: str = "/v1/frame.web"  # assumed path of "Retrieve Single Recorded Frame"
    live_frame: str = "/v1/video.web"  # the legacy query form: s, camera, format
    export: str = "/v1/export.web"
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
DEFAULT_EVENT_TYPES = (1, 2, 3, 21, 24, 27, 28)
INVENTORY_TTL_S = 3600.0
HOLD_RESEND_S = 1.0  # a soft trigger drops to off ~3 s after the last `on`


class ExacqOptions(SiteOptions):
    """`options:` of an exacqVision site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: int = Field(default=0, ge=0)  # the `s` of login: which server behind the service
    event_types: list[int] = Field(default_factory=lambda: list(DEFAULT_EVENT_TYPES))
    pre_seconds: float = Field(default=10.0, ge=0)
    post_seconds: float = Field(default=20.0, ge=0)
    export_format: str = "mp4"


def event_key(item: Mapping[str, Any]) -> str | None:
    """An active event's identity: its id, else type, source and start."""
    if item.get(API.event_id) not in (None, ""):
        return str(item[API.event_id])
    if item.get(API.event_type) is None or item.get(API.event_start) is None:
        return None
    return f"{item[API.event_type]}:{item.get(API.event_source)}:{item[API.event_start]}"


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
        self._login_lock = asyncio.Lock()
        self._cameras: dict[str, str] = {}
        self._triggers: dict[str, str] = {}
        self._inventory_at: float | None = None
        self._server_tz: timezone = UTC
        self._exports: dict[str, str] = {}  # media key -> export id on the server

    # ------------------------------------------------------------------ session

    async def _session_id(self) -> str:
        if self._session is not None:
            return self._session
        async with self._login_lock:
            if self._session is None:
                await self._login()
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
        self._session = str(session)

    def _expire(self, session: str) -> None:
        if self._session == session:
            self._session = None

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
            if not expired:
                return status, payload
            self._expire(session)
            if attempt == 2:
                raise AuthenticationFailed(
                    f"{path}: session refused after a new login (HTTP {status})"
                )
        raise AssertionError("unreachable")

    async def _answer(self, response: aiohttp.ClientResponse, where: str) -> tuple[bool, Any]:
        """(whether the answer says our session expired, its JSON or None), the body parsed once.

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
        payload = await read_json(response, self._problems, where)
        refused = status == 200 and isinstance(payload, dict) and payload.get("success") is False
        return refused, payload

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
            self._cameras = {
                str(cam["id"]): str(cam.get("name") or cam["id"])
                for cam in cameras
                if isinstance(cam, dict) and "id" in cam
            }
        else:
            self._problems.bad_input("cameras", f"camera list unreadable (HTTP {status})")
        status, listing = await self._call("GET", API.soft_triggers)
        triggers = listing.get(API.triggers_key) if isinstance(listing, dict) else None
        if status == 200 and isinstance(triggers, list):
            self._triggers = {
                str(t["id"]): str(t.get("name") or t["id"])
                for t in triggers
                if isinstance(t, dict) and "id" in t
            }

    # ------------------------------------------------------------------ alarms

    async def poll(self, cursor: Cursor | None) -> PollResult:
        await self._refresh_inventory()
        params = [("filter", str(t)) for t in self._options.event_types]
        status, payload = await self._call("GET", API.events, params)
        items = payload.get(API.events_key) if isinstance(payload, dict) else None
        if status != 200 or not isinstance(items, list):
            raise BadDeviceResponse(f"GET {API.events} answered {status}: {error_text(payload)}")
        previous = set(cursor.get("active", [])) if cursor else set()
        active: dict[str, Mapping[str, Any]] = {}
        for item in items:
            key = event_key(item) if isinstance(item, dict) else None
            if key is None:
                self._problems.bad_input("event", f"event without id, type or start: {item!r:.200}")
                continue
            if item.get(API.event_active) is False:
                continue
            active[key] = item
        alarms = [self._alarm(key, item) for key, item in active.items() if key not in previous]
        return PollResult(alarms=alarms, cursor={"active": sorted(active)})

    def _alarm(self, key: str, item: Mapping[str, Any]) -> Alarm:
        event_type = as_int(item.get(API.event_type))
        source = item.get(API.event_source)
        camera_id = None if source is None else str(source)
        occurred = self._server_time(item.get(API.event_start))
        name = item.get(API.event_name) or EVENT_NAMES.get(event_type or 0, "event")
        source_name = item.get(API.event_source_name) or self._cameras.get(camera_id or "")
        has_camera = camera_id is not None and camera_id in self._cameras
        media_locator = {"camera": camera_id, "time": occurred.isoformat(), "key": key}
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=key,
            event_type=EVENT_TYPES.get(event_type or 0, EventType.SYSTEM),
            vendor_event="" if event_type is None else str(event_type),
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

    def _server_time(self, value: Any) -> datetime:
        occurred = parse_time(value, self._server_tz)
        if occurred is None:
            self._problems.bad_input(
                "event_start", f"event start {value!r:.100} is not RFC 3339; using now"
            )
            return datetime.now(UTC)
        offset = datetime.fromisoformat(value).utcoffset()  # parse_time read it: no error
        if offset is not None:
            self._server_tz = timezone(offset)  # exports are asked for in the server's offset
        return occurred

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        camera, when = locator.get("camera"), parse_time(locator.get("time"))
        if camera is None or when is None:
            return MediaProbe("unavailable", detail="the event has no camera")
        if kind is MediaKind.SNAPSHOT:
            return MediaProbe("ready", path=f"frame|{camera}|{when.isoformat()}")
        return await self._export_status(str(camera), when, str(locator.get("key")))

    async def _export_status(self, camera: str, when: datetime, key: str) -> MediaProbe:
        start = when - timedelta(seconds=self._options.pre_seconds)
        end = when + timedelta(seconds=self._options.post_seconds)
        if datetime.now(UTC) < end + timedelta(seconds=1):
            return MediaProbe("pending", detail="the export window has not passed yet")
        export_id = self._exports.get(key)
        if export_id is None:
            export_id = await self._create_export(camera, start, end)
            self._exports[key] = export_id
        status, payload = await self._call("GET", API.export, {"export": export_id})
        if status == 404:
            del self._exports[key]  # the server forgot it (a restart, a 15-minute cleanup)
            return MediaProbe("pending", detail="export gone on the server; creating it again")
        progress = as_int(payload.get("progress")) if isinstance(payload, dict) else None
        if status != 200 or progress is None:
            raise BadDeviceResponse(f"export status answered {status}: {error_text(payload)}")
        if progress < 100:
            return MediaProbe("pending", detail=f"export at {progress}%")
        return MediaProbe("ready", path=f"export|{export_id}|{key}")

    async def _create_export(self, camera: str, start: datetime, end: datetime) -> str:
        params = {
            "camera": camera,
            "start": start.astimezone(self._server_tz).isoformat(timespec="seconds"),
            "end": end.astimezone(self._server_tz).isoformat(timespec="seconds"),
            "format": self._options.export_format,
        }
        status, payload = await self._call("GET", API.export, params)
        export_id = payload.get("export") if isinstance(payload, dict) else None
        if status != 200 or not export_id:
            raise BadDeviceResponse(f"export refused ({status}): {error_text(payload)}")
        return str(export_id)

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        kind, first, second = path.split("|", 2)
        session = await self._session_id()
        if kind == "frame":
            async with self._frame(session, first, second) as download:
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
    async def _frame(self, session: str, camera: str, when: str) -> AsyncIterator[Download]:
        """The recorded frame at the alarm time; the live frame when nothing was recorded."""
        attempts = (
            (
                API.recorded_frame,
                [("s", session), ("camera", camera), ("time", when), ("format", API.jpeg_format)],
            ),
            (API.live_frame, [("s", session), ("camera", camera), ("format", API.jpeg_format)]),
        )
        for path, params in attempts:
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
        raise MediaNotReady(f"no frame of camera {camera} yet")

    async def _finish_export(self, export_id: str, key: str) -> None:
        self._exports.pop(key, None)
        try:
            await self._call("GET", API.export, {"export": export_id, "action": "finish"})
        except (
            AuthenticationFailed,
            BadDeviceResponse,
        ) as exc:  # it is freed after 15 minutes anyway
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
        if 400 <= status < 500:
            raise DeviceRefused(
                f"soft trigger {trigger} {state} refused ({status}): {error_text(payload)}"
            )
        if status >= 500:
            raise BadDeviceResponse(f"soft trigger {trigger} {state} answered {status}")

    # ------------------------------------------------------------------ probe

    async def describe(self) -> dict[str, Any]:
        await self._refresh_inventory(force=True)
        return {"cameras": dict(self._cameras), "soft triggers": dict(self._triggers)}

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
                media=(MediaRequest(MediaKind.SNAPSHOT, {"camera": cam, "time": now, "key": cam}),),
            )
            for cam in list(self._cameras)[:count]
        ]

    async def close(self) -> None:
        """Log out, so the server frees the session at once."""
        if self._session is None:
            return
        try:
            async with self._http.request("POST", API.logout, params={"s": self._session}):
                pass
        except Exception as exc:  # shutting down: a failed logout only costs the server a session
            log.info("exacq_logout_failed", site_id=self.site_id, error=str(exc))
        self._session = None


# ---------------------------------------------------------------------- helpers


def _pairs(params: Mapping[str, Any] | list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, list):
        return params
    return [(key, str(value)) for key, value in params.items()]
