"""An alert's thumbnail and MP4: where they stand, and their download."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from cms_ingest.domain import MediaKind
from cms_ingest.sitehttp import TransportError
from cms_ingest.vendors.base import BadDeviceResponse, Download, MediaNotReady, MediaProbe
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL
from cms_ingest.vendors.videoloft.alerts import VlAlert, _rom
from cms_ingest.vendors.videoloft.auth import _without_token
from cms_ingest.vendors.videoloft.polling import VideoloftPolling


class VideoloftMedia(VideoloftPolling):
    """The layer of `VideoloftClient` that serves the media fetcher."""

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        await self._ensure_devices()
        uidd, alert_id = str(locator.get("uidd")), locator.get("alert_id")
        device = self._devices.get(uidd)
        if device is None or not device.logger or not isinstance(alert_id, int):
            return MediaProbe("unavailable", detail=f"device {uidd} is not on the account")
        if kind is MediaKind.THUMBNAIL:
            return MediaProbe("ready", path=f"thumb|{device.logger}|{uidd}|{alert_id}")
        known_end = locator.get("end_ms")
        if isinstance(known_end, int) and time.time() < known_end / 1000 + self._options.tail_s:
            return MediaProbe("pending", detail="waiting for the recording tail after the alert")
        # Motion that goes on moves the alert's end later: read it again before the clip.
        current = await self._alert_now(uidd, alert_id)
        end_ms = current.end_ms if current is not None else known_end
        if not isinstance(end_ms, int):
            return MediaProbe("pending", detail="the alert is still going on")
        if time.time() < end_ms / 1000 + self._options.tail_s:
            return MediaProbe("pending", detail="the alert's end moved: waiting for its tail")
        start_ms = int(locator.get("start_ms") or alert_id * 1000)
        rom = _rom(current) if current is not None else locator.get("rom", 1)
        return MediaProbe(
            "ready",
            path=f"mp4|{device.logger}|{uidd}|{alert_id}|{start_ms // 1000}|{end_ms // 1000}|{rom}",
        )

    async def _alert_now(self, uidd: str, alert_id: int) -> VlAlert | None:
        """The alert as /alert lists it now (newest first: a recent alert is near the top)."""
        offset = 0
        for _page in range(MAX_PAGES_PER_POLL):
            page = await self._alert_page(uidd, offset, self._options.page_size)
            for alert in page:
                if alert.id == alert_id:
                    return alert
            if len(page) < self._options.page_size or page[-1].id < alert_id:
                return None
            offset += len(page)
        return None

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Download]:
        """`path` is our own locator (`thumb|logger|uidd|id`, `getthumb|logger|uidd|time` or
        `mp4|...`), never a URL. The token goes where the manual puts it: in the path of
        thumbnails, in the query of the MP4."""
        kind, logger, uidd, alert_id, *rest = path.split("|")
        if logger not in {d.logger for d in self._devices.values()}:
            raise BadDeviceResponse(f"logger {logger} is not one the account uses")
        http = self._host(logger)
        token = await self._auth_token()
        if kind == "thumb":
            request = http.request("GET", f"/alertthumb/{uidd}/{alert_id}/{token}")
        elif kind == "getthumb":  # alert_id is the capture time (`lastthumb`) here
            request = http.request("GET", f"/getthumb/{uidd}/{alert_id}/{token}")
        else:
            params = {
                "uid": uidd,
                "startt": rest[0],
                "endt": rest[1],
                "rom": rest[2] if len(rest) > 2 else "1",
                "id": alert_id,
                "buildmp4": "1",
                "token": token,
            }
            request = http.request(
                "GET", "/alerturl.m3u8", params=params, timeout_s=600.0, read_timeout_s=60.0
            )
        try:
            async with request as response:
                if response.status in (404, 202):
                    raise MediaNotReady(
                        f"{kind} of {uidd}:{alert_id} not ready ({response.status})"
                    )
                if response.status == 401:
                    self._invalidate(token)
                    raise MediaNotReady(f"{kind} of {uidd}:{alert_id}: token refused, renewing")
                if response.status != 200:
                    raise BadDeviceResponse(
                        f"{kind} of {uidd}:{alert_id} answered {response.status}"
                    )
                yield Download(
                    content_type=response.content_type,
                    content_length=response.content_length,
                    chunks=response.content.iter_chunked(256 * 1024),
                )
        except TransportError as exc:
            # The thumb URL carries the token in its path: never let it reach a message.
            raise _without_token(exc, token) from None
