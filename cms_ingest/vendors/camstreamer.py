"""CamStreamer / Netrex cloud accounts (GraphQL). One site is one cloud account.

The cloud has no alarm feed; what it gives a monitoring station is the state of every
camera. So this vendor supervises cameras:
- every status poll is ONE query (`cameraList { ... is_connected }`); a camera whose
  `is_connected` turns false and stays false for `offline_grace_s` raises `camera_offline`
  (a shorter blip raises nothing); true again raises `camera_online`. The last known state is
  kept with the cursor, so a restart does not raise a camera that was already offline, and a
  camera that went offline while the daemon was down is still raised.
- the media of a `camera_offline` alarm is the recording of the `clip_seconds` before the
  disconnect: `recordings(from, to)`, `recordingPrepare` at the highest height, then
  `recording { progress download_url }` until 100, then the download (on the portal's host).
- `output` drives the camera's VAPIX I/O port through device access
  (`options.device_url_template`, the device access token last in the query).

The account allows 1 query per second and 10,000 per day, shared by everything the daemon
does for it: one `QueryBudget` per account enforces both, every GraphQL call passes through
it, its daily count survives restarts (in the cursor), and the status cadence is derived
from what it leaves. Errors come in `errors[]`, also with HTTP 200: `authError`/`expired`
lead to a new access token, `client` is logged once, a rate-limit answer backs off.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import structlog
from pydantic import ConfigDict, Field

from cms_ingest import metrics
from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.sitehttp import SiteHttp, read_limited
from cms_ingest.vendors.base import (
    ActionSpec,
    AuthenticationFailed,
    BadDeviceResponse,
    Cursor,
    DeviceRefused,
    Download,
    InvalidAction,
    MediaProbe,
    PollResult,
    SiteOptions,
    VendorContext,
)
from cms_ingest.vendors.common import read_json

VENDOR = "camstreamer"
log = structlog.get_logger("cms_ingest.vendors.camstreamer")

GRAPHQL_PATH = "/api/graphql.php"
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a path, not a secret
STATUS_QUERY = (
    "query { cameraList { node_id name serial_number external_id is_connected "
    "connection { source_ip } } }"
)
RECORDINGS_QUERY = (
    "query ($node: Int!, $from: Int!, $to: Int!) { camera(node_id: $node) { "
    "recordings(from: $from, to: $to) { recording_id duration outputs { height } } } }"
)
PREPARE_MUTATION = (
    "mutation ($id: String!, $height: Int!) "
    "{ recordingPrepare(recording_id: $id, height: $height) }"
)
PROGRESS_QUERY = "query ($id: String!) { recording(recording_id: $id) { progress download_url } }"
SPACING_MARGIN = 1.1  # queries spaced a bit over 1/rate: jitter must not make two look 1 s apart
RATE_LIMIT_BACKOFF_S = 5.0
_SERIAL_RE = re.compile(r"[A-Za-z0-9]{1,32}")


class CamStreamerOptions(SiteOptions):
    """`options:` of a CamStreamer account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str | None = None  # OAuth2 instead of a static token: client and refresh token
    client_secret: str | None = None
    refresh_token: str | None = None
    offline_grace_s: float = Field(default=30.0, ge=0)
    clip_seconds: float = Field(default=30.0, gt=0)
    device_url_template: str = "https://{serial}.device-connect.net"
    device_access_token: str | None = None
    rate_per_s: float = Field(default=1.0, gt=0)
    daily_limit: int = Field(default=10_000, ge=1)
    status_share: float = Field(default=0.8, gt=0, le=1)  # of the daily budget, for status polls


class BudgetExhausted(BadDeviceResponse):
    """The account's daily query budget is spent: nothing more until midnight UTC."""


class QueryBudget:
    """1 query per second and `daily_limit` per day for one account.

    `acquire` spaces calls at least 1/rate apart (a little more, so network jitter can never
    put two inside one second at the server) and counts them against today's limit.
    """

    def __init__(self, rate_per_s: float, daily_limit: int, status_share: float = 0.8) -> None:
        self._spacing = SPACING_MARGIN / rate_per_s
        self._status_share = status_share
        self._daily_limit = daily_limit
        self._next_at = 0.0
        self._lock = asyncio.Lock()
        self.day = self._today()
        self.used = 0

    def restore(self, day: str | None, used: int | None) -> None:
        if day == self._today() and isinstance(used, int):
            self.day, self.used = day, max(self.used, used)

    def _today(self) -> str:
        return datetime.now(UTC).date().isoformat()

    @property
    def remaining(self) -> int:
        if self.day != self._today():
            self.day, self.used = self._today(), 0
        return max(0, self._daily_limit - self.used)

    async def acquire(self, *, daily: bool = True) -> None:
        async with self._lock:
            if daily and self.remaining <= 0:
                raise BudgetExhausted("the daily query budget is spent until midnight UTC")
            wait = self._next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_at = time.monotonic() + self._spacing
            if daily:
                self.used += 1

    def back_off(self, seconds: float) -> None:
        self._next_at = max(self._next_at, time.monotonic() + seconds)

    def status_interval(self, floor: float) -> float:
        """Seconds between status polls so they fit in their share of what is left today."""
        now = datetime.now(UTC)
        seconds_left = 86_400 - (now.hour * 3600 + now.minute * 60 + now.second)
        return max(floor, seconds_left / max(1.0, self.remaining * self._status_share))


