"""The live long-polls: one per logger, held by a background task, and what they deliver.

One long-poll per logger, held by a task started through the client's context (the daemon
supervises it) and reopened before the server's 5-minute cut (with jitter) and after any
drop, at the next poll. The logger sends nothing from before it registered a connection, so
a gap ends when the new long-poll *answered*: then the device's gap opens in the cursor
(floor: the newest alert id committed) and `/alert` is read back to the floor (`catchup`).
Each logger's `/cameras/status` every `residency_check_s`: devices that moved, and each
camera's status (a change missed in a gap, a camera offline from the start).
"""

from __future__ import annotations

import asyncio
import codecs
import random
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import structlog

from cms_ingest.sitehttp import TransportError
from cms_ingest.vendors.base import VendorContext, VendorError
from cms_ingest.vendors.tasks import STOP_GRACE_S
from cms_ingest.vendors.videoloft.answers import _device_entries, _now_ms, _result
from cms_ingest.vendors.videoloft.decoder import StreamDecoder
from cms_ingest.vendors.videoloft.devices import VideoloftDevices
from cms_ingest.vendors.videoloft.options import VideoloftOptions

log = structlog.get_logger("cms_ingest.vendors.videoloft")

# A logger whose long-poll failed this many times in a row counts as not answering; when
# every logger in use is in that state the poll fails (supervision: "no live long-poll").
STREAM_FAILURES_DOWN = 3


@dataclass(slots=True)
class _LiveStream:
    """A logger's long-poll task: the devices it watches, and whether its last long-poll
    ended (then the next poll wakes it to open the next one)."""

    uidds: frozenset[str]
    name: str  # of its task
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False


Seen = tuple[str, Any, int]  # (logger, record, ms since the epoch when it reached us)


@dataclass(slots=True)
class _Inbox:
    """What the long-polls delivered since the last poll, and the gaps that need catch-up."""

    records: list[Seen] = field(default_factory=list)
    # uidds whose stream was (re)connected -> until when (ms) their gap is read once more
    gaps: dict[str, int] = field(default_factory=dict)

    def merge_before(self, earlier: _Inbox) -> None:
        """Put an earlier, undelivered batch back in front of this one."""
        self.records[:0] = earlier.records
        self.add_gaps(earlier.gaps)

    def add_gaps(self, gaps: Mapping[str, int]) -> None:
        for uidd, until in gaps.items():
            self.gaps[uidd] = max(until, self.gaps.get(uidd, 0))


