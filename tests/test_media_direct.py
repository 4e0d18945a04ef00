"""The media fetcher, driven directly on the in-memory storage adapter.

Its rows are made the real way (a poll of a simulated Davantis site committed by the alarm
writer), then the fetcher runs its claim loop against the same device over HTTP. The storage's
clock is a manual one, so "later" is a clock moved, not a sleep: a row not ready is looked at
again only once its backoff has passed, a claim left by a worker that is gone is taken again
only once it runs out, and a row still not ready at its deadline fails with the reason.
(`test_claim_loop.py` covers the loop itself and the fetcher on PostgreSQL; `test_deadlines.py`
the probe and download timeouts.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from structlog.testing import capture_logs

from cms_ingest.config import MediaConfig
from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.domain import MediaKind, MediaState
from cms_ingest.runtime.media import CLAIM_S, MediaFetcher
from cms_ingest.runtime.poller import SitePoller
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite, SimAlarm
from tests.conftest import eventually
from tests.support import (
    NO_DATABASE,
    app_config,
    davantis_site,
    memory_storage,
    running,
    site_poller,
    site_registry,
)

# Backoff of 0.2 s after the first look (less up to 30 % jitter), 0.5 s at most.
MEDIA = MediaConfig(retry_base_s=0.2, retry_max_s=0.5)


@dataclass
class Setup:
    device: DavantisSite
    sim: DavantisSimulator
    sites: SiteRegistry
    memory: MemoryStorage
    poller: SitePoller
    root: Path

    @property
    def clock(self) -> ManualClock:
        assert isinstance(self.memory.clock, ManualClock)
        return self.memory.clock

    def fetcher(self) -> MediaFetcher:
        return MediaFetcher(
            self.memory,
            self.sites,
            root=self.root,
            config=MEDIA,
            held=lambda: list(self.sites.by_id),
        )

    async def committed(self, *alarms: SimAlarm) -> None:
        """The device's new alarms polled and committed, their media rows with them."""
        assert await self.poller.poll_once()
        stored = {row.alarm.source_id for row in self.memory.alarms.values()}
        assert {str(alarm.id) for alarm in alarms} <= stored


@contextlib.asynccontextmanager
async def davantis(tmp_path: Path, *, media_deadline_s: float = 600.0) -> AsyncIterator[Setup]:
    device = DavantisSite(media_delay=0)
    memory = memory_storage()
    writer = AlarmWriter(memory, media_deadline_of=lambda _site: media_deadline_s)
    async with DavantisSimulator({"default": device}) as sim:
        config = app_config(NO_DATABASE, tmp_path, [davantis_site("s", sim.url())])
        async with site_registry(config) as sites, running(writer.run):
            poller = site_poller(sites.by_id["s"], writer)
            assert await poller.poll_once()  # a new site starts at its newest alarm
            yield Setup(device, sim, sites, memory, poller, tmp_path / "media")


def rows_of(setup: Setup, alarm: SimAlarm) -> dict[MediaKind, Any]:
    alarm_id = next(
        row.id for row in setup.memory.alarms.values() if row.alarm.source_id == str(alarm.id)
    )
    return {row.kind: row for row in setup.memory.media.values() if row.alarm_id == alarm_id}


def states(setup: Setup, alarm: SimAlarm) -> dict[str, str]:
    return {kind.value: row.state.value for kind, row in rows_of(setup, alarm).items()}


