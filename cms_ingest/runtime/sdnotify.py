"""systemd's notify protocol: readiness, status, reload, stop and the watchdog.

Under `Type=notify` systemd hands us `NOTIFY_SOCKET`; with `WatchdogSec=` it also sets
`WATCHDOG_USEC` (and `WATCHDOG_PID`), and kills the daemon when pings stop. Without those
variables (a terminal, Docker, tests) every call here does nothing. The protocol is one
datagram per message on a unix socket, so no library is needed for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

from cms_ingest.runtime.tasks import sleep_or_stop

log = structlog.get_logger("cms_ingest.sdnotify")


class SystemdNotifier:
    def __init__(self, socket_path: str | None, watchdog_usec: int | None) -> None:
        self._address = _socket_address(socket_path) if socket_path else None
        self._watchdog_usec = watchdog_usec
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        watchdog_usec: int | None = None
        pid_text = env.get("WATCHDOG_PID", "")
        usec_text = env.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child must not ping.
        if usec_text.isdigit() and (not pid_text or pid_text == str(os.getpid())):
            watchdog_usec = int(usec_text) or None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2_000_000

    def ready(self, status: str = "") -> None:
        self._send("READY=1", f"STATUS={status}" if status else "")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match READY=1 to this reload.
        self._send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    async def run_watchdog(self, stop: asyncio.Event, healthy: Callable[[], bool]) -> None:
        """Ping while `healthy()`; a stuck event loop stops the pings by itself, and a daemon
        that is alive but no longer doing its work stops them on purpose."""
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            await stop.wait()
            return
        while not await sleep_or_stop(interval, stop):
            if healthy():
                self.watchdog()
            else:
                log.warning("watchdog_ping_withheld", note="the daemon reports itself unhealthy")

    def _send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(field for field in fields if field).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            if not self._failed:  # once: a broken socket would otherwise log every ping
                self._failed = True
                log.warning("sd_notify_failed", error=str(exc))


def _socket_address(path: str) -> str:
    # "@name" is an abstract-namespace socket; Python spells that with a leading NUL.
    return "\0" + path[1:] if path.startswith("@") else path