@dataclass(slots=True)
class _Recording:
    recording_id: str
    prepared: bool = False


class CamStreamerClient:
    vendor = VENDOR
    # A hold cut short and re-run would pulse the output again: never repeated on doubt.
    actions: Mapping[str, ActionSpec] = {"output": ActionSpec(idempotent=False)}

    def __init__(self, context: VendorContext, options: CamStreamerOptions) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._static_token = context.token or None  # an account is reached with a token
        self._options = options
        self._problems = context.problems
        self._access: str | None = self._static_token
        self._refresh: str | None = options.refresh_token
        self._auth_lock = asyncio.Lock()
        self.budget = QueryBudget(options.rate_per_s, options.daily_limit, options.status_share)
        self._budget_gauge = metrics.API_BUDGET_REMAINING.labels(
            site_id=self.site_id, vendor=VENDOR
        )
        self._last_status_at: float | None = None
        self._recordings: dict[str, _Recording] = {}
        self._devices: dict[str, SiteHttp] = {}

    # ------------------------------------------------------------------ auth and queries

    async def _token(self) -> str:
        if self._access is not None:
            return self._access
        async with self._auth_lock:
            if self._access is None:
                await self._oauth_refresh()
            assert self._access is not None
            return self._access

    async def _oauth_refresh(self) -> None:
        options = self._options
        if not (options.client_id and options.client_secret and self._refresh):
            raise AuthenticationFailed(
                "the API token is refused and no OAuth2 client (client_id, client_secret, "
                "refresh_token) is configured to get a new one"
            )
        form = {
            "client_id": options.client_id,
            "client_secret": options.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": self._refresh,
        }
        async with self._http.request("POST", TOKEN_PATH, data=form) as response:
            payload = await read_json(response, self._problems, f"POST {TOKEN_PATH}")
            status = response.status
        if status != 200 or not isinstance(payload, dict) or not payload.get("access_token"):
            error = payload.get("error") if isinstance(payload, dict) else None
            raise AuthenticationFailed(f"OAuth2 refresh refused (HTTP {status}): {error or ''}")
        self._access = str(payload["access_token"])
        if payload.get("refresh_token"):  # rotated: the old one no longer works
            self._refresh = str(payload["refresh_token"])

    async def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> Any:
        """One GraphQL call through the budget; a rejected token is renewed once."""
        for attempt in (1, 2):
            token = await self._token()
            await self.budget.acquire()
            self._budget_gauge.set(self.budget.remaining)
            body = {"query": query, "variables": dict(variables or {})}
            async with self._http.request(
                "POST", GRAPHQL_PATH, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as response:
                payload = await read_json(response, self._problems, f"POST {GRAPHQL_PATH}")
                status = response.status
            category, message = _first_error(payload)
            if category in ("authError", "expired") and attempt == 1:
                if self._access == token:
                    self._access = None if self._options.client_id else self._static_token
                    if self._access is not None:  # a static token cannot be renewed
                        raise AuthenticationFailed(f"the API token is refused: {message}")
                continue
            if category in ("authError", "expired"):
                raise AuthenticationFailed(f"access refused after renewing the token: {message}")
            if category in ("rateLimit", "dailyLimit") or status == 429:
                self.budget.back_off(RATE_LIMIT_BACKOFF_S)
                raise BadDeviceResponse(f"rate limited by the account ({message or status})")
            if category is not None:
                self._problems.bad_input(f"graphql_{category}", f"{category}: {message}")
                raise BadDeviceResponse(f"GraphQL error ({category}): {message}")
            if status != 200 or not isinstance(payload, dict) or "data" not in payload:
                raise BadDeviceResponse(f"GraphQL answered {status} without data")
            return payload["data"]
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ supervision

    async def poll(self, cursor: Cursor | None) -> PollResult:
        state = dict(cursor or {})
        budget = _mapping(state.get("budget"))
        self.budget.restore(budget.get("day"), budget.get("used"))
        now = time.monotonic()
        interval = self.budget.status_interval(floor=0.0)
        if self._last_status_at is not None and now - self._last_status_at < interval:
            return PollResult(alarms=[], cursor=cursor or {})  # the budget says: not yet
        self._last_status_at = now
        data = await self.graphql(STATUS_QUERY)
        cameras = data.get("cameraList") if isinstance(data, dict) else None
        if not isinstance(cameras, list):
            raise BadDeviceResponse("cameraList missing from the answer")
        known = _mapping(state.get("cameras"))
        first_start = cursor is None
        alarms: list[Alarm] = []
        seen: dict[str, dict[str, Any]] = {}
        for camera in cameras:
            serial = camera.get("serial_number") if isinstance(camera, dict) else None
            if not serial or not isinstance(camera.get("is_connected"), bool):
                self._problems.bad_input(
                    "camera", f"camera without serial or state: {camera!r:.200}"
                )
                continue
            previous = _mapping(known.get(serial)) or None
            record, alarm = self._track(camera, previous, first_start)
            seen[serial] = record
            if alarm is not None:
                alarms.append(alarm)
        self._budget_gauge.set(self.budget.remaining)
        return PollResult(
            alarms=alarms,
            cursor={"cameras": seen, "budget": {"day": self.budget.day, "used": self.budget.used}},
        )

    def _track(
        self, camera: Mapping[str, Any], previous: Mapping[str, Any] | None, first_start: bool
    ) -> tuple[dict[str, Any], Alarm | None]:
        """The camera's new state record and the alarm its change raises, if any."""
        now = time.time()
        connected = bool(camera["is_connected"])
        base = {"node_id": camera.get("node_id"), "name": camera.get("name")}
        state = previous.get("state") if previous else None
        if connected:
            if state == "offline" and previous and previous.get("alarmed"):
                return {**base, "state": "online"}, self._alarm(
                    camera, EventType.CAMERA_ONLINE, now
                )
            return {**base, "state": "online"}, None  # online, or a blip shorter than the grace
        if state is None:
            # First sight offline: already down before we looked. Not an alarm on a first
            # start; a camera new to a running account is treated like a fresh disconnect.
            if first_start:
                return {**base, "state": "offline", "alarmed": False}, None
            state = "online"
        if state == "online":
            return {**base, "state": "pending", "since": now}, None
        if state == "pending":
            since = float(previous.get("since", now)) if previous else now
            if now - since >= self._options.offline_grace_s:
                alarm = self._alarm(camera, EventType.CAMERA_OFFLINE, since)
                return {**base, "state": "offline", "since": since, "alarmed": True}, alarm
            return {**base, "state": "pending", "since": since}, None
        return {**base, **{k: v for k, v in (previous or {}).items() if k not in base}}, None

    def _alarm(self, camera: Mapping[str, Any], event: EventType, when: float) -> Alarm:
        serial = str(camera["serial_number"])
        offline = event is EventType.CAMERA_OFFLINE
        kind = "offline" if offline else "online"
        media: tuple[MediaRequest, ...] = ()
        if offline:
            locator = {
                "node_id": camera.get("node_id"),
                "from": int(when - self._options.clip_seconds),
                "to": int(when),
            }
            media = (MediaRequest(MediaKind.VIDEO, locator),)
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=f"{serial}:{kind}:{int(when)}",
            event_type=event,
            vendor_event=f"is_connected:{str(not offline).lower()}",
            description=f"camera {camera.get('name') or serial} is {kind}",
            occurred_at=datetime.fromtimestamp(when, UTC),
            camera_id=serial,
            camera_name=str(camera.get("name") or serial),
            raw={
                "serial_number": serial,
                "external_id": camera.get("external_id"),
                "node_id": camera.get("node_id"),
                "is_connected": not offline,
            },
            media=media,
        )

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        node, start, end = locator.get("node_id"), locator.get("from"), locator.get("to")
        if kind is not MediaKind.VIDEO or not all(isinstance(v, int) for v in (node, start, end)):
            return MediaProbe("unavailable", detail="no recording for this alarm")
        key = f"{node}:{start}:{end}"
        recording = self._recordings.get(key)
        if recording is None:
            found = await self._find_recording(int(node), int(start), int(end))  # type: ignore[arg-type]
            if found is None:
                return MediaProbe(
                    "unavailable", detail="the camera recorded nothing before the disconnect"
                )
            recording = self._recordings[key] = found
        if not recording.prepared:
            return MediaProbe("pending", detail="recording preparation requested")
        data = await self.graphql(PROGRESS_QUERY, {"id": recording.recording_id})
        info = data.get("recording") if isinstance(data, dict) else None
        if not isinstance(info, dict):
            del self._recordings[key]  # expired on the portal (an hour unused): start over
            return MediaProbe("pending", detail="recording id expired; preparing again")
        if int(info.get("progress") or 0) < 100 or not info.get("download_url"):
            return MediaProbe("pending", detail=f"recording at {info.get('progress')}%")
        self._recordings.pop(key, None)
        return MediaProbe("ready", path=str(info["download_url"]))

    async def _find_recording(self, node: int, start: int, end: int) -> _Recording | None:
        data = await self.graphql(RECORDINGS_QUERY, {"node": node, "from": start, "to": end})
        camera = data.get("camera") if isinstance(data, dict) else None
        recordings = camera.get("recordings") if isinstance(camera, dict) else None
        if not recordings:
            return None
        first = recordings[0]
        heights = [o.get("height") for o in first.get("outputs") or [] if isinstance(o, dict)]
        height = max((h for h in heights if isinstance(h, int)), default=720)
        recording = _Recording(str(first["recording_id"]))
        prepared = await self.graphql(
            PREPARE_MUTATION, {"id": recording.recording_id, "height": height}
        )
        recording.prepared = bool(isinstance(prepared, dict) and prepared.get("recordingPrepare"))
        if not recording.prepared:
            raise BadDeviceResponse(f"recordingPrepare refused for {recording.recording_id}")
        return recording

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        # The download URL is the portal's own (checked: same origin as the site URL).
        async with self._http.request(
            "GET", path, timeout_s=600.0, read_timeout_s=60.0
        ) as response:
            if response.status != 200:
                raise BadDeviceResponse(f"recording download answered {response.status}")
            yield Download(
                response.content_type,
                response.content_length,
                response.content.iter_chunked(256 * 1024),
            )

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        if action.kind != "output":
            raise InvalidAction(f"camstreamer has no action {action.kind!r} (it has: output)")
        serial = action.target.strip()
        if not _SERIAL_RE.fullmatch(serial):
            raise InvalidAction(f"target must be a camera serial number, not {action.target!r}")
        port = action.params.get("port", 1)
        duration = action.params.get("duration_s", 5)
        if isinstance(port, bool) or not isinstance(port, int) or port < 0:
            raise InvalidAction(f"params.port must be a port number, not {port!r}")
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0:
            raise InvalidAction(f"params.duration_s must be a number of seconds, not {duration!r}")
        if not self._options.device_access_token:
            raise InvalidAction("options.device_access_token is not configured for this account")
        await self._port(serial, f"{port}:/")
        try:
            await asyncio.sleep(float(duration))
        finally:
            await asyncio.shield(self._port(serial, f"{port}:\\"))  # off, also when cancelled
        return ActionResult(result={"serial": serial, "port": port, "held_s": duration})

    async def _port(self, serial: str, action: str) -> None:
        http = self._device(serial)
        token = self._options.device_access_token or ""
        # The device access token must be the LAST query parameter.
        query = f"action={quote(action, safe=':')}&DEVICE_ACCESS_TOKEN={quote(token)}"
        path = f"/axis-cgi/io/port.cgi?{query}"
        await self.budget.acquire(daily=False)  # same account: same 1 query/s
        async with http.request("GET", path) as response:
            text = (await read_limited(response, 65536)).decode("utf-8", "replace")[:200]
            status = response.status
        if 400 <= status < 500:
            raise DeviceRefused(f"VAPIX port {action} on {serial} refused ({status}): {text}")
        if status != 200:
            raise BadDeviceResponse(f"VAPIX port {action} on {serial} answered {status}")

    def _device(self, serial: str) -> SiteHttp:
        if serial not in self._devices:
            self._devices[serial] = self._http.for_url(
                self._options.device_url_template.format(serial=serial)
            )
        return self._devices[serial]

    async def describe(self) -> dict[str, Any]:
        data = await self.graphql(STATUS_QUERY)
        cameras = data.get("cameraList", []) if isinstance(data, dict) else []
        return {
            "cameras (serial: name, connected)": {
                c.get(
                    "serial_number"
                ): f"{c.get('name')}, {'connected' if c.get('is_connected') else 'OFFLINE'}"
                for c in cameras
                if isinstance(c, dict)
            },
            "daily budget left": self.budget.remaining,
        }

    async def close(self) -> None:
        """Nothing to release: the HTTP session belongs to the process."""


# ---------------------------------------------------------------------- helpers


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _first_error(payload: Any) -> tuple[str | None, str]:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("category") or "unknown"), str(errors[0].get("message") or "")
    return None, ""


def check_site(url: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    parsed = CamStreamerOptions.model_validate(options)
    problems: list[tuple[str, str]] = []
    if "{serial}" not in parsed.device_url_template:
        problems.append(("device_url_template", "must contain {serial}"))
    if parsed.client_id and not parsed.refresh_token:
        problems.append(("refresh_token", "OAuth2 needs the refresh token the portal issued"))
    del url
    return problems