async def test_ready_media_is_stored_unavailable_settled_and_pending_retried_later(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path) as setup:
        ready = setup.device.add_alarm(video="unavailable")
        recording = setup.device.add_alarm(media_delay=3600)  # the device is still recording
        await setup.committed(ready, recording)
        fetcher = setup.fetcher()
        async with running(fetcher.run):
            await eventually(
                lambda: states(setup, ready) == {"snapshot": "ready", "video": "unavailable"},
                what="the ready alarm settled",
            )
            await eventually(
                lambda: all(row.attempts == 1 for row in rows_of(setup, recording).values()),
                what="the recording alarm looked at once",
            )
            for row in rows_of(setup, recording).values():
                assert row.state is MediaState.PENDING
                assert row.last_error.startswith("not ready")
                backoff = (row.next_attempt_at - setup.clock.now).total_seconds()
                assert 0.14 <= backoff <= 0.2, backoff

            # Woken again and again, but the backoff has not passed on the storage's clock.
            for _ in range(3):
                fetcher.wake()
                await asyncio.sleep(0.05)
            assert all(row.attempts == 1 for row in rows_of(setup, recording).values())

            recording.snapshot_ready_at = recording.video_ready_at = 0.0  # recorded now
            setup.clock.advance(0.25)
            fetcher.wake()
            await eventually(
                lambda: states(setup, recording) == {"snapshot": "ready", "video": "ready"},
                what="the recording alarm's media once ready",
            )
        snapshot = rows_of(setup, ready)[MediaKind.SNAPSHOT]
        data = (setup.root / snapshot.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == snapshot.sha256
        assert snapshot.size_bytes == len(data) and snapshot.claimed_until is None
        assert [row.attempts for row in rows_of(setup, recording).values()] == [2, 2]


async def test_a_claim_left_by_a_worker_that_is_gone_is_taken_again_once_it_runs_out(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path) as setup:
        alarm = setup.device.add_alarm(video="unavailable")
        await setup.committed(alarm)
        downloading = asyncio.Event()

        async def endless(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            await response.prepare(request)
            await response.write(b"\xff\xd8\xff\xe0")
            downloading.set()
            await asyncio.sleep(30)
            return response

        setup.sim.respond("GET", f"/alarms/{alarm.id}/snapshot", endless)  # the first time only
        async with running(setup.fetcher().run):
            await asyncio.wait_for(downloading.wait(), timeout=10)
            # The worker loses the database and stops: it cannot hand its row back.
            setup.memory.unavailable = True
        setup.memory.unavailable = False
        row = rows_of(setup, alarm)[MediaKind.SNAPSHOT]
        assert row.state is MediaState.PENDING and row.claimed_until is not None

        other = setup.fetcher()
        async with running(other.run):
            await asyncio.sleep(0.2)
            assert row.attempts == 0 and row.claimed_until is not None, "still claimed"
            setup.clock.advance(CLAIM_S + 1)
            other.wake()
            await eventually(lambda: row.state is MediaState.READY, what="taken again")
        assert row.attempts == 1


async def test_media_not_ready_by_its_deadline_fails_with_the_reason(tmp_path: Path) -> None:
    async with davantis(tmp_path, media_deadline_s=0.3) as setup:
        alarm = setup.device.add_alarm(video="unavailable", media_delay=3600)
        await setup.committed(alarm)
        row = rows_of(setup, alarm)[MediaKind.SNAPSHOT]
        fetcher = setup.fetcher()
        async with running(fetcher.run):
            await eventually(lambda: row.attempts == 1, what="the first look")
            assert row.state is MediaState.PENDING
            # Retried no later than its deadline, then given up (the fetcher reads the wall
            # clock for the deadline, the storage its own for when the row is due).
            assert row.next_attempt_at <= row.deadline_at
            await asyncio.sleep(0.35)
            setup.clock.advance(1.0)
            fetcher.wake()
            await eventually(lambda: row.state is MediaState.FAILED, what="given up")
        assert "(deadline)" in row.last_error and "not ready" in row.last_error


async def test_a_row_whose_outcome_could_not_be_written_is_handed_back_once_the_store_answers(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path) as setup:
        alarm = setup.device.add_alarm(video="unavailable")
        await setup.committed(alarm)
        row = rows_of(setup, alarm)[MediaKind.SNAPSHOT]
        downloading, gate = asyncio.Event(), asyncio.Event()

        async def held_back(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
            downloading.set()
            await gate.wait()
            return await device()

        setup.sim.respond("GET", f"/alarms/{alarm.id}/snapshot", held_back)  # the first time
        fetcher = setup.fetcher()
        with capture_logs() as logs:
            async with running(fetcher.run):
                await asyncio.wait_for(downloading.wait(), timeout=10)
                setup.memory.unavailable = True  # the download ends while the database is gone
                gate.set()
                await eventually(
                    lambda: any(e["event"] == "media_outcome_not_recorded" for e in logs),
                    what="the download's outcome not written",
                )
                assert row.state is MediaState.PENDING and row.claimed_until is not None
                # Back: handed back at once rather than when its claim (CLAIM_S) runs out.
                setup.memory.unavailable = False
                fetcher.wake()
                await eventually(lambda: row.state is MediaState.READY, what="fetched again")
        assert row.attempts == 1
