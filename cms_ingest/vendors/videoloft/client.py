"""Videoloft cloud accounts (API 1.0.8). One configured site is one account.

The account's cameras ("devices", `uid.deviceid`, e.g. `12345.63`) live on logger servers
that the authenticator names; alerts arrive in real time on each logger's
`/cameras/realtime/live` long-poll, and `/alert` lists them afterwards.

How we use it:
- Session: `POST {authenticator}/login` with `{email, password}`; a `{location}` answer means
  "log in at that regional authenticator". Tokens live 20 minutes and carry their issue time
  and lifetime (`base64("uid:issued:ttl:...")*signature`): we renew at 3/4 of the lifetime
  with the login cookie (`caller=cookielogin`), and log in with the password when that fails.
  One renewal at a time. The token goes where the manual puts it, route by route: the
  `Authorization: ManythingToken` header (authenticator, `/cameras/status`, realtime), the
  `token=` query (`/alert`, `/sendcameratask`, the MP4), the path (thumbnails).
- Devices from `/devices` (every owner the account can see), their loggers from
  `/devices/viewerInfo`, refreshed every 10 minutes and at once when a logger stops
  answering for a device. Hosts handed back are contacted with the site URL's scheme. A
  device without a logger is reported, never silently left unwatched.
- One long-poll per logger, held by a background task and reopened before the server's
  5-minute cut (with jitter) and after any drop. The logger sends nothing from before it
  registered a connection, so a gap ends when the new long-poll *answered*: then the
  device's gap opens in the cursor (floor: the newest alert id committed) and `/alert` is
  read back to the floor, at most MAX_PAGES_PER_POLL pages a poll, the rest next poll.
  Live alerts arriving meanwhile are stored but never move the floor.
- Each logger's `/cameras/status` every `residency_check_s`: devices that moved, and each
  camera's status (a change missed in a gap, a camera offline from the start).
- Loggers are read at once; one that does not answer is left out for LOGGER_RETRY_S.
- Framing of the long-poll is not known publicly: SSE `data:` lines, newline-delimited JSON
  and back-to-back JSON objects are all accepted (`StreamDecoder`, linear, bounded).
- `/alert` spells its fields several ways (id as `alert`/`id`; end as `endt`, `endtt`, `enddt`,
  `end`; times in ms or s): `normalize_alert` reads them all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cms_ingest.domain import Alarm
from cms_ingest.vendors.base import BadDeviceResponse, MediaNotReady
from cms_ingest.vendors.common import download_size
from cms_ingest.vendors.videoloft.actions import MAX_IMAGE_BYTES, VideoloftActions
from cms_ingest.vendors.videoloft.options import VENDOR

PROBE_STREAM_WAIT_S = 10.0


class VideoloftClient(VideoloftActions):
    """A Videoloft account as `VendorClient`, built in layers, each the job of one module,
    each on the one before: `auth` (session) < `devices` < `live` (long-polls) < `catchup`
    (`/alert` read back) < `polling` < `media` < `actions` < this (probe and close)."""

    vendor = VENDOR

    async def describe(self) -> dict[str, Any]:
        await self._ensure_devices()
        return {
            "devices (uidd: name @ logger)": {
                uidd: f"{d.name} @ {d.logger}" for uidd, d in sorted(self._devices.items())
            },
            "not watched (viewerInfo names no logger)": list(self._unwatched),
        }

    def probe_checks(self) -> dict[str, Callable[[], Awaitable[str]]]:
        """Commissioning: the live stream of every logger connects, and what the vendor
        offers as media (an alert's thumbnail and MP4, a thumb captured now) downloads."""
        return {
            "live stream of every logger": self._probe_streams,
            "one snapshot": self._probe_media,
        }

    async def _probe_streams(self) -> str:
        await self._ensure_devices()
        await self._ensure_streams()
        loggers = sorted(self._by_logger())
        deadline = time.monotonic() + PROBE_STREAM_WAIT_S
        while time.monotonic() < deadline:
            if all(logger in self._connected_at for logger in loggers):
                return "\n".join(f"{logger}: connected" for logger in loggers)
            await asyncio.sleep(0.1)
        missing = [logger for logger in loggers if logger not in self._connected_at]
        failures = {
            logger: self._stream_failures.get(logger, (0, "no answer"))[1] for logger in missing
        }
        raise BadDeviceResponse(
            f"live stream not connected within {PROBE_STREAM_WAIT_S:g} s: {failures}"
        )

    async def _probe_media(self) -> str:
        await self._ensure_devices()
        lines = []
        for alarm in await self.recent_alarms(1):
            for media in alarm.media:
                what = f"alert {alarm.source_id} {media.kind.value}"
                probe = await self.media_status(media.kind, media.locator)
                if probe.state != "ready" or probe.path is None:
                    lines.append(f"{what}: {probe.state} ({probe.detail})")
                    continue
                try:
                    size, content_type = await download_size(self, probe.path, MAX_IMAGE_BYTES)
                except MediaNotReady as exc:  # a fresh alert: the logger has not got it yet
                    lines.append(f"{what}: not served yet ({exc})")
                    continue
                lines.append(f"{what}: {size} bytes ({content_type})")
        uidd = next((u for u, d in sorted(self._devices.items()) if d.logger), None)
        if uidd is None:
            raise BadDeviceResponse("no device with a logger to capture a thumb from")
        _answer, _taken, path = await self._capture_thumb(uidd)
        size, content_type = await download_size(self, path, MAX_IMAGE_BYTES)
        lines.append(f"thumb captured now on {uidd}: {size} bytes ({content_type})")
        return "\n".join(lines)

    async def recent_alarms(self, count: int) -> list[Alarm]:
        await self._ensure_devices()
        alarms: list[Alarm] = []
        for uidd in sorted(self._devices):
            alarms += [self._alarm(a) for a in await self._alert_page(uidd, 0, count)]
        return sorted(alarms, key=lambda alarm: alarm.occurred_at, reverse=True)[:count]

    async def close(self) -> None:
        reads: list[asyncio.Task[Any]] = [*self._status_reads.values(), *self._catch_ups.values()]
        for task in reads:
            task.cancel()
        await self._tasks.stop_all()  # the long-polls
        if reads:
            await asyncio.wait(reads, timeout=2)
        self._streams.clear()
        self._status_reads.clear()
        self._catch_ups.clear()
