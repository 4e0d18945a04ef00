"""Davantis video-analytics sites (HTTP API on port 21000).

What the device gives us, and how we use it:
- OAuth password grant; the access token expires (`expires_in`). We refresh with the refresh
  token shortly before expiry, and whenever a request answers 401 or one of the two expiry
  error codes; when refreshing fails we log in again. One refresh at a time per site.
- `GET /alarms?min_id=N` returns alarms newer than N, newest first, at most 300 (the cap),
  204 when there are none. After an outage more may be waiting: we page back with `max_date`
  set to the oldest alarm's own `started` text until the stored cursor is reached, so nothing
  is dropped. `cra=yes` keeps only alarms raised while armed unless `options.armed_only`
  is false.
- Media readiness (`snapshot_status`, `video_status`) changes after the alarm first appears
  and a `min_id` poll never shows that, so the media fetcher asks again per alarm.
- `*_absolute` URLs carry whatever host the device was set up with (often a NAT address):
  never used. Media paths are built here and resolved against the configured site URL.
- Everything the device sends is untrusted: answers are size- and depth-capped before they
  are parsed (an unreadable one is bad input and fails the poll, never the poller).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

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
    VendorContext,
)
from cms_ingest.vendors.common import (
    DESCRIPTION_LIMIT,
    MAX_JSON_BYTES,  # noqa: F401 - re-exported: tests size hostile answers by it
    as_id,
    clean_text,
    parse_time,
    read_json,
)

VENDOR = "davantis"

EVENT_TYPES: Mapping[int, EventType] = {
    0: EventType.SYSTEM,
    1: EventType.MOTION,
    2: EventType.PERSON,
    3: EventType.VEHICLE,
    7: EventType.OTHER,
    10: EventType.SABOTAGE,
    11: EventType.INTRUSION,
    18: EventType.INPUT,
}
ARMING_EVENT = 102
SYSTEM_EVENTS = frozenset({0, ARMING_EVENT})  # never carry media

# Error codes that mean "this access token is no longer good" (manual + field notes).
TOKEN_ERROR_CODES = frozenset(
    {
        "keymanagement.service.access_token_expired",
        "keymanagement.service.invalid_access_token",
    }
)
# An OAuth bearer token (RFC 6750 b64token): anything else would be written into a header.
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]{1,4096}=*")
CAMERA_NAMES_TTL_S = 600.0
ARMING_TTL_S = 60.0  # /inputs re-read this often (and right after an arming change)


class DavantisOptions(SiteOptions):
    """`options:` of a Davantis site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    armed_only: bool = True  # cra=yes: only alarms raised while the camera was armed
    backfill: Duration | None = None  # first start: ingest this far back instead of nothing
    page_cap: int = Field(default=300, ge=1)  # the device's per-response maximum


class _Token:
    """The current access token; `generation` tells a stale failure from a fresh one."""

    def __init__(self) -> None:
        self.access: str | None = None
        self.refresh: str | None = None
        self.expires_at = 0.0
        self.generation = 0


