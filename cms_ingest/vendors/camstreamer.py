"""CamStreamer / Netrex cloud accounts (GraphQL). One site is one cloud account.

The cloud has no alarm feed; what it gives a monitoring station is the state of every
camera. So this vendor supervises cameras, asking only for fields the manual documents (a
portal that validates its schema refuses a whole query over one unknown field):
- the cameras' `node_id`s come from `nodeList(type: camera) { node_id name external_id }`,
  read at the first poll and every `camera_list_refresh_s` after; every status poll is then
  ONE query of `camera(node_id) { name serial_number is_connected }` per camera, joined with
  GraphQL aliases (`c140094: camera(node_id: 140094) {...}`), up to
  `MAX_CAMERAS_PER_QUERY` cameras per query.
- a camera whose `is_connected` turns false and stays false for `offline_grace_s` raises
  `camera_offline` (a shorter blip raises nothing); true again raises `camera_online`. The
  last known state is kept with the cursor, so a restart does not raise a camera that was
  already offline, and a camera that went offline while the daemon was down is still raised.
  Cameras already offline when the site's state is first read raise nothing, also when that
  first read only succeeds after failed polls.
- a `camera_offline` alarm's `occurred_at` is the last time the camera was seen connected
  (the disconnect happened after it) or, for a camera never seen connected, the poll that
  first saw it offline; `raw.occurred_at_is` says which. Its media is the recording of the
  `clip_seconds` before that time: `recordings(from, to)`, `recordingPrepare` at the highest
  height, then `recording { progress download_url }` until 100, then the download (on the
  portal's host or one of `options.download_hosts`).
- `output` drives the camera's VAPIX I/O port through device access
  (`options.device_url_template`) with the account's API token as `DEVICE_ACCESS_TOKEN` (the
  manual: an API token with the Configuration permission), or `options.device_access_token`.
  The "off" is always sent, and retried until it succeeds or the action's `not_after`.

The account allows 1 query per second and 10,000 per day, shared by everything the daemon
does for it: one `QueryBudget` per account enforces both, every GraphQL call passes through
it, its daily count survives restarts (in the cursor), and the status cadence is derived
from what it leaves. Errors come in `errors[]`, also with HTTP 200: `authError`, `expired`
and `client` (the manual's "invalid access token") lead to a new OAuth2 access token, or fail
authentication with a static token; an OAuth2 token is renewed before its `expires_in` runs
out; a rate-limit answer backs off.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import structlog
from pydantic import ConfigDict, Field
from yarl import URL

from cms_ingest.domain import Action, ActionResult, Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.retry import RetryPolicy
from cms_ingest.sitehttp import SiteHttp, TransportError, UnsafeUrl, read_limited
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
    VendorError,
)
from cms_ingest.vendors.common import (
    ID_LIMIT,
    as_id,
    as_int,
    clean_text,
    download_size,
    plausible_time,
    read_json,
)

VENDOR = "camstreamer"
log = structlog.get_logger("cms_ingest.vendors.camstreamer")

GRAPHQL_PATH = "/api/graphql.php"
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a path, not a secret
PORT_CGI_PATH = "/axis-cgi/io/port.cgi"
# The manual's own example, word for word: the camera nodes, their names and external ids.
NODES_QUERY = "query { nodeList(type: camera) { node_id name external_id } }"
# The manual's fields of `camera(node_id)`; one alias per camera.
CAMERA_FIELDS = "name serial_number is_connected"
MAX_CAMERAS_PER_QUERY = 100  # the manual sets no size limit; keep each query modest
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
# The manual's three refusals of a token: missing (`authError`), expired, and present but not
# valid (`client`, "Invalid access token"). All three mean: get a new token.
AUTH_CATEGORIES = frozenset({"authError", "expired", "client"})
KNOWN_CATEGORIES = AUTH_CATEGORIES | {"rateLimit", "dailyLimit", "graphql", "internal", "request"}
# Renew an OAuth2 token this share of its `expires_in` before it runs out (at most a minute
# early): a refusal would cost a query of the budget and a failed poll.
TOKEN_RENEW_SHARE = 0.2
TOKEN_RENEW_MAX_EARLY_S = 60.0
DEFAULT_HEIGHT = 720  # only when a recording lists no heights (reported)
CAMERA_STATES = ("online", "pending", "offline")
MAX_CAMERAS_KEPT = 5000  # the cursor's per-camera state stays bounded
CURSOR_NAME_LIMIT = 128
OFF_RETRY = RetryPolicy(base=0.5, factor=2.0, cap=5.0, jitter=0.3)
PROBE_MEDIA_TIMEOUT_S = 120.0
PROBE_MEDIA_POLL_S = 2.0
PROBE_CLIP_LAG_S = 120  # a recording reaches the cloud with some delay: probe an older clip
MAX_PROBE_BYTES = 20 * 1024 * 1024
_SERIAL_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")


class CamStreamerOptions(SiteOptions):
    """`options:` of a CamStreamer account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str | None = None  # OAuth2 instead of a static token: client and refresh token
    client_secret: str | None = None
    refresh_token: str | None = None
    offline_grace_s: float = Field(default=30.0, ge=0)
    clip_seconds: float = Field(default=30.0, gt=0)
    camera_list_refresh_s: float = Field(default=600.0, gt=0)
    device_url_template: str = "https://{serial}.device-connect.net"
    # Device access uses the site's API token; this only overrides it (another API token
    # with the Configuration permission, or for an OAuth2 account that has no API token).
    device_access_token: str | None = None
    # The camera ends the output itself (VAPIX `<port>:/<ms>\`): only where it supports that.
    output_pulse: bool = False
    # How long a failed "off" is retried when the action has no `not_after`.
    # Within the action worker's attempt deadline (actions.attempt_timeout_s, 60 s, plus the
    # hold), so the off's outcome reaches the action's result instead of being cut off.
    output_off_retry_s: float = Field(default=45.0, gt=0)
    # Hosts (host or host:port) recordings may be downloaded from besides the portal itself:
    # the manual's download URL is on another host than its API example.
    download_hosts: tuple[str, ...] = ()
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

    def restore(self, day: Any, used: Any) -> None:
        """Today's count from the cursor (a count that is not a sane number is ignored)."""
        count = as_int(used)
        if day == self._today() and count is not None and count >= 0:
            self.day, self.used = day, max(self.used, min(count, self._daily_limit))

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


