"""A simulated CamStreamer cloud account (GraphQL API), or many of them, over real HTTP.

The project's tests, the demo and the benchmark point the ingest daemon at this server instead
of a CamStreamer / Netrex portal. One process can host many accounts (tenants): the
``default`` tenant answers at the root and every other tenant under ``/t/<tenant>``; every
path below is relative to the tenant's base URL.

Service behaviour reproduced (from the vendor manual and the integrators' notes):

* ``POST /api/graphql.php`` with a JSON body ``{"query", "variables", "operationName"}``
  executes real GraphQL (graphql-core) against the schema in ``SCHEMA_SDL``, which holds
  only what the manual documents: ``nodeList`` (folders, cameras and their inputs,
  optionally filtered by ``type``; ``node_id parent_node_id type name external_id``),
  ``cameraList`` (``node_id name``), ``camera(node_id)`` (``name serial_number
  is_connected connection { source_ip } recordings(from, to)``), ``recording(recording_id)``
  and the ``recordingPrepare`` mutation. A query naming any other field is refused whole
  (``errors`` with category ``graphql``, no ``data``), as a validating server does.
* Every call needs ``Authorization: Bearer <token>``: the account's static API token or an
  OAuth2 access token. Missing: ``{"errors": [{"message": "Invalid or empty access token.",
  "category": "authError"}]}``; present but not valid (unknown, revoked): ``category``
  ``client``, "Request to an unknown or unavailable platform." (the manual's "Invalid access
  token"); expired: ``category`` ``expired``. All with HTTP 200: a client must read the body,
  not only the status.
* OAuth2: ``POST /oauth2/token`` (parameters in the query or the form) with ``client_id``,
  ``client_secret`` and ``grant_type`` ``refresh_token`` (+ ``refresh_token``) or
  ``authorization_code``/``auth_code`` (+ ``code``; the manual spells it both ways) answers
  ``{"access_token", "expires_in", "refresh_token"}``; without ``client_secret`` a code gives
  an access token only. ``POST /oauth2/revoke?access_token=`` cancels a token and its refresh
  token. Refusals: HTTP 400 ``{"error": "<message>"}``.
* Limits per account: ``rate_per_s`` GraphQL requests in any one-second window (the manual: 1)
  and ``daily_limit`` a day (the manual: 10,000). Beyond them: ``errors`` with category
  ``rateLimit`` or ``dailyLimit``, with HTTP ``limit_status`` (429 by default).
* Recordings: ``recordings(from, to)`` (unix seconds) gives one recording covering the range
  with a fresh ``recording_id`` and ``outputs`` heights 480, 720 and 1080; ``recordingPrepare``
  starts preparing it; ``recording { progress download_url }`` grows 0..100 over
  ``prepare_seconds``, then gives ``http://host:port[/t/<tenant>]/api/download.php?auth_key=``
  on this server, which serves an MP4 (``video/mp4``, 8 KiB) without a bearer token.
* Device access (VAPIX through the cloud): the simulated ``https://<serial>.device-connect.net``
  is ``/device/<serial>`` here (``CamStreamerSimulator.device_url_template``); only
  ``/axis-cgi/io/port.cgi?action=<port>:/`` (activate), ``<port>:\\`` (deactivate),
  ``<port>:/<ms>\\`` (VAPIX pulse: the camera deactivates after ``ms``) and
  ``checkactive=<port>`` (answers ``port<n>=active|inactive``) are served, with
  ``DEVICE_ACCESS_TOKEN`` as the LAST query parameter. The manual: that token is an API token
  with the Configuration permission, i.e. the account's API token (or ``device_token``,
  another API token of the account).

Things the manual leaves open, decided here:

* The limits are checked before the token (the account's quota is spent by any request that
  reaches its endpoint), daily limit first. Only requests the limiter lets through occupy the
  rate window and count in ``daily_used``; refused ones do not prolong the refusal. The window
  holds ``max(1, int(rate_per_s))`` requests over ``that / rate_per_s`` seconds (one per second
  by default); ``math.inf`` disables it. The day is the UTC calendar day.
* Error bodies follow the manual's shape: ``category`` beside ``message`` (not under
  ``extensions``). Syntax and validation errors have category ``graphql`` (``data`` absent),
  resolver failures ``internal``; both HTTP 200. A body that is not a JSON object with a
  ``query`` string answers HTTP 400 with category ``request``.
* ``nodeList``'s ``type`` is an enum (``camera``, ``folder``, ``user``, ``input``,
  ``dashboard``) as in the manual's ``nodeList(type:camera)``, and the string ``"camera"`` is
  accepted too. The tree: a root folder (node 138170), the cameras under it (from 140094 in
  order, ``external_id`` ``camera1``, ``camera2``, ...) and one input under each camera.
* A disconnected camera has ``connection: null`` (its ``source_ip`` is only known while
  connected) and answers device access with 503; its recordings stay available.
* ``recordings`` answers ``[]`` when ``recorded`` is false or ``to <= from``; the range is
  not checked against the clock. ``recordingPrepare`` answers false for an unknown or expired
  id (an id never prepared expires after ``RECORDING_ID_TTL_S``, as the manual says) or a
  height not among the outputs; preparing again at another height starts over. A download URL
  expires after ``DOWNLOAD_TTL_S``; before progress 100 and afterwards the key answers 404.
* A refresh gives a new refresh token and retires the old one; the old access token stays
  valid until it expires. ``expires_in`` is ``access_ttl_s`` rounded up.
* Device access: unknown serial 404, a token missing, wrong or not last 401 (text), a
  disconnected camera 503, an unreadable ``action`` 400; several ``port:state`` pairs may be
  given comma-separated. Answers ``OK`` (text). Device access and OAuth are not GraphQL: they
  are not counted in ``queries`` and not limited.

Switches for what the manual allows but does not pin down (constructor keyword / CLI flag;
the default is the manual's reading):

* ``schema`` / ``--schema``: ``manual`` (above) or ``extended``, a portal that also offers
  undocumented fields (``cameraList`` of full cameras, ``node_id`` and ``external_id`` on a
  camera), as the API Explorer of a real portal may.
* ``invalid_token_error`` / ``--invalid-token-error``: ``client`` (the manual) or
  ``authError`` for a token that is present but not valid.
* ``download_host`` / ``--download-host``: download URLs on another host than the API (the
  manual's example URL is on ``cloud.camstreamer.com``, its API example on
  ``system2.netrex.cz``); ``{port}`` is this server's port, so ``localhost:{port}`` is a
  second host name for the same server. Default: the API's own host.
* ``token_configuration`` / ``--no-token-configuration``: whether the account's API token has
  the Configuration permission that device access needs (default: it has).
* ``pulse_supported`` / ``--no-pulse``: whether the cameras take the VAPIX pulse (default:
  they do; without, a pulse answers 400).
* ``limit_status`` / ``--limit-status``: the HTTP status of a rate- or daily-limit refusal.
  The manual states the limits but not how a query over them is answered: 429 (default) or
  200, as its other errors come.

Test hooks (Python API and ``/_sim/...`` HTTP control surface): ``vapix_answer_errors``
(the next n ``port.cgi`` calls are carried out, then answered 500, as when the answer is
lost on the way), ``forget_access_tokens`` (the portal no longer knows the OAuth2 access
tokens it issued; refresh tokens stay valid), camera disconnect/connect
(``/_sim/alarms`` disconnects cameras: a disconnection is the only "alarm" this vendor has),
token expiry, ``recorded``, counters (``queries``, ``daily_used``, ``rate_limited``,
``recordings_prepared``, ``downloads``, ``vapix_calls``, ``port_state``, ``oauth_refreshes``,
``connection_changes``, ``requests``), and a generator disconnecting random cameras, each
reconnecting after 5-20 s.

Command line: ``python -m cms_ingest.simulators.camstreamer --sites 100 --rate 0.01`` prints one
account URL per line, then ``READY``, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import hmac
import json
import math
import random
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from time import monotonic, time
from typing import Any, Literal, NamedTuple, TypeAlias
from urllib.parse import parse_qsl

from aiohttp import web
from graphql import (
    EnumValueNode,
    ExecutionResult,
    GraphQLArgument,
    GraphQLBoolean,
    GraphQLEnumType,
    GraphQLError,
    GraphQLField,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLResolveInfo,
    GraphQLSchema,
    GraphQLString,
    StringValueNode,
    ValueNode,
    graphql_sync,
)
from graphql.language import ConstValueNode
from yarl import URL

from cms_ingest.simulators.base import (
    DEFAULT_TENANT,
    Route,
    TenantSimulator,
    as_bool,
    check_rate,
    control_body,
    control_routes,
    parse_cli_args,
    serve_cli,
    tenant_names,
)
from cms_ingest.simulators.davantis import video_mp4

DEFAULT_PORT = 21400
GRAPHQL_PATH = "/api/graphql.php"
DOWNLOAD_PATH = "/api/download.php"
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a path
REVOKE_PATH = "/oauth2/revoke"
DEVICE_PREFIX = "/device/{serial}"
PORT_CGI_PATH = f"{DEVICE_PREFIX}/axis-cgi/io/port.cgi"
DEVICE_TOKEN_PARAM = "DEVICE_ACCESS_TOKEN"  # noqa: S105 - a parameter name

ROOT_FOLDER_ID = 138170
ROOT_FOLDER_NAME = "rootfolder"
CAMERA_NODE_BASE = 140094
INPUT_NODE_BASE = 150000
NODE_TYPES = ("camera", "folder", "user", "input", "dashboard")
RECORDING_HEIGHTS = (480, 720, 1080)
RECORDING_ID_TTL_S = 3600.0  # the manual: an unused recording id expires in one hour
DOWNLOAD_TTL_S = 86400.0  # the manual: a download URL expires in 24 hours
RECORDING_ID_LENGTH = 10
AUTH_KEY_LENGTH = 32
DOWNLOAD_BYTES = 8192
MAX_KEPT_RECORDINGS = 1000  # beyond this, expired recordings are forgotten
MAX_KEPT_TOKENS = 10_000  # beyond this, tokens expired for a day are forgotten
GENERATED_OFFLINE_S = (5.0, 20.0)
DEFAULT_CAMERA_NAMES = ("Gate", "Yard", "Dock")
FIRST_SERIAL = 0xACCC8EE8A9CA

ApiError = tuple[str, str]  # (message, category)
ERR_AUTH: ApiError = ("Invalid or empty access token.", "authError")
ERR_EXPIRED: ApiError = ("Access token expired.", "expired")
LIMIT_STATUSES = (429, 200)  # a limit refusal's HTTP status: the manual does not say
ERR_RATE: ApiError = ("API rate limit exceeded", "rateLimit")
ERR_DAILY: ApiError = ("Daily API limit exceeded", "dailyLimit")
# The manual's third error: a token in the header that is not valid (as opposed to a missing one).
ERR_CLIENT: ApiError = ("Request to an unknown or unavailable platform.", "client")
SCHEMAS = ("manual", "extended")
INVALID_TOKEN_CATEGORIES = ("client", "authError")

TokenStatus = Literal["valid", "expired", "unknown"]
_ALPHANUMERIC = string.ascii_letters + string.digits
_PORT_ACTION = re.compile(r"^(\d+):([/\\])$")
_PULSE_ACTION = re.compile(r"^(\d+):/(\d{1,7})\\$")  # VAPIX: active, wait <ms>, inactive


class Answer(Exception):
    """Raised by a handler (or the gate) to answer ``response`` instead."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _errors(error: ApiError, status: int = 200) -> web.Response:
    message, category = error
    return web.json_response(
        {"errors": [{"message": message, "category": category}]}, status=status
    )


