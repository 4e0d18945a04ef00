"""The account's devices and the logger serving each.

Devices from `/devices` (every owner the account can see), their loggers from
`/devices/viewerInfo`, refreshed every 10 minutes and at once when a logger stops answering
for a device. A device without a logger is reported, never silently left unwatched. A logger
that does not answer is left out for LOGGER_RETRY_S.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cms_ingest.sitehttp import SiteHttp
from cms_ingest.vendors.base import BadDeviceResponse, VendorContext
from cms_ingest.vendors.common import error_text
from cms_ingest.vendors.videoloft.answers import _device_entries, _result
from cms_ingest.vendors.videoloft.auth import VideoloftSession
from cms_ingest.vendors.videoloft.options import VideoloftOptions

# A logger that could not be reached is left out of catch-ups and status reads this long, so
# it does not hold back the other loggers' devices poll after poll (its gaps stay open).
LOGGER_RETRY_S = 30.0


@dataclass(slots=True)
class _Device:
    uidd: str
    name: str
    logger: str | None = None


class VideoloftDevices(VideoloftSession):
    """The layer of `VideoloftClient` that knows the account's devices and their loggers."""

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        super().__init__(context, options)
        self._devices: dict[str, _Device] = {}
        self._devices_at: float | None = None
        self._logger_down_until: dict[str, float] = {}  # logger -> monotonic
        self._unwatched: list[str] = []  # devices without a logger
        self._refresh_devices_now = False

    async def _ensure_devices(self) -> None:
        now = time.monotonic()
        stale = self._devices_at is None or now - self._devices_at > self._options.devices_refresh_s
        if not stale and not self._refresh_devices_now:
            return
        status, payload = await self._get(self._auth_http, "/devices")
        if status != 200 or not isinstance(payload, dict):
            raise BadDeviceResponse(f"GET /devices answered {status}: {error_text(payload)}")
        listed = _flatten_devices(_result(payload))
        wanted = set(self._options.devices) if self._options.devices else None
        devices = {u: d for u, d in listed.items() if wanted is None or u in wanted}
        if wanted:
            missing = wanted - set(listed)
            if missing:
                self._problems.bad_input(
                    "devices", f"options.devices not on the account: {sorted(missing)}"
                )
        await self._load_loggers(devices)
        self._report_unwatched(devices)
        self._devices = devices
        self._devices_at = now
        self._refresh_devices_now = False

    async def _load_loggers(self, devices: dict[str, _Device]) -> None:
        uidds = list(devices)
        for start in range(0, len(uidds), 50):  # uidds go in the query: keep URLs short
            chunk = uidds[start : start + 50]
            status, payload = await self._get(
                self._auth_http, "/devices/viewerInfo", [("uidd", u) for u in chunk]
            )
            if status != 200 or not isinstance(payload, dict):
                raise BadDeviceResponse(f"GET /devices/viewerInfo answered {status}")
            for uidd, info in _flatten_devices(_result(payload)).items():
                if uidd in devices and info.logger:
                    devices[uidd].logger = info.logger

    def _report_unwatched(self, devices: dict[str, _Device]) -> None:
        """A device without a logger cannot be watched: say so (logged once per site,
        counted at every device refresh), never skip it silently."""
        unwatched = sorted(uidd for uidd, device in devices.items() if not device.logger)
        self._unwatched = unwatched
        if unwatched:
            self._problems.bad_input(
                "device_without_logger",
                f"viewerInfo names no logger for {', '.join(unwatched)}: not watched",
            )

    def _by_logger(self) -> dict[str, list[str]]:
        by_logger: dict[str, list[str]] = {}
        for device in self._devices.values():
            if device.logger:
                by_logger.setdefault(device.logger, []).append(device.uidd)
        return by_logger

    def _logger_up(self, logger: str) -> bool:
        return time.monotonic() >= self._logger_down_until.get(logger, 0.0)

    def _logger_unreachable(self, logger: str, error: Exception) -> None:
        """Leave `logger` out of catch-ups and status reads for a while: one logger that
        does not answer must not cost every poll a request timeout."""
        self._logger_down_until[logger] = time.monotonic() + LOGGER_RETRY_S
        self._problems.bad_input("logger_unreachable", f"logger {logger}: {error}")

    def _logger_http(self, uidd: str) -> SiteHttp:
        device = self._devices.get(uidd)
        if device is None or not device.logger:
            raise BadDeviceResponse(f"device {uidd} has no logger (not on this account?)")
        return self._host(device.logger)


def _flatten_devices(result: Any) -> dict[str, _Device]:
    """Every device of a `/devices` or `viewerInfo` answer."""
    return {
        uidd: _Device(
            uidd=uidd,
            name=str(item.get("phonename") or uidd),
            logger=str(item["logger"]) if item.get("logger") else None,
        )
        for uidd, item in _device_entries(result).items()
    }