class OutputIncomplete(DeviceRefused):
    """An `output` whose "on" or "off" did not succeed; `answer` holds both outcomes. Never
    retried: the "on" may have reached the camera (a pulse must not fire twice)."""


@dataclass(slots=True)
class _Recording:
    recording_id: str
    prepared: bool = False


@dataclass(frozen=True, slots=True)
class CameraNode:
    """A camera of the account's tree, as `nodeList(type: camera)` gives it."""

    node_id: int
    name: str
    external_id: str | None


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """One camera's answer to `camera(node_id) { name serial_number is_connected }`."""

    node: CameraNode
    serial: str
    name: str
    connected: bool


class CamStreamerClient:
    vendor = VENDOR
    # The "on" of a pulse cut short and re-run would pulse the output again: never repeated
    # on doubt. The "off" is retried inside `perform` (switching off twice is harmless).
    actions: Mapping[str, ActionSpec] = {"output": ActionSpec(idempotent=False)}

    def __init__(self, context: VendorContext, options: CamStreamerOptions) -> None:
        self.site_id = context.site_id
        self._http = context.http
        self._static_token = context.token or None  # an account is reached with a token
        self._options = options
        self._problems = context.problems
        self._oauth = bool(options.client_id)
        self._access: str | None = None if self._oauth else self._static_token
        self._renew_at: float | None = None  # monotonic: renew the OAuth2 token from then on
        self._refresh: str | None = options.refresh_token
        self._auth_lock = asyncio.Lock()
        self.budget = QueryBudget(options.rate_per_s, options.daily_limit, options.status_share)
        self._last_status_at: float | None = None
        self._last_failure: TransportError | VendorError | None = None
        self._nodes: dict[int, CameraNode] | None = None
        self._nodes_complete = True  # every entry of the last camera list was readable
        self._nodes_read_at = 0.0
        self._recordings: dict[str, _Recording] = {}
        self._devices: dict[str, SiteHttp] = {}
        self._download_hosts = {
            _host_key(URL(f"{self._http.base_url.scheme}://{host}"))
            for host in options.download_hosts
        }

    # ------------------------------------------------------------------ auth and queries

    async def _token(self) -> str:
        if self._access is not None and not self._renewal_due():
            return self._access
        async with self._auth_lock:
            if self._access is None or self._renewal_due():
                await self._oauth_refresh()
            assert self._access is not None
            return self._access

    def _renewal_due(self) -> bool:
        return self._renew_at is not None and time.monotonic() >= self._renew_at

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
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            error = payload.get("error") if isinstance(payload, dict) else None
            detail = clean_text(str(error or ""), 200)
            raise AuthenticationFailed(f"OAuth2 refresh refused (HTTP {status}): {detail}")
        assert isinstance(payload, dict)
        self._access = token
        self._renew_at = self._renewal_time(payload.get("expires_in"))
        rotated = payload.get("refresh_token")
        if isinstance(rotated, str) and rotated:  # rotated: the old one no longer works
            self._refresh = rotated

    def _renewal_time(self, expires_in: Any) -> float | None:
        """When to renew a token that lasts `expires_in` seconds (None: only once refused)."""
        seconds = as_int(expires_in)
        if seconds is None or seconds <= 0:
            if expires_in is not None:
                self._problems.bad_input(
                    "oauth_expires_in", f"expires_in {str(expires_in)[:40]!r} is not seconds"
                )
            return None
        early = min(TOKEN_RENEW_MAX_EARLY_S, seconds * TOKEN_RENEW_SHARE)
        return time.monotonic() + seconds - early

    async def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> Any:
        """One GraphQL call through the budget; a refused OAuth2 token is renewed once."""
        for attempt in (1, 2):
            await self.budget.acquire()
            self._problems.api_budget(self.budget.remaining)
            token = await self._token()  # after the wait for the slot: fresh when sent
            body = {"query": query, "variables": dict(variables or {})}
            async with self._http.request(
                "POST", GRAPHQL_PATH, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as response:
                payload = await read_json(response, self._problems, f"POST {GRAPHQL_PATH}")
                status = response.status
            category, message = _first_error(payload)
            if category is None and status in (401, 403):
                # Not the manual's form (it answers 200 with `errors`), but plainly a refusal.
                category, message = "authError", f"HTTP {status}"
            if category in AUTH_CATEGORIES:
                if attempt == 1 and self._oauth:
                    if self._access == token:
                        self._access = None  # the next attempt renews it
                    continue
                raise AuthenticationFailed(_refusal_text(category, message, self._oauth))
            return self._answer_data(payload, status, category, message)
        raise AssertionError("unreachable")

    def _answer_data(self, payload: Any, status: int, category: str | None, message: str) -> Any:
        if category in ("rateLimit", "dailyLimit") or status == 429:
            self.budget.back_off(RATE_LIMIT_BACKOFF_S)
            raise BadDeviceResponse(f"rate limited by the account ({message or status})")
        data = payload.get("data") if isinstance(payload, dict) else None
        if category is not None:
            what = f"graphql_{category}" if category in KNOWN_CATEGORIES else "graphql_other"
            self._problems.bad_input(what, f"{category}: {message}")
            if not isinstance(data, dict):
                raise BadDeviceResponse(f"GraphQL error ({category}): {message}")
            return data  # partial: what did answer is used, the failed fields are null
        if status != 200 or not isinstance(data, dict):
            raise BadDeviceResponse(f"GraphQL answered {status} without data")
        return data

    # ------------------------------------------------------------------ supervision

    async def poll(self, cursor: Cursor | None) -> PollResult:
        state = dict(cursor or {})
        budget = _mapping(state.get("budget"))
        self.budget.restore(budget.get("day"), budget.get("used"))
        now = time.monotonic()
        # Each status query gets the cadence the budget allows; a big account needs several.
        interval = self.budget.status_interval(floor=0.0) * self._queries_per_status()
        if self._last_status_at is not None and now - self._last_status_at < interval:
            if self._last_failure is not None:
                # Not yet time to ask again, and the last answer was a failure: this poll
                # fails too (a quiet "nothing new" would hide the outage from supervision).
                raise self._last_failure.with_traceback(None)
            return PollResult(alarms=[], cursor=state)  # the budget says: not yet
        self._last_status_at = now
        try:
            statuses = await self._camera_statuses()
        except (TransportError, VendorError) as exc:
            self._last_failure = exc
            raise
        self._last_failure = None
        alarms, cameras = self._track_all(statuses, state)
        self._problems.api_budget(self.budget.remaining)
        return PollResult(
            alarms=alarms,
            cursor={"cameras": cameras, "budget": self._budget_state()},
        )

    def _queries_per_status(self) -> int:
        return max(1, math.ceil(len(self._nodes or {}) / MAX_CAMERAS_PER_QUERY))

    def _budget_state(self) -> dict[str, Any]:
        return {"day": self.budget.day, "used": self.budget.used}

    async def _camera_statuses(self) -> list[CameraStatus]:
        """Every camera's state now: the node list when due, then the aliased status query."""
        due = time.monotonic() - self._nodes_read_at >= self._options.camera_list_refresh_s
        if self._nodes is None or due:
            self._nodes = await self._camera_nodes()
            # A list with unreadable entries is read again at the next poll.
            self._nodes_read_at = time.monotonic() if self._nodes_complete else -math.inf
        nodes = list(self._nodes.values())
        statuses: list[CameraStatus] = []
        for first in range(0, len(nodes), MAX_CAMERAS_PER_QUERY):
            chunk = nodes[first : first + MAX_CAMERAS_PER_QUERY]
            data = await self.graphql(_status_query(chunk))
            statuses.extend(self._read_statuses(chunk, data))
        return statuses

    async def _camera_nodes(self) -> dict[int, CameraNode]:
        data = await self.graphql(NODES_QUERY)
        listed = data.get("nodeList")
        if not isinstance(listed, list):
            raise BadDeviceResponse("nodeList missing from the answer")
        nodes: dict[int, CameraNode] = {}
        self._nodes_complete = True
        for item in listed:
            node = _camera_node(item)
            if node is None:
                self._problems.bad_input("camera_node", f"camera node unreadable: {item!r:.200}")
                self._nodes_complete = False  # who is missing is unknown: forget nobody
                continue
            if len(nodes) >= MAX_CAMERAS_KEPT:
                self._problems.bad_input("too_many_cameras", f"over {MAX_CAMERAS_KEPT} cameras")
                break
            nodes[node.node_id] = node
        return nodes

    def _read_statuses(
        self, chunk: list[CameraNode], data: Mapping[str, Any]
    ) -> list[CameraStatus]:
        statuses: list[CameraStatus] = []
        for node in chunk:
            answer = data.get(f"c{node.node_id}")
            if answer is None:
                # Removed from the account since the node list was read: read it again.
                self._nodes_read_at = -math.inf
                continue
            status = _camera_status(node, answer)
            if status is None:
                self._problems.bad_input(
                    "camera",
                    f"camera {node.node_id} without a serial or a connection state: "
                    f"{answer!r:.200}",
                )
                continue
            statuses.append(status)
        return statuses

    def _track_all(
        self, statuses: list[CameraStatus], state: Mapping[str, Any]
    ) -> tuple[list[Alarm], dict[str, dict[str, Any]]]:
        """The alarms these statuses raise and every camera's record for the cursor."""
        first_start = not isinstance(state.get("cameras"), dict)  # never read successfully
        known = _mapping(state.get("cameras"))
        now = time.time()
        alarms: list[Alarm] = []
        records: dict[str, dict[str, Any]] = {}
        for status in statuses:
            if status.serial in records:
                self._problems.bad_input(
                    "duplicate_serial", f"serial {status.serial} on two camera nodes"
                )
                continue
            previous = _mapping(known.get(status.serial)) or None
            record, alarm = self._track(status, previous, first_start, now)
            records[status.serial] = record
            if alarm is not None:
                alarms.append(alarm)
        # A camera still in the account whose answer was unreadable this time keeps what we
        # knew of it (a bad answer must not make it look new, or forget a raised alarm). Only
        # a camera missing from a fully readable camera list is forgotten (it was removed).
        listed = set(self._nodes or {})
        for serial, record in known.items():
            in_account = not self._nodes_complete or (
                isinstance(record, dict) and record.get("node_id") in listed
            )
            kept = isinstance(record, dict) and in_account
            if kept and serial not in records and len(records) < MAX_CAMERAS_KEPT:
                records[serial] = record
        return alarms, records

    def _track(
        self,
        camera: CameraStatus,
        previous: Mapping[str, Any] | None,
        first_start: bool,
        now: float,
    ) -> tuple[dict[str, Any], Alarm | None]:
        """The camera's new state record and the alarm its change raises, if any."""
        base: dict[str, Any] = {
            "node_id": camera.node.node_id,
            "name": clean_text(camera.name, CURSOR_NAME_LIMIT),
        }
        state = previous.get("state") if previous else None
        if state not in CAMERA_STATES:
            state = None  # a state we never wrote: known as little as a new camera
        seen = _our_time(previous.get("seen")) if previous else None
        since = _our_time(previous.get("since")) if previous else None
        if camera.connected:
            record = {**base, "state": "online", "seen": now}
            if state == "offline" and previous and previous.get("alarmed") is True:
                return record, self._alarm(camera, EventType.CAMERA_ONLINE, now, None)
            return record, None  # online, or a blip shorter than the grace
        if seen is not None:
            base["seen"] = seen
        if state is None:
            # First sight offline: already down before we looked. Not an alarm on a first
            # start; a camera new to a running account is treated like a fresh disconnect.
            if first_start:
                return {**base, "state": "offline", "alarmed": False}, None
            state = "online"
        if state == "online":
            return {**base, "state": "pending", "since": now}, None
        if state == "pending":
            since = since if since is not None else now
            if now - since >= self._options.offline_grace_s:
                alarm = self._alarm(camera, EventType.CAMERA_OFFLINE, since, seen)
                return {**base, "state": "offline", "since": since, "alarmed": True}, alarm
            return {**base, "state": "pending", "since": since}, None
        alarmed = bool(previous and previous.get("alarmed") is True)
        return {**base, "state": "offline", "since": since, "alarmed": alarmed}, None

    def _alarm(
        self, camera: CameraStatus, event: EventType, noticed: float, seen: float | None
    ) -> Alarm:
        """`camera_offline` happens after the last time the camera was seen connected: that
        time is `occurred_at` and the end of its clip; without one, the time we noticed."""
        offline = event is EventType.CAMERA_OFFLINE
        kind = "offline" if offline else "online"
        when = seen if offline and seen is not None else noticed
        media: tuple[MediaRequest, ...] = ()
        raw: dict[str, Any] = {
            "serial_number": camera.serial,
            "external_id": camera.node.external_id,
            "node_id": camera.node.node_id,
            "is_connected": not offline,
        }
        if offline:
            raw["occurred_at_is"] = "last_seen_connected" if seen is not None else "noticed"
            raw["noticed_at"] = datetime.fromtimestamp(noticed, UTC).isoformat()
            locator = {
                "node_id": camera.node.node_id,
                "from": int(when - self._options.clip_seconds),
                "to": int(when),
            }
            media = (MediaRequest(MediaKind.VIDEO, locator),)
        return Alarm(
            site_id=self.site_id,
            vendor=VENDOR,
            source_id=f"{camera.serial}:{kind}:{int(when)}",
            event_type=event,
            vendor_event=f"is_connected:{str(not offline).lower()}",
            description=f"camera {camera.name} is {kind}",
            occurred_at=datetime.fromtimestamp(when, UTC),
            camera_id=camera.serial,
            camera_name=camera.name,
            raw=raw,
            media=media,
        )

    # ------------------------------------------------------------------ media

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        node, start, end = locator.get("node_id"), locator.get("from"), locator.get("to")
        if kind is not MediaKind.VIDEO or not all(_is_int(v) for v in (node, start, end)):
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
        info = data.get("recording")
        if not isinstance(info, dict):
            del self._recordings[key]  # expired on the portal (an hour unused): start over
            return MediaProbe("pending", detail="recording id expired; preparing again")
        progress = self._progress(info.get("progress"))
        url = info.get("download_url")
        if progress < 100 or not isinstance(url, str) or not url:
            return MediaProbe("pending", detail=f"recording at {progress}%")
        self._recordings.pop(key, None)
        if not self._downloadable(url):
            self._problems.bad_input(
                "download_host",
                f"download URL on {_origin_text(url)}: neither the portal nor one of "
                "options.download_hosts",
            )
            return MediaProbe(
                "unavailable", detail=f"download host {_origin_text(url)} is not allowed"
            )
        return MediaProbe("ready", path=url)

    def _progress(self, value: Any) -> int:
        """0..100 from the portal's `progress` (anything else is reported and read as 0)."""
        progress = as_int(value) if value is not None else 0
        if progress is None:
            self._problems.bad_input("recording_progress", f"progress {str(value)[:40]!r}")
            return 0
        return max(0, min(100, progress))

    async def _find_recording(self, node: int, start: int, end: int) -> _Recording | None:
        data = await self.graphql(RECORDINGS_QUERY, {"node": node, "from": start, "to": end})
        camera = data.get("camera")
        if camera is None:
            return None  # no longer on the account: nothing to fetch
        recordings = camera.get("recordings") if isinstance(camera, dict) else camera
        if recordings is None or recordings == []:
            return None
        first = recordings[0] if isinstance(recordings, list) else None
        recording_id = first.get("recording_id") if isinstance(first, dict) else None
        if (
            not isinstance(first, dict)
            or not isinstance(recording_id, str)
            or not recording_id.strip()
        ):
            self._problems.bad_input("recordings", f"recordings unreadable: {recordings!r:.200}")
            raise BadDeviceResponse(f"camera {node}: recordings answer without a recording_id")
        recording = _Recording(clean_text(recording_id, ID_LIMIT))
        height = self._highest_height(first)
        prepared = await self.graphql(
            PREPARE_MUTATION, {"id": recording.recording_id, "height": height}
        )
        recording.prepared = prepared.get("recordingPrepare") is True
        if not recording.prepared:
            raise BadDeviceResponse(f"recordingPrepare refused for {recording.recording_id}")
        return recording

    def _highest_height(self, recording: Mapping[str, Any]) -> int:
        outputs = recording.get("outputs")
        heights = [
            as_id(item.get("height"))
            for item in (outputs if isinstance(outputs, list) else [])
            if isinstance(item, dict)
        ]
        usable = [height for height in heights if height]
        if not usable:
            self._problems.bad_input(
                "recording_outputs", f"no heights in {str(outputs)[:200]}; asking {DEFAULT_HEIGHT}"
            )
            return DEFAULT_HEIGHT
        return max(usable)

    def _downloadable(self, url: str) -> bool:
        """A download URL on the portal itself or on a host named in options.download_hosts
        (never a host only the answer names), with the portal's scheme."""
        try:
            parsed = URL(url)
        except ValueError:
            return False
        if not parsed.is_absolute():
            return url.startswith("/")
        if parsed.scheme != self._http.base_url.scheme or parsed.user or parsed.password:
            return False
        return parsed.origin() == self._http.base_url.origin() or (
            _host_key(parsed) in self._download_hosts
        )

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        http, target = self._download_http(path)
        async with http.request("GET", target, timeout_s=600.0, read_timeout_s=60.0) as response:
            if response.status != 200:
                raise BadDeviceResponse(f"recording download answered {response.status}")
            yield Download(
                response.content_type,
                response.content_length,
                response.content.iter_chunked(256 * 1024),
            )

    def _download_http(self, path: str) -> tuple[SiteHttp, str]:
        if not self._downloadable(path):
            raise UnsafeUrl(f"refusing download URL on {_origin_text(path)}", sent=False)
        parsed = URL(path)
        if not parsed.is_absolute() or parsed.origin() == self._http.base_url.origin():
            return self._http, path
        host = f"{parsed.host}:{parsed.port}" if parsed.explicit_port else str(parsed.host)
        return self._http.for_host(host), parsed.raw_path_qs

    # ------------------------------------------------------------------ actions

    async def perform(self, action: Action) -> ActionResult:
        serial, port, duration = _output_params(action)
        token = self._device_token()
        deadline = self._off_deadline(action, duration)
        result: dict[str, Any] = {"serial": serial, "port": port, "held_s": duration}
        on_action = f"{port}:/"
        if self._options.output_pulse:  # the camera switches it off itself after the hold
            on_action = f"{port}:/{max(1, round(duration * 1000))}\\"
            result["pulse"] = True
        never_sent: TransportError | None = None
        try:
            await self._port(serial, on_action, token)
            result["on"] = "ok"
            await asyncio.sleep(float(duration))
        except (TransportError, VendorError) as exc:
            result["on"] = f"failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, TransportError) and not exc.sent:
                never_sent = exc  # the camera never heard it: one "off" is enough
                deadline = time.monotonic()
        finally:
            # Off in every case (also when cancelled): a timeout or a 5xx on the "on" may
            # still have switched the output on.
            off = asyncio.ensure_future(self._switch_off(serial, port, token, deadline))
            result.update(await asyncio.shield(off))
        if never_sent is not None:
            raise never_sent  # surely not fired: the action worker may try again
        if result["on"] != "ok" or result["off"] != "ok":
            raise OutputIncomplete(_output_failure(result), answer=result)
        return ActionResult(result=result)

    async def _switch_off(
        self, serial: str, port: int, token: str, deadline: float
    ) -> dict[str, Any]:
        """Send "off" until it succeeds, the camera refuses it (4xx), or `deadline`."""
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._port(serial, f"{port}:\\", token)
                return {"off": "ok", "off_attempts": attempts}
            except DeviceRefused as exc:
                return {"off": f"refused: {exc}", "off_attempts": attempts}
            except (TransportError, VendorError) as exc:
                wait = OFF_RETRY.delay(attempts)
                if time.monotonic() + wait > deadline:
                    return {
                        "off": f"failed: {type(exc).__name__}: {exc}",
                        "off_attempts": attempts,
                    }
                log.warning("output_off_retry", serial=serial, port=port, error=str(exc))
                await asyncio.sleep(wait)

    def _off_deadline(self, action: Action, duration: float) -> float:
        """Monotonic time until which a failed "off" is retried: the action's `not_after`,
        else `output_off_retry_s` after the hold."""
        if action.not_after is not None:
            left = (action.not_after - datetime.now(UTC)).total_seconds()
            return time.monotonic() + max(left, duration)
        return time.monotonic() + duration + self._options.output_off_retry_s

    def _device_token(self) -> str:
        """The manual: an API token with the Configuration permission is the device access
        token. The site's API token, unless options.device_access_token overrides it."""
        token = self._options.device_access_token or self._static_token
        if not token:
            raise InvalidAction(
                "no API token for device access: this account signs in with OAuth2, so set "
                "options.device_access_token (an API token with the Configuration permission)"
            )
        return token

    async def _port(self, serial: str, query: str, token: str, *, key: str = "action") -> str:
        http = self._device(serial)
        # The device access token must be the LAST query parameter.
        params = f"{key}={quote(query, safe=':')}&DEVICE_ACCESS_TOKEN={quote(token, safe='')}"
        await self.budget.acquire(daily=False)  # same account: same 1 query/s
        async with http.request("GET", f"{PORT_CGI_PATH}?{params}") as response:
            text = (await read_limited(response, 65536)).decode("utf-8", "replace")[:200]
            status = response.status
        text = clean_text(text, 200)
        if 400 <= status < 500:
            hint = " (is the token's Configuration permission on?)" if status == 401 else ""
            raise DeviceRefused(f"VAPIX {key}={query} on {serial} refused ({status}){hint}: {text}")
        if status != 200:
            raise BadDeviceResponse(f"VAPIX {key}={query} on {serial} answered {status}")
        return text

    def _device(self, serial: str) -> SiteHttp:
        if serial not in self._devices:
            self._devices[serial] = self._http.for_url(
                self._options.device_url_template.format(serial=serial)
            )
        return self._devices[serial]

    # ------------------------------------------------------------------ commissioning

    async def describe(self) -> dict[str, Any]:
        statuses = await self._camera_statuses()
        return {
            "cameras (serial: name, connected)": {
                status.serial: f"{status.name}, {'connected' if status.connected else 'OFFLINE'}"
                for status in statuses
            },
            "daily budget left": self.budget.remaining,
        }

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        return {
            "device access (VAPIX through the cloud)": self._probe_device_access,
            # This cloud offers recordings (video), not snapshots: its own media step.
            "one snapshot": self._probe_media,
        }

    async def _probe_device_access(self) -> str:
        camera = await self._connected_camera()
        token = self._device_token()
        which = (
            "options.device_access_token"
            if self._options.device_access_token
            else ("the site's API token")
        )
        answer = await self._port(camera.serial, "1", token, key="checkactive")
        return f"camera {camera.serial} ({camera.name}) answered {answer!r} with {which}"

    async def _probe_media(self) -> str:
        """The probe's media step: this cloud offers recordings (video), not snapshots. One
        clip of a connected camera is found, prepared and downloaded as an alarm's would be."""
        camera = await self._connected_camera()
        end = int(time.time()) - PROBE_CLIP_LAG_S
        locator = {
            "node_id": camera.node.node_id,
            "from": end - int(self._options.clip_seconds),
            "to": end,
        }
        started = time.monotonic()
        probe = await self.media_status(MediaKind.VIDEO, locator)
        while probe.state == "pending":
            if time.monotonic() - started > PROBE_MEDIA_TIMEOUT_S:
                raise BadDeviceResponse(f"recording not ready after {PROBE_MEDIA_TIMEOUT_S:g} s")
            await asyncio.sleep(PROBE_MEDIA_POLL_S)
            probe = await self.media_status(MediaKind.VIDEO, locator)
        if probe.state != "ready" or probe.path is None:
            raise BadDeviceResponse(
                f"camera {camera.serial}: {probe.detail} (alarms would get no video)"
            )
        size, content_type = await download_size(self, probe.path, MAX_PROBE_BYTES)
        return (
            f"camera {camera.serial}: video of {int(self._options.clip_seconds)} s, "
            f"{size} bytes ({content_type})"
        )

    async def _connected_camera(self) -> CameraStatus:
        for status in await self._camera_statuses():
            if status.connected and _SERIAL_RE.fullmatch(status.serial):
                return status
        raise BadDeviceResponse("no connected camera on the account to check")

    async def close(self) -> None:
        """Nothing to release: the HTTP session belongs to the process."""


# ---------------------------------------------------------------------- helpers


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _our_time(value: Any) -> float | None:
    """A unix time we stored in the cursor, if it still is a plausible one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        when = datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return float(value) if plausible_time(when) else None


def _status_query(nodes: list[CameraNode]) -> str:
    """One query for many cameras: a GraphQL alias per camera (`c140094: camera(...)`)."""
    fields = " ".join(
        f"c{node.node_id}: camera(node_id: {node.node_id}) {{ {CAMERA_FIELDS} }}" for node in nodes
    )
    return f"query {{ {fields} }}"


def _camera_node(item: Any) -> CameraNode | None:
    if not isinstance(item, dict):
        return None
    node_id = as_id(item.get("node_id"))
    if node_id is None:
        return None
    name = item.get("name")
    external = item.get("external_id")
    return CameraNode(
        node_id=node_id,
        name=clean_text(name, 512) if isinstance(name, str) else "",
        external_id=clean_text(external, ID_LIMIT) if isinstance(external, str) else None,
    )


def _camera_status(node: CameraNode, answer: Any) -> CameraStatus | None:
    if not isinstance(answer, dict):
        return None
    serial = answer.get("serial_number")
    connected = answer.get("is_connected")
    if not isinstance(serial, str) or not serial.strip() or not isinstance(connected, bool):
        return None
    serial = clean_text(serial.strip(), ID_LIMIT)
    name = answer.get("name")
    shown = clean_text(name, 512) if isinstance(name, str) and name.strip() else node.name
    return CameraStatus(node=node, serial=serial, name=shown or serial, connected=connected)


def _first_error(payload: Any) -> tuple[str | None, str]:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        category = errors[0].get("category")
        message = errors[0].get("message")
        return (
            clean_text(str(category or "unknown"), 64),
            clean_text(str(message or ""), 500),
        )
    return None, ""


def _refusal_text(category: str | None, message: str, oauth: bool) -> str:
    if oauth:
        return f"access refused after renewing the OAuth2 token ({category}: {message})"
    return f"the API token is refused ({category}: {message}); check or replace it"


def _host_key(url: URL) -> str:
    return f"{(url.host or '').lower()}:{url.port}"


def _origin_text(url: str) -> str:
    try:
        return str(URL(url).origin())[:200]
    except ValueError:
        return repr(url[:100])


def _output_params(action: Action) -> tuple[str, int, float]:
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
    return serial, port, float(duration)


def _output_failure(result: Mapping[str, Any]) -> str:
    where = f"output {result['port']} on {result['serial']}"
    if result.get("off") != "ok":
        return f"{where} may still be ON: off {result.get('off')}; on {result.get('on')}"
    return f"{where}: on {result.get('on')}; switched off (attempt {result.get('off_attempts')})"


def check_site(url: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    parsed = CamStreamerOptions.model_validate(options)
    problems: list[tuple[str, str]] = []
    if "{serial}" not in parsed.device_url_template:
        problems.append(("device_url_template", "must contain {serial}"))
    if parsed.client_id and not parsed.refresh_token:
        problems.append(("refresh_token", "OAuth2 needs the refresh token the portal issued"))
    for host in parsed.download_hosts:
        if not _HOST_RE.fullmatch(host):
            problems.append(("download_hosts", f"{host!r} is not a host or host:port"))
    del url
    return problems
