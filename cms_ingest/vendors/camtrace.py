"""CamTrace CT-Server 9.16+ / Sirion 16 (REST API v1.2).

What the server gives us, and how we use it:
- WSSE UsernameToken on every request (HTTP Basic only when asked for): the bcrypt salt comes
  from `GET /api/v1.2/users/{name}/auth` (no auth needed); the whole 60-character bcrypt hash
  is the hashed password in `base64(sha1(nonce + created + hashed))`; without a salt the hash
  is MD5 (manual). A fresh nonce and `Created` per request.
- The server refuses a `Created` more than about 10 s off its own clock. We measure its clock
  (`GET /api/v1.2/getservertime`) and write `Created` in server time; on a 401 we measure
  again and retry once. The measured skew is a metric and is warned about once over 5 s.
- `GET /api/v1.2/cameras/alarms` pages newest first with `limit`/`offset` and a
  protocol-relative `Link: <//host/...>; rel="next"`. Alarms that arrive while we page shift
  every later page down, so a page may repeat alarms already seen (never skip one): we
  de-duplicate by id and stop at the newest id already stored. The `from` watermark (the last
  alarm's time, minus a margin) keeps each poll small.
- A video is the alarm recording slice (`/api/v1.2/slices?type=a`) that covers the alarm,
  fetched once the slice is closed (its `stop` after the alarm), as Matroska.

Unknown (nobody public shows it): the full list of alarm descriptions CamTrace emits. The
manual shows only "MOTION Alarm ..."; a triggered alarm's description is its custom type.
`ALARM_TYPES` below is the one place that maps description types to the taxonomy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import structlog
from pydantic import ConfigDict, Field

from cms_ingest import metrics
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
    ProblemReporter,
    SiteOptions,
    VendorContext,
)
from cms_ingest.vendors.common import as_id, error_text, parse_time, read_json

VENDOR = "camtrace"
API = "/api/v1.2"
log = structlog.get_logger("cms_ingest.vendors.camtrace")

# Description type (the text before "Alarm", upper case) -> taxonomy. The manual documents
# MOTION only; the others are what CamTrace installations are reported to show. Anything not
# here is `other`, unless the site lists it in options.input_types (custom trigger types).
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
_TYPE_RE = re.compile(r"^\s*(.*?)\s+alarm\b", re.IGNORECASE)
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)

MAX_PAGES_PER_POLL = 2000  # a Link loop must not spin forever
CAMERA_NAMES_TTL_S = 600.0
SKEW_WARN_S = 5.0
NO_SLICE_AFTER_S = 300.0  # no alarm slice this long after the alarm: the camera has none


class CamTraceOptions(SiteOptions):
    """`options:` of a CamTrace site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auth: Literal["wsse", "basic"] = "wsse"
    allow_basic_over_http: bool = False  # Basic sends the password as is: https only, unless this
    page_size: int = Field(default=100, ge=1, le=500)
    backfill: Duration | None = None  # first start: ingest this far back instead of nothing
    input_types: list[str] = Field(default_factory=list)  # custom trigger types -> `input`
    health_interval_s: float = Field(default=60.0, gt=0)
    watermark_margin_s: float = Field(default=300.0, ge=0)  # `from` = last alarm time - this


def wsse_digest(nonce: str, created: str, hashed_password: str) -> str:
    """PasswordDigest = base64(sha1(nonce + created + hashed password)), the nonce as sent."""
    raw = hashlib.sha1((nonce + created + hashed_password).encode()).digest()  # noqa: S324
    return base64.b64encode(raw).decode()


def hash_password(password: str, salt: str | None) -> str:
    """The `<hashed-password>`: bcrypt with the account's salt (full 60 chars), else MD5 hex."""
    if salt:
        import bcrypt

        return bcrypt.hashpw(password.encode(), salt.encode()).decode()
    return hashlib.md5(password.encode()).hexdigest()  # noqa: S324 - the server's own scheme