class DavantisClient:
    vendor = VENDOR
    actions: Mapping[str, ActionSpec] = {
        # Setting a relay or input to a state twice leaves it in that state: safe to repeat.
        "relay": ActionSpec(idempotent=True),
        "arm": ActionSpec(idempotent=True),
        "disarm": ActionSpec(idempotent=True),
    }

    def __init__(
        self,
        context: VendorContext,
        options: DavantisOptions,
        clock: Any = time.monotonic,
    ) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._username = context.username
        self._password = context.password
        self._options = options
        self._problems = context.problems
        self._clock = clock
        self._token = _Token()
        self._token_lock = asyncio.Lock()
        self._cameras: dict[str, str] = {}
        self._cameras_loaded_at: float | None = None
        self._utc_offset: timezone | None = None
        # Arming, when not filtered by cra=yes: per camera from the inputs that cover it,
        # else the site's (any input armed); event 102 updates it as it streams in.
        self._site_armed: bool | None = None
        self._camera_armed: dict[str, bool] = {}
        self._arming_loaded_at: float | None = None

    # ------------------------------------------------------------------ requests

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> tuple[int, Any]:
        """An authenticated request; returns (status, parsed JSON or None).

        A token rejected as expired or invalid is renewed once and the request repeated.
        """
        for attempt in (1, 2):
            generation, token = await self._valid_token()
            headers = {"Authorization": f"Bearer {token}"}
            async with self._http.request(
                method, path, params=params, headers=headers, json=json_body
            ) as response:
                status = response.status
                # Not JSON on a 2xx status: bad input, and the request fails.
                payload = await read_json(response, self._problems, f"{method} {path}", strict=True)
            if status == 401 or _error_code(payload) in TOKEN_ERROR_CODES:
                if attempt == 1:
                    self._invalidate(generation)
                    continue
                raise AuthenticationFailed(
                    f"{method} {path}: the device rejects a fresh token "
                    f"({_fault_text(payload) or status})"
                )
            return status, payload
        raise AssertionError("unreachable")

    def _invalidate(self, generation: int) -> None:
        # Only the token that failed is dropped: a concurrent request may have renewed it.
        if self._token.generation == generation:
            self._token.expires_at = 0.0

    async def _valid_token(self) -> tuple[int, str]:
        token = self._token
        if token.access is not None and self._clock() < token.expires_at:
            return token.generation, token.access
        async with self._token_lock:  # one refresh at a time; late arrivals reuse its result
            if token.access is None or self._clock() >= token.expires_at:
                await self._renew()
            assert token.access is not None
            return token.generation, token.access

    async def _renew(self) -> None:
        if self._token.refresh is not None:
            try:
                await self._grant(
                    {"grant_type": "refresh_token", "refresh_token": self._token.refresh}
                )
                return
            except AuthenticationFailed:
                self._token.refresh = None  # refused: fall back to a fresh login
        await self._grant(
            {"grant_type": "password", "username": self._username, "password": self._password}
        )

    async def _grant(self, form: Mapping[str, str]) -> None:
        grant = form["grant_type"]
        async with self._http.request("POST", "/oauth/token", data=dict(form)) as response:
            status = response.status
            payload = await read_json(response, self._problems, "POST /oauth/token")
        if status != 200 or not isinstance(payload, dict) or "access_token" not in payload:
            detail = _fault_text(payload) or f"HTTP {status}"
            raise AuthenticationFailed(f"{grant} grant refused: {detail}")
        if not isinstance(payload["access_token"], str) or not _BEARER_TOKEN_RE.fullmatch(
            payload["access_token"]
        ):
            # It goes into an Authorization header: CR/LF or odd bytes would inject headers.
            raise AuthenticationFailed(
                f"{grant} grant: the device's access token is not a valid bearer token"
            )
        expires_in = _as_float(payload.get("expires_in"), default=3600.0)
        # Renew at 90% of the lifetime (at most a minute early) so polls never hit expiry.
        margin = min(60.0, expires_in * 0.1)
        self._token.access = str(payload["access_token"])
        self._token.refresh = (
            str(payload["refresh_token"]) if payload.get("refresh_token") else None
        )
        self._token.expires_at = self._clock() + max(1.0, expires_in - margin)
        self._token.generation += 1

    # ------------------------------------------------------------------ alarms

    def _filters(self) -> dict[str, str]:
        return {"cra": "yes"} if self._options.armed_only else {}

    async def _alarm_page(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        return (await self._raw_alarm_page(params))[1]

    async def _raw_alarm_page(self, params: Mapping[str, str]) -> tuple[int, list[dict[str, Any]]]:
        """(items the device sent, the usable ones): a page is full by the device's count."""
        status, payload = await self._request("GET", "/alarms", params=params)
        if status == 204:
            return 0, []
        if status != 200:
            raise BadDeviceResponse(f"GET /alarms answered {status}: {_fault_text(payload)}")
        if not isinstance(payload, list):
            raise BadDeviceResponse(f"GET /alarms: expected a list, got {type(payload).__name__}")
        return len(payload), [item for item in payload if self._usable(item)]

    def _usable(self, item: Any) -> bool:
        if isinstance(item, dict) and _alarm_id(item) is not None:
            return True
        self._problems.bad_input("alarm_without_id", f"alarm without a usable id: {item!r:.200}")
        return False

    async def _collect(self, params: Mapping[str, str], floor_id: int) -> list[dict[str, Any]]:
        """Every alarm matching `params` with id > floor_id, paging back past the cap."""
        found: dict[int, dict[str, Any]] = {}
        sent, page = await self._raw_alarm_page(params)
        while True:
            fresh = 0
            for item in page:
                alarm_id = _alarm_id(item)
                assert alarm_id is not None
                if alarm_id > floor_id and alarm_id not in found:
                    found[alarm_id] = item
                    fresh += 1
            if sent < self._options.page_cap or not page:
                break  # the device had no more than this
            oldest = min(page, key=lambda item: _alarm_id(item) or 0)
            if (_alarm_id(oldest) or 0) <= floor_id + 1:
                break  # reached the cursor
            if fresh == 0 or not isinstance(oldest.get("started"), str):
                self._problems.bad_input(
                    "paging_stuck",
                    f"cannot page back past alarm {_alarm_id(oldest)}: over "
                    f"{self._options.page_cap} alarms share one start time; older ones "
                    "between it and the cursor may be missed",
                )
                break
            # The device's own text for the oldest start time: no clock or zone arithmetic.
            sent, page = await self._raw_alarm_page({**params, "max_date": oldest["started"]})
        return [found[key] for key in sorted(found)]

    async def poll(self, cursor: Cursor | None) -> PollResult:
        await self._refresh_context()
        if not self._options.armed_only:
            await self._refresh_arming()
        if cursor is None:
            return await self._first_poll()
        last_id = int(cursor["last_id"])
        items = await self._collect({**self._filters(), "min_id": str(last_id)}, last_id)
        if not items:
            return PollResult(alarms=[], cursor=cursor)
        notes = [f"caught up {len(items)} alarms"] if len(items) > self._options.page_cap else []
        return PollResult(
            alarms=[self._alarm(item) for item in items],
            cursor={"last_id": max(_alarm_id(item) or 0 for item in items)},
            notes=notes,
        )

    async def _first_poll(self) -> PollResult:
        """First start on a site: the newest id becomes the cursor (no backlog flood)."""
        newest = await self._alarm_page(self._filters())
        start_id = max((_alarm_id(item) or 0 for item in newest), default=0)
        if self._options.backfill is None:
            return PollResult(alarms=[], cursor={"last_id": start_id})
        since = datetime.now(UTC) - timedelta(seconds=self._options.backfill)
        items = await self._collect({**self._filters(), "min_date": since.isoformat()}, 0)
        items = [item for item in items if (_alarm_id(item) or 0) <= start_id]
        return PollResult(
            alarms=[self._alarm(item) for item in items],
            cursor={"last_id": start_id},
            notes=[f"backfilled {len(items)} alarms since {since.isoformat()}"],
        )

    def _alarm(self, item: Mapping[str, Any]) -> Alarm:
        alarm_id = _alarm_id(item)
        event = as_id(item.get("idevent"))
        camera = item.get("idcamera")
        camera_id = None if camera is None else str(camera)
        description = str(item.get("description") or item.get("description_translation") or "")
        started, readable = self._device_time(item.get("started"), alarm_id)
        has_media = event not in SYSTEM_EVENTS
        # The device's own `started` text helps find the alarm again for its media; one we
        # could not read is not sent back to it.
        locator = {"alarm_id": alarm_id, "started": item.get("started") if readable else None}
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=str(alarm_id),
            event_type=_event_type(event, item),
            vendor_event="" if event is None else str(event),
            description=description,
            occurred_at=started,
            camera_id=camera_id,
            camera_name=self._cameras.get(camera_id or ""),
            armed=self._armed(event, camera_id, item),
            raw=dict(item),
            media=(
                self._media(MediaKind.SNAPSHOT, item, "snapshot_status", has_media, locator),
                self._media(MediaKind.VIDEO, item, "video_status", has_media, locator),
            ),
        )

    def _armed(
        self, event: int | None, camera_id: str | None, item: Mapping[str, Any]
    ) -> bool | None:
        """Whether the camera was armed: known for cra=yes; else from inputs and event 102."""
        if self._options.armed_only:
            return True  # cra=yes lists only alarms raised while armed
        if event == ARMING_EVENT:
            # The site's state changed now; which input did is re-read on the next poll.
            self._site_armed = _event_type(event, item) is EventType.ARMED
            self._camera_armed.clear()
            self._arming_loaded_at = None
            return self._site_armed
        return self._camera_armed.get(camera_id or "", self._site_armed)

    async def _refresh_arming(self) -> None:
        now = self._clock()
        if self._arming_loaded_at is not None and now - self._arming_loaded_at < ARMING_TTL_S:
            return
        self._arming_loaded_at = now
        status, inputs = await self._request("GET", "/inputs")
        if status != 200 or not isinstance(inputs, list):
            self._problems.bad_input("inputs", f"input list unreadable (HTTP {status})")
            return
        armed_cameras: dict[str, bool] = {}
        for item in inputs:
            if not isinstance(item, dict) or not isinstance(item.get("status"), bool):
                continue
            cameras = item.get("cameras")
            for camera in cameras if isinstance(cameras, list) else []:  # armed if any input is
                key = str(camera)
                armed_cameras[key] = armed_cameras.get(key, False) or item["status"]
        states = [
            item["status"]
            for item in inputs
            if isinstance(item, dict) and isinstance(item.get("status"), bool)
        ]
        self._site_armed = any(states) if states else None
        self._camera_armed = armed_cameras

    def _media(
        self,
        kind: MediaKind,
        item: Mapping[str, Any],
        field: str,
        has_media: bool,
        locator: Mapping[str, Any],
    ) -> MediaRequest:
        status = item.get(field)
        available = has_media and status != "unavailable"
        return MediaRequest(kind=kind, locator=dict(locator), available=available)

    def _device_time(self, value: Any, alarm_id: int | None) -> tuple[datetime, bool]:
        """(the alarm's time in UTC, whether the device's value was readable)."""
        # Without an offset it is the device's local time: its installation offset.
        parsed = parse_time(value, self._utc_offset or UTC)
        if parsed is not None:
            return parsed, True
        self._problems.bad_input(
            "bad_started",
            f"alarm {alarm_id}: `started` {value!r:.100} is not a usable ISO 8601 time; using now",
        )
        return datetime.now(UTC), False

    # ------------------------------------------------------------------ context

    async def _refresh_context(self) -> None:
        """Camera names and the installation's UTC offset; best effort, never fails a poll."""
        now = self._clock()
        if (
            self._cameras_loaded_at is not None
            and now - self._cameras_loaded_at < CAMERA_NAMES_TTL_S
        ):
            return
        try:
            status, cameras = await self._request("GET", "/cameras")
            if status == 200 and isinstance(cameras, list):
                self._cameras = {
                    str(cam["id"]): str(cam.get("alias") or cam.get("name") or cam["id"])
                    for cam in cameras
                    if isinstance(cam, dict) and "id" in cam
                }
            status, installation = await self._request("GET", "/installation")
            if status == 200 and isinstance(installation, dict):
                self._utc_offset = _parse_offset(installation.get("current_utc_offset"))
        except (BadDeviceResponse, KeyError, TypeError, ValueError) as exc:
            self._problems.bad_input("cameras", f"camera list unreadable: {exc!r:.200}")
        # Only once the device answered: after a failed login or connection (which fails this
        # poll anyway) the names are asked for on the next poll, not ten minutes later.
        self._cameras_loaded_at = now

    async def recent_alarms(self, count: int) -> list[Alarm]:
        """The newest alarms on the device, whatever their state (for the probe)."""
        await self._refresh_context()
        return [self._alarm(item) for item in (await self._alarm_page({}))[:count]]

    async def describe(self) -> dict[str, Any]:
        """Cameras, relays and inputs, for the commissioning probe."""
        await self._refresh_context()
        _, relays = await self._request("GET", "/relays")
        _, inputs = await self._request("GET", "/inputs")
        return {"cameras": dict(self._cameras), "relays": relays, "inputs": inputs}

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        alarm_id = as_id(locator.get("alarm_id"))
        if alarm_id is None:
            return MediaProbe("unavailable", detail="no alarm id recorded for this media")
        item = await self._find_alarm(alarm_id, locator.get("started"))
        if item is None:
            return MediaProbe("pending", detail=f"alarm {alarm_id} not listed by the device")
        field = "snapshot_status" if kind is MediaKind.SNAPSHOT else "video_status"
        status = item.get(field)
        if status == "ready":
            return MediaProbe("ready", path=f"/alarms/{alarm_id}/{kind.value}")
        if status == "unavailable":
            return MediaProbe("unavailable", detail=f"{field} is unavailable")
        shown = clean_text(status, 100) if isinstance(status, str) else f"{status!r:.100}"
        return MediaProbe("pending", detail=f"{field} is {shown}")

    async def _find_alarm(self, alarm_id: int, started: Any) -> dict[str, Any] | None:
        """The alarm as the device lists it now (no cra filter: find it whatever its state)."""
        queries: list[dict[str, str]] = []
        if isinstance(started, str):
            queries.append({"min_id": str(alarm_id - 1), "max_date": started})
        queries.append({"min_id": str(alarm_id - 1)})
        for params in queries:
            for item in await self._alarm_page(params):
                if _alarm_id(item) == alarm_id:
                    return item
        return None

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        for attempt in (1, 2):
            generation, token = await self._valid_token()
            async with self._http.request(
                "GET",
                path,
                headers={"Authorization": f"Bearer {token}"},
                timeout_s=600.0,
                read_timeout_s=30.0,
            ) as response:
                if response.status == 401 and attempt == 1:
                    self._invalidate(generation)
                    continue
                if response.status == 404:
                    raise MediaNotReady(f"GET {path} answered 404")
                if response.status != 200:
                    raise BadDeviceResponse(f"GET {path} answered {response.status}")
                yield Download(
                    content_type=response.content_type,
                    content_length=response.content_length,
                    chunks=response.content.iter_chunked(256 * 1024),
                )
                return

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        resource_id = _resource_id(action)
        if action.kind == "relay":
            state = action.params.get("state", True)
            if not isinstance(state, bool):
                raise InvalidAction(f"params.state must be true or false, not {state!r}")
            return await self._patch(f"/relays/{resource_id}", state)
        if action.kind in ("arm", "disarm"):
            self._arming_loaded_at = None  # re-read the inputs on the next poll
            return await self._patch(f"/inputs/{resource_id}", action.kind == "arm")
        raise InvalidAction(
            f"davantis has no action {action.kind!r} (it has: {', '.join(sorted(self.actions))})"
        )

    async def _patch(self, path: str, status_value: bool) -> ActionResult:
        status, payload = await self._request("PATCH", path, json_body={"status": status_value})
        answer = payload if isinstance(payload, dict) else {"body": payload}
        if 200 <= status < 300:
            return ActionResult(result={"status": status, "answer": answer})
        if 400 <= status < 500:
            raise DeviceRefused(
                f"PATCH {path} refused ({status}): {_fault_text(payload) or 'no reason given'}",
                answer=answer,
            )
        raise BadDeviceResponse(f"PATCH {path} answered {status}: {_fault_text(payload)}")

    async def close(self) -> None:
        """Nothing to release: the HTTP session belongs to the process."""


