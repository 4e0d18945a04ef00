"""Actions on a camera: `record` (triggerevent, repeated) and `snapshot_request`
(capturethumb, then the thumb it took, stored under the media directory)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cms_ingest.domain import Action, ActionResult
from cms_ingest.mediafiles import MediaTooLarge, store_stream
from cms_ingest.vendors.base import (
    ActionSpec,
    BadDeviceResponse,
    DeviceRefused,
    InvalidAction,
    VendorContext,
)
from cms_ingest.vendors.common import as_id, download_size, error_text
from cms_ingest.vendors.videoloft.answers import _device_entries, _result
from cms_ingest.vendors.videoloft.media import VideoloftMedia
from cms_ingest.vendors.videoloft.options import VideoloftOptions

TRIGGER_EVERY_S = 15.0  # triggerevent keeps a recording going for ~20 s after each call
# snapshot_request: how long to wait for the camera to report the thumb it was told to take.
CAPTURE_WAIT_S = 15.0
CAPTURE_POLL_S = 0.5
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a captured thumb is a few kB


class VideoloftActions(VideoloftMedia):
    """The layer of `VideoloftClient` that serves the action worker."""

    actions: Mapping[str, ActionSpec] = {
        # Re-sending triggerevent only extends the recording; capturethumb takes another thumb.
        "record": ActionSpec(idempotent=True),
        "snapshot_request": ActionSpec(idempotent=True),
    }

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        super().__init__(context, options)
        self._media_root = context.media_root

    async def perform(self, action: Action) -> ActionResult:
        await self._ensure_devices()
        uidd = action.target.strip()
        if uidd not in self._devices:
            raise InvalidAction(f"target must be a uidd of this account, not {action.target!r}")
        if action.kind == "snapshot_request":
            return await self._snapshot(action, uidd)
        if action.kind == "record":
            return await self._record(uidd, action.params.get("duration_s", 60))
        raise InvalidAction(
            f"videoloft has no action {action.kind!r} (it has: {', '.join(sorted(self.actions))})"
        )

    async def _record(self, uidd: str, duration: Any) -> ActionResult:
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise InvalidAction(f"params.duration_s must be a positive number, not {duration!r}")
        started = time.monotonic()
        sent = 0
        while True:
            await self._camera_task(uidd, "triggerevent")
            sent += 1
            remaining = duration - (time.monotonic() - started)
            if remaining <= TRIGGER_EVERY_S:
                break  # the recording runs ~20 s past the last trigger: that covers the rest
            await asyncio.sleep(TRIGGER_EVERY_S)
        return ActionResult(result={"triggers_sent": sent, "duration_s": duration})

    async def _snapshot(self, action: Action, uidd: str) -> ActionResult:
        """capturethumb only asks the camera for an image: the manual's way to get it is
        `lastthumb` in /cameras/status, then /getthumb. The image is stored under the media
        directory (`<site>/<yyyy>/<mm>/<dd>/<action id>-action-snapshot.jpg`) and its path
        is the action's result."""
        answer, taken, path = await self._capture_thumb(uidd)
        image = await self._keep_image(action, path)
        return ActionResult(result={"answer": answer, "thumb_time": taken, **image})

    async def _capture_thumb(self, uidd: str) -> tuple[Any, int, str]:
        """capturethumb on `uidd`, then the thumb it took: (the task's answer, the thumb's
        `lastthumb` time, its `download` path)."""
        before = await self._last_thumb(uidd)
        answer = await self._camera_task(uidd, "capturethumb")
        taken = await self._new_thumb(uidd, before)
        return answer, taken, f"getthumb|{self._devices[uidd].logger}|{uidd}|{taken}"

    async def _last_thumb(self, uidd: str) -> int | None:
        status, payload = await self._get(
            self._logger_http(uidd), "/cameras/status", [("uidd", uidd)]
        )
        if status != 200:
            raise BadDeviceResponse(f"GET /cameras/status for {uidd} answered {status}")
        return as_id(_device_entries(_result(payload)).get(uidd, {}).get("lastthumb"))

    async def _new_thumb(self, uidd: str, before: int | None) -> int:
        """The `lastthumb` the camera reports once it took the thumb asked for."""
        deadline = time.monotonic() + CAPTURE_WAIT_S
        while True:
            taken = await self._last_thumb(uidd)
            if taken is not None and (before is None or taken > before):
                return taken
            if time.monotonic() >= deadline:
                raise BadDeviceResponse(
                    f"{uidd} reported no new thumb within {CAPTURE_WAIT_S:g} s of capturethumb"
                )
            await asyncio.sleep(CAPTURE_POLL_S)

    async def _keep_image(self, action: Action, path: str) -> dict[str, Any]:
        """Download the image at `path` and store it (when the daemon gave a media root)."""
        if self._media_root is None:  # a client built without one: download it, keep nothing
            size, content_type = await download_size(self, path, MAX_IMAGE_BYTES)
            return {"image_bytes": size, "content_type": content_type}
        async with self.download(path) as image:
            try:
                stored = await store_stream(
                    image.chunks,
                    root=self._media_root,
                    site_id=self.site_id,
                    alarm_id=action.id,
                    kind="action-snapshot",
                    occurred_at=datetime.now(UTC),
                    max_bytes=MAX_IMAGE_BYTES,
                )
            except MediaTooLarge as exc:
                raise BadDeviceResponse(f"captured image of {action.target}: {exc}") from None
        return {
            "path": stored.path,
            "image_bytes": stored.size_bytes,
            "content_type": stored.content_type,
        }

    async def _camera_task(self, uidd: str, task: str) -> Any:
        status, payload = await self._get(
            self._logger_http(uidd),
            "/sendcameratask",
            {"uid": uidd, "action": task},
            auth_in="query",
        )
        if 200 <= status < 300:
            return payload
        if status == 404:
            self._refresh_devices_now = True
        if 400 <= status < 500:
            raise DeviceRefused(
                f"sendcameratask {task} refused ({status}): {error_text(payload)}",
                answer=payload if isinstance(payload, dict) else None,
            )
        raise BadDeviceResponse(f"sendcameratask {task} answered {status}")
