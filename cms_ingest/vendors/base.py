"""The one small Protocol every vendor implements, and the errors vendors raise.

The runtime (pollers, media fetcher, action worker) knows vendors only through `VendorClient`.
A vendor module turns its device's API into `Alarm`s, media answers and action results; the
runtime owns scheduling, persistence, retries and health.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cms_ingest.domain import Action, ActionResult, Alarm, MediaKind
from cms_ingest.sitehttp import SiteHttp, TransportError
from cms_ingest.vendors.tasks import LocalTasks, VendorTasks

Cursor = Mapping[str, Any]  # JSON-serializable; persisted with the alarms it covers


class SiteOptions(BaseModel):
    """`options:` every vendor accepts; each vendor's own options model extends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Supervision: polls must succeed this long after an outage before comm_restored.
    restore_after_s: float = Field(default=10.0, ge=0)


class VendorError(Exception):
    """A vendor client's failure that is not a transport failure."""


class AuthenticationFailed(VendorError):
    """The device refused our credentials (login, refresh, or a token it keeps rejecting)."""


class BadDeviceResponse(VendorError):
    """The device answered, but not with something we can read (malformed JSON, wrong shape)."""


class MediaNotReady(VendorError):
    """The media was announced ready but the device cannot serve it yet (a 404): ask again later."""


class DeviceRefused(VendorError):
    """The device understood an action and said no. Never retried."""

    def __init__(self, message: str, *, answer: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.answer = dict(answer or {})


class InvalidAction(VendorError):
    """The operator's action row cannot be carried out as written (kind, target, params)."""


@dataclass(frozen=True, slots=True)
class PollResult:
    """New alarms and the cursor that comes after them; committed together or not at all."""

    alarms: list[Alarm]
    cursor: Cursor
    notes: list[str] = field(default_factory=list)  # e.g. "caught up 750 alarms in 3 pages"


@dataclass(frozen=True, slots=True)
class MediaProbe:
    """Where a piece of media stands on the device right now."""

    state: Literal["ready", "pending", "unavailable"]
    path: str | None = None  # when ready: what `download` takes (a site-relative path, or the
    # vendor's own reference to a media file on a host its API named); never stored
    detail: str = ""
    # Vendor state this media needs at its next check (an export made on the device): merged
    # into the media row's locator, so a retry after a restart or on another daemon finds it
    # again instead of making it twice. A key set to None is removed.
    remember: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Download:
    """An open media download: headers known, body streamed."""

    content_type: str | None
    content_length: int | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What the action worker must know about an action kind.

    `idempotent`: firing it twice has the same effect as once, so an attempt whose outcome is
    unknown (timeout after sending, crash while running) may be repeated.
    """

    idempotent: bool


class SiteReporter(Protocol):
    """Where a vendor client reports what it learns about its site beyond alarms: bad input
    from the device, the device's clock and its own health, what is left of an API budget.

    The runtime logs each `what` of bad input once per site (not once per poll), counts every
    report and exports the figures as the site's metrics; a vendor never touches metrics.
    """

    def bad_input(self, what: str, detail: str) -> None: ...

    def clock_skew(self, seconds: float) -> None:
        """The device's clock minus ours, as the vendor measured it (positive: ahead)."""
        ...

    def device_reset(self, detail: str) -> None:
        """The device's alarm ids started again (factory reset, replaced box, reinstalled
        server): the client starts a new device life. Logged every time (it is rare and an
        installer must see it) and counted."""
        ...

    def device_health(self, component: str, healthy: bool) -> None:
        """What the device says about one of its own parts (recorder, cameras, hardware)."""
        ...

    def api_budget(self, remaining: float) -> None:
        """Queries left today in the account's daily API budget."""
        ...


@dataclass(frozen=True, slots=True)
class VendorContext:
    """What every vendor client is built with: its site, its transport, its credentials."""

    site_id: str
    http: SiteHttp  # the configured site URL, its TLS policy and timeout
    problems: SiteReporter
    username: str = ""
    password: str = ""
    token: str = ""
    # Where a client may store media it fetches for an action (the daemon's data_dir/media);
    # None where nothing is kept (the probe).
    media_root: Path | None = None
    # Where the client starts background work it needs (a long-poll held open): the daemon's
    # supervisor, or plain tasks outside the daemon. One per client, never shared.
    tasks: VendorTasks = field(default_factory=LocalTasks)


class VendorClient(Protocol):
    """One configured site, as its vendor's API presents it."""

    vendor: str
    actions: Mapping[str, ActionSpec]

    async def poll(self, cursor: Cursor | None) -> PollResult:
        """Alarms after `cursor` (None: first start on this site) and the cursor after them."""
        ...

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe: ...

    def download(self, path: str) -> AbstractAsyncContextManager[Download]:
        """Stream a media file at a site-relative path (from a ready `MediaProbe`)."""
        ...

    async def perform(self, action: Action) -> ActionResult:
        """Fire an action; raise DeviceRefused, InvalidAction or TransportError."""
        ...

    async def close(self) -> None: ...


__all__ = [
    "ActionSpec",
    "AuthenticationFailed",
    "BadDeviceResponse",
    "Cursor",
    "DeviceRefused",
    "Download",
    "InvalidAction",
    "MediaNotReady",
    "MediaProbe",
    "PollResult",
    "SiteOptions",
    "SiteReporter",
    "TransportError",
    "VendorClient",
    "VendorContext",
    "VendorError",
    "VendorTasks",
]