class VideoloftLive(VideoloftDevices):
    """The layer of `VideoloftClient` that holds the long-polls and fills the inbox."""

    def __init__(self, context: VendorContext, options: VideoloftOptions) -> None:
        super().__init__(context, options)
        self._tasks = context.tasks
        self._residency_at: float | None = None
        self._streams: dict[str, _LiveStream] = {}
        self._inbox = _Inbox()
        self._stream_failures: dict[str, tuple[int, str]] = {}  # logger -> (in a row, last)
        self._connected_at: dict[str, float] = {}  # logger -> epoch its long-poll answered
        self._status_reads: dict[str, asyncio.Task[None]] = {}  # logger -> /cameras/status

    def _reconcile(self) -> None:
        """Each `residency_check_s`, ask every logger for `/cameras/status`, in the background
        (a logger that does not answer holds up no poll): a device it no longer lists has
        moved, and each camera's `status` goes into the inbox like a live record, so a change
        that fell into a stream gap, or a camera that was already offline, is not missed."""
        now = time.monotonic()
        if (
            self._residency_at is not None
            and now - self._residency_at < self._options.residency_check_s
        ):
            return
        self._residency_at = now
        for logger, uidds in self._by_logger().items():
            running = self._status_reads.get(logger)
            if self._logger_up(logger) and (running is None or running.done()):
                self._status_reads[logger] = asyncio.create_task(
                    self._reconcile_logger(logger, uidds), name=f"videoloft-status:{logger}"
                )

    async def _reconcile_logger(self, logger: str, uidds: list[str]) -> None:
        try:
            status, payload = await self._get(
                self._host(logger), "/cameras/status", [("uidd", u) for u in sorted(uidds)]
            )
        except TransportError as exc:
            self._logger_unreachable(logger, exc)
            return
        except VendorError as exc:
            self._problems.bad_input("camera_status", f"logger {logger}: {exc}")
            return
        listed = _device_entries(_result(payload)) if status == 200 else {}
        if set(uidds) - set(listed):
            log.info("videoloft_devices_moved", site_id=self.site_id, logger=logger)
            self._refresh_devices_now = True
        seen_ms = _now_ms()
        for uidd in uidds:
            camera_status = listed.get(uidd, {}).get("status")
            if isinstance(camera_status, str):
                record = {"type": "liveSession", "data": {"uidd": uidd, "status": camera_status}}
                self._inbox.records.append((logger, record, seen_ms))

    async def _ensure_streams(self) -> None:
        """One running long-poll per logger, for exactly the devices it serves. A long-poll
        that ended (the planned reconnect, a drop, a refusal) is reopened here, at the next
        poll, as often as the site is polled and no more."""
        wanted = {logger: frozenset(uidds) for logger, uidds in self._by_logger().items()}
        for logger, stream in list(self._streams.items()):
            if not self._tasks.running(stream.name) or stream.uidds != wanted.get(logger):
                del self._streams[logger]
                await self._tasks.stop(stream.name)
        for logger, uidds in wanted.items():
            held = self._streams.get(logger)
            if held is None:
                fresh = self._streams[logger] = _LiveStream(uidds, name=f"live:{logger}")
                await self._tasks.start(fresh.name, partial(self._hold_stream, logger, fresh))
            elif held.ended:
                held.wake.set()

    async def _hold_stream(self, logger: str, stream: _LiveStream, stop: asyncio.Event) -> None:
        """The body of a logger's long-poll task: one long-poll at a time until stopped."""
        while not stop.is_set():
            stream.ended = False
            stream.wake.clear()
            await _unless_stopped(self._stream(logger, stream.uidds), stop)
            stream.ended = True
            await _either(stream.wake, stop)

    async def _stream(self, logger: str, uidds: frozenset[str]) -> None:
        """Hold the long-poll until the planned reconnect, a drop, or an error."""
        http = self._host(logger)
        hold = self._options.reconnect_after_s * random.uniform(0.85, 1.0)
        decoder = StreamDecoder()
        try:
            token = await self._auth_token()
            async with http.request(
                "GET",
                "/cameras/realtime/live",
                params=[("uidd", u) for u in sorted(uidds)],
                headers={"Authorization": f"ManythingToken {token}"},
                timeout_s=hold + 30,
                read_timeout_s=hold + 30,
            ) as response:
                if response.status == 401:
                    self._invalidate(token)
                    self._stream_failed(logger, "long-poll refused the token (401)")
                    return
                if response.status != 200:
                    self._refresh_devices_now = True  # a logger that stops answering
                    self._stream_failed(logger, f"long-poll answered {response.status}")
                    return
                self._stream_connected(logger, uidds)
                await asyncio.wait_for(self._read_stream(response, logger, decoder), timeout=hold)
        except TimeoutError:
            return  # the planned reconnect, ahead of the server's cut
        except (TransportError, VendorError, aiohttp.ClientError) as exc:
            # VendorError: a token renewal refused (AuthenticationFailed) or answered over the
            # size cap; the poll meets the same refusal and reports it. Nothing may escape a
            # task nobody awaits.
            log.info("videoloft_live_dropped", site_id=self.site_id, logger=logger, error=str(exc))
            if isinstance(exc, VendorError) or (isinstance(exc, TransportError) and not exc.sent):
                self._stream_failed(logger, str(exc))  # could not even connect

    def _stream_connected(self, logger: str, uidds: frozenset[str]) -> None:
        """The logger answered the long-poll: from now on it sends every update, and what
        happened before this moment (since the last connection) must come from /alert. The
        gap ends here, not when the request was sent: the logger sends nothing from before
        it registered the connection."""
        self._stream_failures.pop(logger, None)
        self._logger_down_until.pop(logger, None)
        # A logger may also answer first and register a moment later (the manual does not
        # say): the gap is read at once, and once more after live_settle_s.
        until = _now_ms() + int(self._options.live_settle_s * 1000)
        self._inbox.add_gaps(dict.fromkeys(uidds, until))
        self._connected_at[logger] = time.time()

    def _stream_failed(self, logger: str, error: str) -> None:
        count, _ = self._stream_failures.get(logger, (0, ""))
        self._stream_failures[logger] = (count + 1, error)

    def _no_live_stream(self) -> str | None:
        """Why no logger in use has a live long-poll, or None while one does."""
        loggers = {d.logger for d in self._devices.values() if d.logger}
        failing = {
            logger: self._stream_failures[logger]
            for logger in loggers
            if self._stream_failures.get(logger, (0, ""))[0] >= STREAM_FAILURES_DOWN
        }
        if not loggers or len(failing) < len(loggers):
            return None
        logger, (count, error) = next(iter(sorted(failing.items())))
        return f"no live long-poll: logger {logger} failed {count} times in a row ({error})"

    async def _read_stream(
        self, response: aiohttp.ClientResponse, logger: str, decoder: StreamDecoder
    ) -> None:
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split characters
        async for chunk in response.content.iter_any():
            records, garbage = decoder.feed(text.decode(chunk))
            for fragment in garbage:
                self._problems.bad_input(
                    "live_record", f"unreadable long-poll record: {fragment!r}"
                )
            seen_ms = _now_ms()
            self._inbox.records.extend((logger, record, seen_ms) for record in records)


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Run `work` until it ends (its exception raised) or `stop` is set (it is cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        task.cancel()  # nothing when it ended; when stopped (or we are cancelled): now
    if task.cancelled() or not task.done():
        await asyncio.wait({task}, timeout=STOP_GRACE_S)  # it lets go of its connection
        return
    task.result()


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Wait until one of two events is set."""
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
