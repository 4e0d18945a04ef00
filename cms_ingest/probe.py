"""`cms-ingest probe`: prove a site works before the installer leaves it.

Talks to the site exactly as the daemon will (same client, same TLS policy) and prints a
readable report: authentication and a first poll, what the site has (cameras, relays,
inputs), and one snapshot downloaded. Exit 0 only when every step passed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from cms_ingest.config import SiteConfig
from cms_ingest.domain import MediaKind
from cms_ingest.runtime.sites import build_site
from cms_ingest.sitehttp import TransportError, new_client_session
from cms_ingest.vendors.base import MediaNotReady, VendorClient, VendorError
from cms_ingest.vendors.common import download_size

MAX_SNAPSHOT_BYTES = 20 * 1024 * 1024


class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    async def step(self, title: str, body: Callable[[], Awaitable[str]]) -> None:
        started = time.monotonic()
        try:
            detail = await body()
            mark = "PASS"
        except (TransportError, VendorError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            mark = "FAIL"
            self.failed += 1
        elapsed = (time.monotonic() - started) * 1000
        self.out.write(f"[{mark}] {title} ({elapsed:.0f} ms)\n")
        for line in detail.splitlines():
            self.out.write(f"       {line}\n")


async def run_probe(site: SiteConfig, *, out: TextIO) -> int:
    out.write(f"probing {site.id} ({site.vendor}) at {site.url}\n")
    report = _Report(out)
    async with new_client_session() as session:
        runtime = build_site(site, session)
        client = runtime.client
        await report.step("authentication and first poll", lambda: _first_poll(client))
        await report.step("clock", lambda: _clock(runtime.problems.skew_s))
        await report.step("site inventory", lambda: _inventory(client))
        # Vendor-specific commissioning checks (a camera log readable, the device's time zone,
        # export formats, a live stream connecting...): each raises to fail its step.
        checks = getattr(client, "probe_checks", None)
        vendor_checks = checks() if checks is not None else {}
        for title, check in vendor_checks.items():
            await report.step(title, check)
        if "one snapshot" not in vendor_checks:  # a vendor's own snapshot check replaces it
            await report.step("one snapshot", lambda: _snapshot(client))
        await client.close()
    out.write(
        "PASS: all checks passed\n"
        if not report.failed
        else f"FAIL: {report.failed} check(s) failed\n"
    )
    return 0 if not report.failed else 1


async def _first_poll(client: VendorClient) -> str:
    result = await client.poll(None)
    return f"logged in; the daemon would start from cursor {dict(result.cursor)}"


async def _clock(skew_s: float | None) -> str:
    if skew_s is None:
        return "skew not measured for this vendor (alarm times are the device's own)"
    verdict = "fix the device's NTP" if abs(skew_s) > 30 else "within tolerance"
    return f"device clock {skew_s:+.1f} s from ours: {verdict}"


async def _inventory(client: VendorClient) -> str:
    describe = getattr(client, "describe", None)
    if describe is None:
        return "this vendor has no inventory call"
    inventory: dict[str, Any] = await describe()
    lines = []
    for key, value in inventory.items():
        lines.append(f"{key}: {_summary(value)}")
    return "\n".join(lines)


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return (
            "; ".join(
                ", ".join(f"{k}={v}" for k, v in item.items())
                if isinstance(item, dict)
                else str(item)
                for item in value
            )
            or "none"
        )
    return str(value)


async def _snapshot(client: VendorClient) -> str:
    recent = getattr(client, "recent_alarms", None)
    alarms = await recent(20) if recent is not None else []
    for alarm in alarms:
        for media in alarm.media:
            if media.kind is not MediaKind.SNAPSHOT or not media.available:
                continue
            probe = await client.media_status(media.kind, media.locator)
            if probe.state != "ready" or not probe.path:
                continue
            try:
                size, content_type = await download_size(client, probe.path, MAX_SNAPSHOT_BYTES)
            except MediaNotReady:
                continue  # announced but not served yet: try an older alarm
            return f"alarm {alarm.source_id}: {size} bytes ({content_type})"
    return "no alarm with a ready snapshot on the device yet (nothing to download)"