def alarm_type(description: str) -> str:
    """ "MOTION Alarm starts at ..." -> "MOTION"; a bare custom type is returned as is."""
    match = _TYPE_RE.match(description)
    return (match.group(1) if match else description).strip().upper()


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
        self._skew_warned = False
        self._cameras: dict[str, dict[str, Any]] = {}
        self._cameras_loaded_at: float | None = None
        self._health_checked_at: float | None = None
        self._health_errors: dict[str, str] = {}

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
            if self._offset_s is None:
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
            date_header = response.headers.get("Date")
        received = time.time()
        ours = (sent + received) / 2
        server = _server_time(payload, date_header)
        if server is None:
            self._problems.bad_input("server_time", "neither getservertime nor Date is readable")
            self._offset_s = 0.0
            return
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
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any, Mapping[str, str]]:
        """An authenticated GET: (status, JSON or None, headers). A 401 re-measures once."""
        await self._prepare_auth()
        for attempt in (1, 2):
            async with self._http.request("GET", path, params=params, headers=self._headers()) as r:
                payload = await read_json(r, self._problems, f"GET {_path_only(path)}")
                status, headers = r.status, r.headers
            if status == 401 and attempt == 1:
                await self._after_401()
                continue
            if status == 401:
                raise AuthenticationFailed(
                    f"GET {_path_only(path)} refused (401): {error_text(payload)}"
                )
            return status, payload, headers
        raise AssertionError("unreachable")

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
        last_id = int(cursor["last_id"])
        since = parse_time(cursor.get("last_time"))
        items = await self._collect(last_id, since)
        if not items:
            return PollResult(alarms=[], cursor=cursor)
        return PollResult(
            alarms=[self._alarm(item) for item in items],
            cursor=_cursor_after(items, cursor),
            notes=[f"caught up {len(items)} alarms"]
            if len(items) > self._options.page_size
            else [],
        )

    async def _first_poll(self) -> PollResult:
        """First start on a site: the newest alarm becomes the cursor (no backlog flood)."""
        status, payload, _ = await self._request(f"{API}/cameras/alarms", {"limit": "1"})
        newest = _alarm_items(status, payload, self._problems)
        start_id = (_id(newest[0]) or 0) if newest else 0
        start: dict[str, Any] = {"last_id": start_id}
        if newest and newest[0].get("time"):
            start["last_time"] = newest[0]["time"]
        if self._options.backfill is None:
            return PollResult(alarms=[], cursor=start)
        since = datetime.now(UTC) - timedelta(seconds=self._options.backfill)
        collected = await self._collect(0, since, margin=False)
        items = [item for item in collected if (_id(item) or 0) <= start_id]
        return PollResult(
            alarms=[self._alarm(item) for item in items],
            cursor=start,
            notes=[f"backfilled {len(items)} alarms since {since.isoformat()}"],
        )

    async def _collect(
        self, last_id: int, since: datetime | None, *, margin: bool = True
    ) -> list[dict[str, Any]]:
        """Every alarm with id > last_id, following rel=next pages, each once."""
        first_page = {"limit": str(self._options.page_size), "offset": "0"}
        if since is not None:
            start = since - timedelta(seconds=self._options.watermark_margin_s if margin else 0)
            first_page["from"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        params: dict[str, str] | None = first_page
        path = f"{API}/cameras/alarms"
        found: dict[int, dict[str, Any]] = {}
        for _page in range(MAX_PAGES_PER_POLL):
            status, payload, headers = await self._request(path, params)
            reached_cursor = False
            for item in _alarm_items(status, payload, self._problems):
                alarm_id = _id(item)
                assert alarm_id is not None
                if alarm_id <= last_id:
                    reached_cursor = True  # everything further back is stored already
                elif alarm_id not in found:
                    found[alarm_id] = item
            following = _next_link(headers)
            if reached_cursor or following is None:
                break
            path, params = following, None  # the server's next page, on our own host only
        else:
            self._problems.bad_input("paging", f"stopped after {MAX_PAGES_PER_POLL} pages")
        return [found[key] for key in sorted(found)]

    def _alarm(self, item: Mapping[str, Any]) -> Alarm:
        alarm_id = _id(item)
        description = str(item.get("description") or "")
        kind = alarm_type(description)
        camera = item.get("cameraId")
        camera_id = None if camera is None else str(camera)
        occurred = parse_time(item.get("time"))
        if occurred is None:
            self._problems.bad_input("bad_time", f"alarm {alarm_id}: `time` unreadable; using now")
            occurred = datetime.now(UTC)
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=str(alarm_id),
            event_type=self._event_type(kind),
            vendor_event=kind,
            description=description,
            occurred_at=occurred,
            camera_id=camera_id,
            camera_name=self._camera_name(camera_id),
            raw=dict(item),
            media=self._media(item, alarm_id, camera_id),
        )

    def _event_type(self, kind: str) -> EventType:
        if kind in ALARM_TYPES:
            return ALARM_TYPES[kind]
        if kind in self._input_types:
            return EventType.INPUT
        return EventType.OTHER

    def _media(
        self, item: Mapping[str, Any], alarm_id: int | None, camera_id: str | None
    ) -> tuple[MediaRequest, ...]:
        snapshot = item.get("snapshot")
        # The device's own relative path when it is one; else the documented one. Never a host.
        path = snapshot if isinstance(snapshot, str) and snapshot.startswith(f"{API}/") else None
        snapshot_request = MediaRequest(
            MediaKind.SNAPSHOT,
            {"path": path or f"{API}/cameras/alarms/{alarm_id}.jpg"},
            available=bool(snapshot) or path is None,
        )
        record_time = item.get("recordTime")
        video_request = MediaRequest(
            MediaKind.VIDEO,
            {"camera_id": camera_id, "record_time": record_time, "time": item.get("time")},
            available=bool(record_time) and camera_id is not None,
        )
        return (snapshot_request, video_request)

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
            metrics.DEVICE_HEALTH.labels(
                site_id=self.site_id, vendor=VENDOR, component=component
            ).set(1 if ok else 0)
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
        return [self._alarm(item) for item in _alarm_items(status, payload, self._problems)]

    async def describe(self) -> dict[str, Any]:
        """Cameras, commands (exturls) and scenarios with their ids, for the probe."""
        self._cameras_loaded_at = None
        await self._refresh_cameras()
        _, exturls, _ = await self._request(f"{API}/exturls")
        _, scenarios, _ = await self._request(f"{API}/scenarios")
        return {
            "cameras": {key: cam.get("name") for key, cam in self._cameras.items()},
            "commands (exturls)": (exturls or {}).get("exturls", []),
            "scenarios": (scenarios or {}).get("scenarios", []),
            "clock skew (s)": round(self._offset_s or 0.0, 2),
        }

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        if kind is MediaKind.SNAPSHOT:
            path = locator.get("path")
            if not isinstance(path, str):
                return MediaProbe("unavailable", detail="no snapshot path recorded")
            return MediaProbe("ready", path=path)  # a 404 on download means "not yet"
        return await self._video_status(locator)

    async def _video_status(self, locator: Mapping[str, Any]) -> MediaProbe:
        camera_id = locator.get("camera_id")
        start = parse_time(locator.get("record_time"))
        alarm_time = parse_time(locator.get("time")) or start
        if camera_id is None or start is None or alarm_time is None:
            return MediaProbe("unavailable", detail="the alarm has no recording")
        camera = self._cameras.get(str(camera_id))
        if camera is not None and camera.get("isRecordingAlarm") is False:
            return MediaProbe("unavailable", detail=f"camera {camera_id} records no alarms")
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
        return MediaProbe("ready", path=url)

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
        """Nothing to release: the HTTP session belongs to the process."""