# ---------------------------------------------------------------------- parsing helpers


def _error_code(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    fault = payload.get("fault")
    if isinstance(fault, dict):
        detail = fault.get("detail")
        if isinstance(detail, dict) and isinstance(detail.get("errorcode"), str):
            return str(detail["errorcode"])
    return None


def _fault_text(payload: Any) -> str:
    """The device's error text, storable (it ends up in `site_state.last_error` and such)."""
    return clean_text(_raw_fault_text(payload), DESCRIPTION_LIMIT)


def _raw_fault_text(payload: Any) -> str:
    if not isinstance(payload, dict):
        return ""
    fault = payload.get("fault")
    if isinstance(fault, dict):
        text = fault.get("faultstring")
        code = _error_code(payload)
        return " / ".join(str(part) for part in (text, code) if part)
    for key in ("error_description", "error", "message"):
        if isinstance(payload.get(key), str):
            return str(payload[key])
    return ""


def _alarm_id(item: Mapping[str, Any]) -> int | None:
    return as_id(item.get("id"))


def _as_float(value: Any, *, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) else default


def _event_type(event: int | None, item: Mapping[str, Any]) -> EventType:
    if event == ARMING_EVENT:
        text = f"{item.get('description', '')} {item.get('description_translation', '')}".lower()
        return EventType.DISARMED if ("disarm" in text or "desarm" in text) else EventType.ARMED
    if event is None:
        return EventType.OTHER
    return EVENT_TYPES.get(event, EventType.OTHER)


def _parse_offset(value: Any) -> timezone | None:
    """`current_utc_offset` as "+01:00", "+0100" or minutes; None when unreadable."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            minutes = float(value) / 60 if abs(value) > 24 * 60 else float(value)
            return timezone(timedelta(minutes=minutes))  # ValueError past +-24 h, or NaN
        if isinstance(value, str):
            return datetime.strptime(value.replace(":", ""), "%z").tzinfo  # type: ignore[return-value]
    except (ValueError, OverflowError):
        return None
    return None


def _resource_id(action: Action) -> int:
    resource_id = as_id(action.target)
    if resource_id is None:
        raise InvalidAction(f"target must be a numeric relay or input id, not {action.target!r}")
    return resource_id