def _text(status: int, text: str) -> Answer:
    return Answer(web.Response(status=status, text=text, content_type="text/plain"))


def _oauth_error(message: str) -> Answer:
    return Answer(web.json_response({"error": message}, status=400))


def _random_key(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def default_cameras(count: int = 3) -> dict[str, str]:
    """``count`` cameras, serial -> name: ``ACCC8EE8A9CA`` "Gate", ``...CB`` "Yard", ..."""
    return {
        f"{FIRST_SERIAL + index:012X}": (
            DEFAULT_CAMERA_NAMES[index]
            if index < len(DEFAULT_CAMERA_NAMES)
            else f"Camera {index + 1}"
        )
        for index in range(count)
    }


# ------------------------------------------------------------------ state
@dataclass(slots=True)
class CsCamera:
    """One camera of the account (attribute names are the GraphQL field names)."""

    node_id: int
    name: str
    serial_number: str
    external_id: str | None
    source_ip: str
    input_node_id: int
    is_connected: bool = True


@dataclass(slots=True)
class CsRecording:
    """One recording id handed out by ``recordings(from, to)``."""

    recording_id: str
    serial: str
    start: int
    end: int
    number: int  # 1, 2, ... per account (names the MP4)
    created: float  # monotonic
    height: int | None = None
    prepared: float | None = None  # monotonic start of the preparation
    auth_key: str | None = None
    downloads: int = 0


@dataclass(slots=True)
class _AccessToken:
    expires: float  # monotonic
    refresh: str | None


class Disconnection(NamedTuple):
    """What ``add_alarms`` answers: a camera that went offline (``id`` numbers them)."""

    id: int
    serial: str


class CamStreamerAccount:
    """The state and behaviour of one simulated CamStreamer cloud account."""

    def __init__(
        self,
        *,
        token: str = "api-token",  # noqa: S107 - the simulated account's test token
        client_id: str = "cms-client",
        client_secret: str = "cms-secret",  # noqa: S107
        refresh_token: str = "refresh-1",  # noqa: S107
        access_ttl_s: float = 3600.0,
        cameras: dict[str, str] | None = None,
        rate_per_s: float = 1.0,
        daily_limit: int = 10000,
        prepare_seconds: float = 2.0,
        recorded: bool = True,
        device_token: str = "device-token",  # noqa: S107
        schema: str = "manual",
        invalid_token_error: str = "client",  # noqa: S107 - an error category
        download_host: str | None = None,
        token_configuration: bool = True,
        pulse_supported: bool = True,
        limit_status: int = 429,
    ) -> None:
        check_rate(rate_per_s)
        if schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {SCHEMAS}, not {schema!r}")
        if invalid_token_error not in INVALID_TOKEN_CATEGORIES:
            raise ValueError(f"invalid_token_error must be one of {INVALID_TOKEN_CATEGORIES}")
        self.schema = schema
        self.invalid_token_error = invalid_token_error
        self.download_host = download_host
        self.token_configuration = token_configuration
        self.pulse_supported = pulse_supported
        if limit_status not in LIMIT_STATUSES:
            raise ValueError(f"limit_status must be one of {LIMIT_STATUSES}, not {limit_status}")
        self.limit_status = limit_status
        self.vapix_answer_errors = 0  # fault: the next n port.cgi calls act, then answer 500
        self.token = token
        self.client_id, self.client_secret = client_id, client_secret
        self.device_token = device_token
        self.access_ttl_s = access_ttl_s
        self.rate_per_s = rate_per_s
        self.daily_limit = daily_limit
        self.prepare_seconds = prepare_seconds
        self.recorded = recorded
        chosen = default_cameras() if cameras is None else cameras
        self.cameras: dict[str, CsCamera] = {
            serial: CsCamera(
                node_id=CAMERA_NODE_BASE + index,
                name=name,
                serial_number=serial,
                external_id=f"camera{index + 1}",
                source_ip=f"203.0.113.{10 + index % 240}",
                input_node_id=INPUT_NODE_BASE + index,
            )
            for index, (serial, name) in enumerate(chosen.items())
        }
        self.requests: collections.Counter[str] = collections.Counter()
        self.queries: list[float] = []
        self.daily_used = 0
        self.daily_refused = 0
        self.rate_limited = 0
        self.recordings: dict[str, CsRecording] = {}
        self.recordings_prepared: list[tuple[str, int]] = []
        self.downloads = 0
        self.vapix_calls: list[tuple[str, str, float]] = []
        self.port_state: dict[tuple[str, int], bool] = {}
        self.oauth_refreshes = 0
        self.auth_refusals: collections.Counter[str] = collections.Counter()  # by category
        self.oauth_codes = 0
        self.connection_changes: list[tuple[str, bool, float]] = []  # serial, connected, unix
        self._static: Literal["valid", "expired", "revoked"] = "valid"
        self._access: dict[str, _AccessToken] = {}
        self._refresh_tokens: dict[str, str | None] = {refresh_token: None}
        self._refresh_count = 1
        self._admitted: collections.deque[float] = collections.deque()
        self._day: date = datetime.now(UTC).date()
        self._recording_count = 0
        self._disconnection_count = 0
        self._timers: set[asyncio.TimerHandle] = set()

    # ---------------------------------------------------------------- cameras
    def camera(self, serial: str) -> CsCamera:
        camera = self.cameras.get(serial)
        if camera is None:
            raise KeyError(f"unknown camera {serial!r}")
        return camera

    def camera_by_node(self, node_id: int) -> CsCamera | None:
        return next((cam for cam in self.cameras.values() if cam.node_id == node_id), None)

    def disconnect(self, serial: str) -> None:
        """``is_connected`` turns false (nothing if already offline)."""
        self._set_connected(self.camera(serial), False)

    def connect(self, serial: str) -> None:
        """``is_connected`` turns true (nothing if already online)."""
        self._set_connected(self.camera(serial), True)

    def _set_connected(self, camera: CsCamera, connected: bool) -> None:
        if camera.is_connected != connected:
            camera.is_connected = connected
            self.connection_changes.append((camera.serial_number, connected, time()))

    def connect_later(self, serial: str, delay_s: float) -> None:
        """Reconnect ``serial`` after ``delay_s`` (needs a running event loop)."""
        self.camera(serial)
        self._later(delay_s, lambda: self.connect(serial))

    def _later(self, delay_s: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay_s`` (needs a running event loop; cancelled by
        ``close``)."""
        loop = asyncio.get_running_loop()

        def run() -> None:
            self._timers.discard(handle)
            callback()

        handle = loop.call_later(delay_s, run)
        self._timers.add(handle)

    def add_alarms(self, n: int, **kw: Any) -> list[Disconnection]:
        """Disconnect ``serial=`` (the only keyword), or else ``n`` connected cameras in
        order, for the shared plumbing (fewer if fewer are connected)."""
        serial = kw.pop("serial", None)
        if kw:
            raise TypeError(f"unknown alarm fields: {sorted(kw)}")
        if serial is not None:
            chosen = [self.camera(serial)] if self.camera(serial).is_connected else []
        else:
            chosen = [cam for cam in self.cameras.values() if cam.is_connected][:n]
        made: list[Disconnection] = []
        for camera in chosen:
            self._set_connected(camera, False)
            self._disconnection_count += 1
            made.append(Disconnection(self._disconnection_count, camera.serial_number))
        return made

    def nodes(self, node_type: str | None = None) -> list[dict[str, Any]]:
        """The node tree as ``nodeList`` lists it, optionally of one type."""
        listed: list[dict[str, Any]] = [
            {
                "node_id": ROOT_FOLDER_ID,
                "parent_node_id": None,
                "type": "folder",
                "name": ROOT_FOLDER_NAME,
                "external_id": None,
            }
        ]
        for camera in self.cameras.values():
            listed.append(
                {
                    "node_id": camera.node_id,
                    "parent_node_id": ROOT_FOLDER_ID,
                    "type": "camera",
                    "name": camera.name,
                    "external_id": camera.external_id,
                }
            )
            listed.append(
                {
                    "node_id": camera.input_node_id,
                    "parent_node_id": camera.node_id,
                    "type": "input",
                    "name": f"{camera.name} input 1",
                    "external_id": None,
                }
            )
        return [node for node in listed if node_type is None or node["type"] == node_type]

    # ----------------------------------------------------------------- tokens
    def token_status(self, token: str) -> TokenStatus:
        if not token:
            return "unknown"
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return "unknown" if self._static == "revoked" else self._static
        entry = self._access.get(token)
        if entry is None or entry.expires == -math.inf:
            return "unknown"
        return "valid" if entry.expires > monotonic() else "expired"

    def expire_tokens(self) -> None:
        """Every access token issued so far, and the static token, answer ``expired``."""
        now = monotonic()
        for entry in self._access.values():
            entry.expires = min(entry.expires, now)
        if self._static == "valid":
            self._static = "expired"

    def forget_access_tokens(self) -> None:
        """The portal no longer knows the OAuth2 access tokens it issued (they answer as
        invalid tokens do); the refresh tokens stay valid."""
        for entry in self._access.values():
            entry.expires = -math.inf

    def reset_static_token(self) -> None:
        """The static API token is valid again."""
        self._static = "valid"

    def check_client(self, client_id: str, client_secret: str | None) -> bool:
        good_id = hmac.compare_digest(client_id.encode(), self.client_id.encode())
        good_secret = client_secret is None or hmac.compare_digest(
            client_secret.encode(), self.client_secret.encode()
        )
        return good_id and good_secret

    def exchange_code(self, code: str, with_refresh: bool) -> dict[str, Any] | None:
        """Tokens for an authorization code (any non-empty code is accepted)."""
        if not code:
            return None
        self.oauth_codes += 1
        return self._issue(with_refresh)

    def refresh(self, refresh_token: str) -> dict[str, Any] | None:
        """New tokens (and a new refresh token) for a current refresh token, else ``None``."""
        if refresh_token not in self._refresh_tokens:
            return None
        del self._refresh_tokens[refresh_token]
        self.oauth_refreshes += 1
        return self._issue(True)

    def revoke(self, access_token: str) -> bool:
        """Cancel an access token (and its refresh token); false if unknown."""
        if access_token and hmac.compare_digest(access_token.encode(), self.token.encode()):
            self._static = "revoked"
            return True
        entry = self._access.pop(access_token, None)
        if entry is None:
            return False
        if entry.refresh is not None:
            self._refresh_tokens.pop(entry.refresh, None)
        return True

    def _issue(self, with_refresh: bool) -> dict[str, Any]:
        now = monotonic()
        if len(self._access) > MAX_KEPT_TOKENS:
            self._access = {
                key: entry for key, entry in self._access.items() if entry.expires > now - 86400
            }
        access = f"cs-{secrets.token_urlsafe(24)}"
        refresh: str | None = None
        if with_refresh:
            while refresh is None or refresh in self._refresh_tokens:
                self._refresh_count += 1
                refresh = f"refresh-{self._refresh_count}"
            self._refresh_tokens[refresh] = access
        self._access[access] = _AccessToken(now + self.access_ttl_s, refresh)
        answer: dict[str, Any] = {
            "access_token": access,
            "expires_in": max(0, math.ceil(self.access_ttl_s)),
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    @property
    def access_tokens(self) -> int:
        """How many OAuth access tokens are still valid."""
        now = monotonic()
        return sum(1 for entry in self._access.values() if entry.expires > now)

    # ----------------------------------------------------------------- limits
    def admit(self) -> ApiError | None:
        """Count one GraphQL request; the error that refuses it, or ``None``."""
        now = monotonic()
        self.queries.append(now)
        today = datetime.now(UTC).date()
        if today != self._day:
            self._day, self.daily_used = today, 0
        if self.daily_used >= self.daily_limit:
            self.daily_refused += 1
            return ERR_DAILY
        if not math.isinf(self.rate_per_s):
            capacity = max(1, int(self.rate_per_s))
            window = capacity / self.rate_per_s
            while self._admitted and self._admitted[0] <= now - window:
                self._admitted.popleft()
            if len(self._admitted) >= capacity:
                self.rate_limited += 1
                return ERR_RATE
            self._admitted.append(now)
        self.daily_used += 1
        return None

    def max_queries_in_window(self, window_s: float = 1.0) -> int:
        """The most GraphQL requests received (refused ones too) within any ``window_s``."""
        best, first = 0, 0
        for last, moment in enumerate(self.queries):
            while moment - self.queries[first] >= window_s:
                first += 1
            best = max(best, last - first + 1)
        return best

    # ------------------------------------------------------------- recordings
    def find_recordings(self, camera: CsCamera, start: int, end: int) -> list[CsRecording]:
        """What ``recordings(from, to)`` gives: one new recording id, or none."""
        if not self.recorded or end <= start:
            return []
        self._trim_recordings()
        self._recording_count += 1
        recording = CsRecording(
            recording_id=_random_key(RECORDING_ID_LENGTH),
            serial=camera.serial_number,
            start=start,
            end=end,
            number=self._recording_count,
            created=monotonic(),
        )
        self.recordings[recording.recording_id] = recording
        return [recording]

    def recording(self, recording_id: str) -> CsRecording | None:
        """The recording, unless unknown or expired."""
        recording = self.recordings.get(recording_id)
        if recording is None or self._expired(recording, monotonic()):
            return None
        return recording

    def prepare(self, recording_id: str, height: int) -> bool:
        """Start preparing a recording at ``height``; false if that cannot be done."""
        recording = self.recording(recording_id)
        if recording is None or height not in RECORDING_HEIGHTS:
            return False
        self.recordings_prepared.append((recording_id, height))
        if recording.prepared is None or recording.height != height:
            recording.height = height
            recording.prepared = monotonic()
            recording.auth_key = _random_key(AUTH_KEY_LENGTH)
        return True

    def progress(self, recording: CsRecording) -> int:
        """0..100: 0 until prepared, then linear over ``prepare_seconds``."""
        if recording.prepared is None:
            return 0
        if self.prepare_seconds <= 0:
            return 100
        done = (monotonic() - recording.prepared) / self.prepare_seconds
        return max(0, min(100, int(100 * done)))

    def download(self, auth_key: str) -> CsRecording | None:
        """The ready recording with this download key (counted), else ``None``."""
        if not auth_key:
            return None
        for recording in self.recordings.values():
            if recording.auth_key is not None and hmac.compare_digest(
                recording.auth_key.encode(), auth_key.encode()
            ):
                if self._expired(recording, monotonic()) or self.progress(recording) < 100:
                    return None
                recording.downloads += 1
                self.downloads += 1
                return recording
        return None

    @staticmethod
    def _expired(recording: CsRecording, now: float) -> bool:
        if recording.prepared is None:
            return now - recording.created > RECORDING_ID_TTL_S
        return now - recording.prepared > DOWNLOAD_TTL_S

    def _trim_recordings(self) -> None:
        if len(self.recordings) < MAX_KEPT_RECORDINGS:
            return
        now = monotonic()
        self.recordings = {
            key: rec for key, rec in self.recordings.items() if not self._expired(rec, now)
        }

    # ---------------------------------------------------------------- device
    def device_access_allowed(self, token: str) -> bool:
        """The manual: device access takes an API token with the Configuration permission.
        That is ``device_token`` (another API token of the account) and, when
        ``token_configuration``, the account's own API token while it is valid."""
        if hmac.compare_digest(token.encode(), self.device_token.encode()):
            return True
        return (
            self.token_configuration
            and hmac.compare_digest(token.encode(), self.token.encode())
            and self._static == "valid"
        )

    def set_ports(self, serial: str, action: str) -> bool:
        """Apply a VAPIX ``port.cgi`` action (recorded); false if it cannot be read.

        ``<port>:/`` activates, ``<port>:\\`` deactivates and, when ``pulse_supported``,
        ``<port>:/<ms>\\`` activates and deactivates again after ``ms`` (on the camera's side:
        it happens even if the caller goes away)."""
        self.vapix_calls.append((serial, action, monotonic()))
        changes: list[tuple[int, bool]] = []
        pulses: list[tuple[int, float]] = []
        for part in action.split(","):
            match = _PORT_ACTION.match(part.strip())
            pulse = _PULSE_ACTION.match(part.strip()) if self.pulse_supported else None
            if match is not None:
                changes.append((int(match.group(1)), match.group(2) == "/"))
            elif pulse is not None:
                pulses.append((int(pulse.group(1)), int(pulse.group(2)) / 1000))
            else:
                return False
        for port, active in changes:
            self.port_state[(serial, port)] = active
        for port, hold_s in pulses:
            self.port_state[(serial, port)] = True
            self._later(hold_s, functools.partial(self._pulse_end, serial, port))
        return True

    def _pulse_end(self, serial: str, port: int) -> None:
        self.port_state[(serial, port)] = False

    # ------------------------------------------------------------------ misc
    def close(self) -> None:
        """Cancel the pending reconnections."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def state(self) -> dict[str, Any]:
        return {
            "cameras": [
                {
                    "serial": cam.serial_number,
                    "name": cam.name,
                    "node_id": cam.node_id,
                    "is_connected": cam.is_connected,
                }
                for cam in self.cameras.values()
            ],
            "recorded": self.recorded,
            "static_token": self._static,
            "access_tokens": self.access_tokens,
            "oauth_refreshes": self.oauth_refreshes,
            "oauth_codes": self.oauth_codes,
            "queries": len(self.queries),
            "max_queries_per_s": self.max_queries_in_window(1.0),
            "daily_used": self.daily_used,
            "daily_refused": self.daily_refused,
            "rate_limited": self.rate_limited,
            "recordings": len(self.recordings),
            "recordings_prepared": [list(item) for item in self.recordings_prepared],
            "downloads": self.downloads,
            "vapix_calls": len(self.vapix_calls),
            "port_state": {
                f"{serial}:{port}": active for (serial, port), active in self.port_state.items()
            },
            "requests": dict(self.requests),
        }


# ---------------------------------------------------------------- GraphQL
SCHEMA_SDL = """\
enum NodeType { camera folder user input dashboard }
type Query {
  nodeList(type: NodeType): [Node!]!
  cameraList: [CameraListItem!]!
  camera(node_id: Int!): Camera
  recording(recording_id: String!): Recording
}
type Mutation { recordingPrepare(recording_id: String!, height: Int!): Boolean! }
type Node { node_id: Int!, parent_node_id: Int, type: String!, name: String!, external_id: String }
type CameraListItem { node_id: Int!, name: String! }
type Camera {
  name: String!, serial_number: String!, is_connected: Boolean!, connection: Connection,
  recordings(from: Int!, to: Int!): [Recording!]!
}
type Connection { source_ip: String }
type Recording {
  recording_id: String!, duration: Int, progress: Int, download_url: String, outputs: [Output!]!
}
type Output { height: Int! }
"""
"""The schema served by default: only what the manual documents (``SCHEMA`` is built in code
from the same definition). ``cameraList`` has the manual's ``name`` and the ``node_id`` it
says the list gives; ``camera(node_id)`` has the manual's ``name serial_number is_connected
connection { source_ip } recordings``; ``external_id`` is on ``nodeList`` only."""

EXTENDED_SCHEMA_SDL = (
    SCHEMA_SDL.replace("cameraList: [CameraListItem!]!", "cameraList: [Camera!]!")
    .replace("type CameraListItem { node_id: Int!, name: String! }\n", "")
    .replace(
        "  name: String!, serial_number: String!,",
        "  node_id: Int!, name: String!, serial_number: String!, external_id: String,",
    )
)
"""``schema="extended"``: a portal that also offers fields the manual does not document
(``cameraList`` of full cameras, ``node_id`` and ``external_id`` on a camera)."""


@dataclass(slots=True)
class _Context:
    account: CamStreamerAccount
    base: str  # the tenant's base URL as the client reached it

    @property
    def download_base(self) -> str:
        """Where download URLs point: the API's own base, or the account's
        ``download_host`` (``{port}`` is this server's port) with the same scheme and path."""
        host = self.account.download_host
        if host is None:
            return self.base
        url = URL(self.base)
        return f"{url.scheme}://{host.format(port=url.port)}{url.path.rstrip('/')}"


Info: TypeAlias = "GraphQLResolveInfo[_Context]"  # generic from graphql-core 3.3 on


class _NodeTypeEnum(GraphQLEnumType):
    """An enum that also takes its values as strings (``type: "camera"``)."""

    def parse_literal(
        self,
        value_node: ValueNode,
        _variables: dict[str, Any] | None = None,
        hide_suggestions: bool = False,
    ) -> Any:
        if isinstance(value_node, StringValueNode):
            value_node = EnumValueNode(value=value_node.value)
        return super().parse_literal(value_node, _variables)

    def coerce_input_literal(
        self, value_node: ConstValueNode, hide_suggestions: bool = False
    ) -> Any:
        if isinstance(value_node, StringValueNode):
            value_node = EnumValueNode(value=value_node.value)
        return super().coerce_input_literal(value_node, hide_suggestions)


def _recording_json(context: _Context, recording: CsRecording) -> dict[str, Any]:
    account = context.account
    progress = account.progress(recording)
    url = None
    if progress >= 100 and recording.auth_key is not None:
        url = f"{context.download_base}{DOWNLOAD_PATH}?auth_key={recording.auth_key}"
    return {
        "recording_id": recording.recording_id,
        "duration": recording.end - recording.start,
        "progress": progress,
        "download_url": url,
        "outputs": [{"height": height} for height in RECORDING_HEIGHTS],
    }


def _node_list(_root: object, info: Info, node_type: str | None = None) -> Any:
    return info.context.account.nodes(node_type)


def _camera_list(_root: object, info: Info) -> Any:
    return list(info.context.account.cameras.values())


def _camera(_root: object, info: Info, node_id: int) -> Any:
    return info.context.account.camera_by_node(node_id)


def _recording(_root: object, info: Info, recording_id: str) -> Any:
    context = info.context
    recording = context.account.recording(recording_id)
    return None if recording is None else _recording_json(context, recording)


def _connection(camera: CsCamera, info: Info) -> Any:
    return {"source_ip": camera.source_ip} if camera.is_connected else None


def _camera_recordings(camera: CsCamera, info: Info, start: int, end: int) -> Any:
    context = info.context
    found = context.account.find_recordings(camera, start, end)
    return [_recording_json(context, recording) for recording in found]


def _recording_prepare(_root: object, info: Info, recording_id: str, height: int) -> bool:
    return info.context.account.prepare(recording_id, height)


def _build_schema(extended: bool = False) -> GraphQLSchema:
    def non_null(type_: Any) -> Any:
        return GraphQLNonNull(type_)

    def list_of(type_: Any) -> Any:
        return non_null(GraphQLList(non_null(type_)))

    node_type = _NodeTypeEnum("NodeType", {name: name for name in NODE_TYPES})
    node = GraphQLObjectType(
        "Node",
        {
            "node_id": GraphQLField(non_null(GraphQLInt)),
            "parent_node_id": GraphQLField(GraphQLInt),
            "type": GraphQLField(non_null(GraphQLString)),
            "name": GraphQLField(non_null(GraphQLString)),
            "external_id": GraphQLField(GraphQLString),
        },
    )
    output = GraphQLObjectType("Output", {"height": GraphQLField(non_null(GraphQLInt))})
    recording = GraphQLObjectType(
        "Recording",
        {
            "recording_id": GraphQLField(non_null(GraphQLString)),
            "duration": GraphQLField(GraphQLInt),
            "progress": GraphQLField(GraphQLInt),
            "download_url": GraphQLField(GraphQLString),
            "outputs": GraphQLField(list_of(output)),
        },
    )
    connection = GraphQLObjectType("Connection", {"source_ip": GraphQLField(GraphQLString)})
    undocumented: dict[str, GraphQLField] = {}
    if extended:
        undocumented = {
            "node_id": GraphQLField(non_null(GraphQLInt)),
            "external_id": GraphQLField(GraphQLString),
        }
    camera = GraphQLObjectType(
        "Camera",
        {
            **undocumented,
            "name": GraphQLField(non_null(GraphQLString)),
            "serial_number": GraphQLField(non_null(GraphQLString)),
            "is_connected": GraphQLField(non_null(GraphQLBoolean)),
            "connection": GraphQLField(connection, resolve=_connection),
            "recordings": GraphQLField(
                list_of(recording),
                args={
                    "from": GraphQLArgument(non_null(GraphQLInt), out_name="start"),
                    "to": GraphQLArgument(non_null(GraphQLInt), out_name="end"),
                },
                resolve=_camera_recordings,
            ),
        },
    )
    camera_list_item = GraphQLObjectType(
        "CameraListItem",
        {
            "node_id": GraphQLField(non_null(GraphQLInt)),
            "name": GraphQLField(non_null(GraphQLString)),
        },
    )
    query = GraphQLObjectType(
        "Query",
        {
            "nodeList": GraphQLField(
                list_of(node),
                args={"type": GraphQLArgument(node_type, out_name="node_type")},
                resolve=_node_list,
            ),
            "cameraList": GraphQLField(
                list_of(camera if extended else camera_list_item), resolve=_camera_list
            ),
            "camera": GraphQLField(
                camera, args={"node_id": GraphQLArgument(non_null(GraphQLInt))}, resolve=_camera
            ),
            "recording": GraphQLField(
                recording,
                args={"recording_id": GraphQLArgument(non_null(GraphQLString))},
                resolve=_recording,
            ),
        },
    )
    mutation = GraphQLObjectType(
        "Mutation",
        {
            "recordingPrepare": GraphQLField(
                non_null(GraphQLBoolean),
                args={
                    "recording_id": GraphQLArgument(non_null(GraphQLString)),
                    "height": GraphQLArgument(non_null(GraphQLInt)),
                },
                resolve=_recording_prepare,
            )
        },
    )
    return GraphQLSchema(query=query, mutation=mutation)


SCHEMA = _build_schema()
EXTENDED_SCHEMA = _build_schema(extended=True)


def _error_json(error: GraphQLError) -> dict[str, Any]:
    """One error in the vendor's shape: ``category`` beside ``message``."""
    category = (error.extensions or {}).get("category")
    if category is None:
        category = "graphql" if error.original_error is None else "internal"
    item: dict[str, Any] = {"message": error.message, "category": category}
    if error.locations:
        item["locations"] = [{"line": loc.line, "column": loc.column} for loc in error.locations]
    if error.path:
        item["path"] = list(error.path)
    return item


def _result_json(result: ExecutionResult) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if result.data is not None or not result.errors:
        body["data"] = result.data
    if result.errors:
        body["errors"] = [_error_json(error) for error in result.errors]
    return body


def execute(
    account: CamStreamerAccount,
    query: str,
    variables: Mapping[str, Any] | None = None,
    operation_name: str | None = None,
    base: str = "http://127.0.0.1",
) -> dict[str, Any]:
    """Run one GraphQL document against ``account`` (no token, no limits): the answer body."""
    result = graphql_sync(
        EXTENDED_SCHEMA if account.schema == "extended" else SCHEMA,
        query,
        context_value=_Context(account, base),
        variable_values=dict(variables) if variables is not None else None,
        operation_name=operation_name,
    )
    return _result_json(result)


# ---------------------------------------------------------------- handlers
def _request_error(message: str) -> Answer:
    return Answer(_errors((message, "request"), status=400))


def _tenant_base(request: web.Request) -> str:
    tenant = request.match_info.get("tenant")
    prefix = "" if tenant is None else f"/t/{tenant}"
    return f"{request.url.origin()}{prefix}"


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _gate(site: CamStreamerAccount, request: web.Request) -> None:
    """The account's limits, then the token: raise the refusal."""
    limited = site.admit()
    if limited is not None:
        raise Answer(_errors(limited, status=site.limit_status))
    token = _bearer(request)
    status = site.token_status(token)
    refusal: ApiError | None = None
    if not token:
        refusal = ERR_AUTH  # the manual: missing access token
    elif status == "unknown":
        # The manual: a token in the header that is not valid answers category `client`.
        refusal = ERR_CLIENT if site.invalid_token_error == "client" else ERR_AUTH  # noqa: S105
    elif status == "expired":
        refusal = ERR_EXPIRED
    if refusal is not None:
        site.auth_refusals[refusal[1]] += 1
        raise Answer(_errors(refusal))


async def _graphql(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise _request_error("The body is not valid JSON.") from None
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise _request_error("The body must be a JSON object with a query string.")
    variables = body.get("variables")
    operation = body.get("operationName")
    if variables is not None and not isinstance(variables, dict):
        raise _request_error("variables must be a JSON object.")
    if operation is not None and not isinstance(operation, str):
        raise _request_error("operationName must be a string.")
    answer = execute(site, body["query"], variables, operation, _tenant_base(request))
    return web.json_response(answer)


async def _params(request: web.Request) -> dict[str, str]:
    """The query, then (for a POST) the form on top of it."""
    params = dict(request.query.items())
    if request.method == "POST":
        form = await request.post()
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    return params


async def _token(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    secret = params.get("client_secret")
    if not site.check_client(params.get("client_id", ""), secret):
        raise _oauth_error("Invalid client credentials.")
    grant = params.get("grant_type", "")
    if grant == "refresh_token":
        if secret is None:
            raise _oauth_error("client_secret is required to refresh a token.")
        issued = site.refresh(params.get("refresh_token", ""))
        if issued is None:
            raise _oauth_error("Invalid refresh token.")
    elif grant in ("authorization_code", "auth_code"):
        issued = site.exchange_code(params.get("code", ""), with_refresh=secret is not None)
        if issued is None:
            raise _oauth_error("Invalid authorization code.")
    else:
        raise _oauth_error(f"Unsupported grant_type {grant!r}.")
    return web.json_response(issued)


async def _revoke(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    params = await _params(request)
    if not site.revoke(params.get("access_token", "")):
        raise _oauth_error("Unknown access token.")
    return web.json_response({"success": True, "message": "The access token was canceled."})


async def _download(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    recording = site.download(request.query.get("auth_key", ""))
    if recording is None:
        raise _text(404, "File not found")
    return web.Response(
        body=video_mp4(recording.number, DOWNLOAD_BYTES),
        content_type="video/mp4",
        headers={"Content-Disposition": f'attachment; filename="{recording.recording_id}.mp4"'},
    )


def _device_token(raw_query: str) -> str | None:
    """The ``DEVICE_ACCESS_TOKEN`` value if it is the last query parameter."""
    parts = [part for part in raw_query.split("&") if part]
    if not parts:
        return None
    last = parse_qsl(parts[-1], keep_blank_values=True)
    if len(last) != 1 or last[0][0] != DEVICE_TOKEN_PARAM:
        return None
    return last[0][1]


async def _port_cgi(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    serial = request.match_info["serial"]
    camera = site.cameras.get(serial)
    if camera is None:
        raise _text(404, "Unknown device")
    token = _device_token(request.rel_url.raw_query_string)
    if token is None or not site.device_access_allowed(token):
        raise _text(401, "Unauthorized")
    if not camera.is_connected:
        raise _text(503, "The device is not connected")
    if "checkactive" in request.query:
        port = request.query["checkactive"]
        if not port.isdigit():
            raise _text(400, "Error: invalid port")
        active = site.port_state.get((serial, int(port)), False)
        return web.Response(
            text=f"port{port}={'active' if active else 'inactive'}", content_type="text/plain"
        )
    action = request.query.get("action", "")
    if not site.set_ports(serial, action):
        raise _text(400, "Error: invalid action")
    if site.vapix_answer_errors > 0:  # carried out, but the answer is lost on the way
        site.vapix_answer_errors -= 1
        raise _text(500, "Internal Server Error")
    return web.Response(text="OK", content_type="text/plain")


DEVICE_ROUTES: tuple[Route[CamStreamerAccount], ...] = (
    Route("POST", GRAPHQL_PATH, _graphql),
    Route("GET", DOWNLOAD_PATH, _download, auth=False),
    Route("POST", TOKEN_PATH, _token, auth=False),
    Route("POST", REVOKE_PATH, _revoke, auth=False),
    Route("GET", PORT_CGI_PATH, _port_cgi, auth=False),
)


# ----------------------------------------------------- /_sim control surface
_ALARM_FIELDS: dict[str, Callable[[Any], Any]] = {"serial": str}
_FAULT_KEYS = frozenset(
    {
        "disconnect",
        "connect",
        "expire_tokens",
        "reset_static_token",
        "recorded",
        "vapix_answer_errors",
        "forget_access_tokens",
    }
)


async def _sim_faults(site: CamStreamerAccount, request: web.Request) -> web.StreamResponse:
    body = await control_body(request)
    unknown = set(body) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown faults: {sorted(unknown)}")
    if "disconnect" in body:
        site.disconnect(str(body["disconnect"]))
    if "connect" in body:
        site.connect(str(body["connect"]))
    if as_bool(body.get("expire_tokens", False)):
        site.expire_tokens()
    if as_bool(body.get("forget_access_tokens", False)):
        site.forget_access_tokens()
    if as_bool(body.get("reset_static_token", False)):
        site.reset_static_token()
    if "recorded" in body:
        site.recorded = as_bool(body["recorded"])
    if "vapix_answer_errors" in body:
        site.vapix_answer_errors = int(body["vapix_answer_errors"])
    return web.json_response(site.state())


CONTROL_ROUTES: tuple[Route[CamStreamerAccount], ...] = control_routes(_ALARM_FIELDS, _sim_faults)


# --------------------------------------------------------------- the server
class CamStreamerSimulator(TenantSimulator[CamStreamerAccount]):
    """An HTTP server hosting one or many simulated CamStreamer cloud accounts (tenants)."""

    control_errors = (ValueError, TypeError, KeyError)

    def __init__(self, sites: dict[str, CamStreamerAccount] | None = None) -> None:
        super().__init__(sites if sites is not None else {DEFAULT_TENANT: CamStreamerAccount()})

    def _device_routes(self) -> Iterable[Route[CamStreamerAccount]]:
        return DEVICE_ROUTES

    def _control_routes(self) -> Iterable[Route[CamStreamerAccount]]:
        return CONTROL_ROUTES

    async def _answer(
        self, site: CamStreamerAccount, route: Route[CamStreamerAccount], request: web.Request
    ) -> web.StreamResponse:
        try:
            if route.auth:
                _gate(site, request)
            return await route.handler(site, request)
        except Answer as answer:
            return answer.response

    def device_url_template(self, tenant: str = DEFAULT_TENANT) -> str:
        """The tenant's stand-in for ``https://{serial}.device-connect.net``."""
        return self.url(tenant) + DEVICE_PREFIX

    async def stop(self) -> None:
        await super().stop()
        for site in self.sites.values():
            site.close()

    def start_generator(
        self,
        rate_per_site: float,
        *,
        seed: int | None = None,
        offline_s: tuple[float, float] = GENERATED_OFFLINE_S,
    ) -> None:
        """Disconnect a random connected camera of every account, as independent Poisson
        processes at ``rate_per_site`` disconnections per second (one task for all); each
        reconnects after a time drawn from ``offline_s``."""
        low, high = offline_s
        if not 0 <= low <= high:
            raise ValueError("offline_s must be (low, high) with 0 <= low <= high")
        self._start_generator(
            rate_per_site, seed, lambda site, rng: _generated_disconnection(site, rng, low, high)
        )


def _generated_disconnection(
    site: CamStreamerAccount, rng: random.Random, low: float, high: float
) -> None:
    connected = [serial for serial, cam in site.cameras.items() if cam.is_connected]
    if not connected:
        return
    serial = rng.choice(connected)
    site.disconnect(serial)
    site.connect_later(serial, rng.uniform(low, high))


# ------------------------------------------------------------ command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default="api-token")
    parser.add_argument("--client-id", default="cms-client")
    parser.add_argument("--client-secret", default="cms-secret")
    parser.add_argument("--device-token", default="device-token")
    parser.add_argument("--cameras", type=int, default=3, help="cameras per account")
    parser.add_argument("--api-rate", type=float, default=1.0, help="GraphQL queries/s allowed")
    parser.add_argument("--daily-limit", type=int, default=10000)
    parser.add_argument("--access-ttl", type=float, default=3600.0)
    parser.add_argument("--prepare-seconds", type=float, default=2.0)
    parser.add_argument(
        "--schema",
        choices=SCHEMAS,
        default="manual",
        help="manual: only the fields the manual documents; extended: cameraList of full "
        "cameras, node_id and external_id on a camera",
    )
    parser.add_argument(
        "--invalid-token-error",
        choices=INVALID_TOKEN_CATEGORIES,
        default="client",
        help="category answering a token that is present but not valid (the manual: client)",
    )
    parser.add_argument(
        "--download-host",
        default=None,
        help="host[:port] of download URLs instead of the API's ({port}: this server's port)",
    )
    parser.add_argument(
        "--no-token-configuration",
        dest="token_configuration",
        action="store_false",
        help="the account's API token lacks the Configuration permission (no device access)",
    )
    parser.add_argument(
        "--no-pulse",
        dest="pulse_supported",
        action="store_false",
        help="the cameras refuse the VAPIX pulse <port>:/<ms>\\",
    )
    parser.add_argument(
        "--limit-status",
        type=int,
        choices=LIMIT_STATUSES,
        default=429,
        help="HTTP status of a rate- or daily-limit refusal (the manual does not say)",
    )


async def serve(args: argparse.Namespace) -> None:
    sites = {
        name: CamStreamerAccount(
            token=args.token,
            client_id=args.client_id,
            client_secret=args.client_secret,
            device_token=args.device_token,
            cameras=default_cameras(args.cameras),
            rate_per_s=args.api_rate,
            daily_limit=args.daily_limit,
            access_ttl_s=args.access_ttl,
            prepare_seconds=args.prepare_seconds,
            schema=args.schema,
            invalid_token_error=args.invalid_token_error,
            download_host=args.download_host,
            token_configuration=args.token_configuration,
            pulse_supported=args.pulse_supported,
            limit_status=args.limit_status,
        )
        for name in tenant_names(args.sites)
    }
    await serve_cli(CamStreamerSimulator(sites), args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_cli_args(
        argv,
        description="Serve simulated CamStreamer cloud accounts (GraphQL API).",
        default_port=DEFAULT_PORT,
        add_arguments=_add_arguments,
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
