"""The `options:` of a Videoloft account."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from cms_ingest.units import Duration
from cms_ingest.vendors.base import SiteOptions

VENDOR = "videoloft"


class VideoloftOptions(SiteOptions):
    """`options:` of a Videoloft account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[str] | None = None  # restrict to these uidds (default: every device)
    reconnect_after_s: float = Field(default=240.0, gt=0)  # before the server's 5-minute cut
    devices_refresh_s: float = Field(default=600.0, gt=0)
    # /cameras/status per logger: devices still on it? each camera's status (offline missed?)
    residency_check_s: float = Field(default=60.0, gt=0)
    # After a long-poll answered, its devices' gaps are read once more this much later: a
    # logger that answers before it registers the connection loses nothing either.
    live_settle_s: float = Field(default=5.0, ge=0)
    tail_s: float = Field(default=20.0, ge=0)  # recording tail after an alert ends
    page_size: int = Field(default=50, ge=1, le=500)
    backfill: Duration | None = None