# ---------------------------------------------------------------------- helpers


def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _id(item: Mapping[str, Any]) -> int | None:
    return as_id(item.get("id"))


def _alarm_items(status: int, payload: Any, problems: ProblemReporter) -> list[dict[str, Any]]:
    if status != 200:
        raise BadDeviceResponse(
            f"GET {API}/cameras/alarms answered {status}: {error_text(payload)}"
        )
    alarms = payload.get("alarms") if isinstance(payload, dict) else None
    if not isinstance(alarms, list):
        raise BadDeviceResponse(f"GET {API}/cameras/alarms: no `alarms` list in the answer")
    usable = []
    for item in alarms:
        if isinstance(item, dict) and _id(item) is not None:
            usable.append(item)
        else:
            problems.bad_input("alarm_without_id", f"alarm without a usable id: {item!r:.200}")
    return usable


def _next_link(headers: Mapping[str, str]) -> str | None:
    getall = getattr(headers, "getall", None)
    values = getall("Link", []) if getall else [headers.get("Link", "")]
    for value in values:
        match = _LINK_NEXT_RE.search(value or "")
        if match:
            return match.group(1)
    return None


def _server_time(payload: Any, date_header: str | None) -> float | None:
    server = payload.get("serverTime") if isinstance(payload, dict) else None
    if isinstance(server, dict) and isinstance(server.get("timestamp"), int | float):
        return float(server["timestamp"])
    if date_header:
        try:
            return parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return None
    return None


def _cursor_after(items: list[dict[str, Any]], previous: Cursor) -> dict[str, Any]:
    newest = max(items, key=lambda item: _id(item) or 0)
    times = [t for t in (parse_time(item.get("time")) for item in items) if t is not None]
    last_time = max(times).strftime("%Y-%m-%dT%H:%M:%SZ") if times else previous.get("last_time")
    return {"last_id": _id(newest), "last_time": last_time}


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
