"""The site poller, driven directly: one poll at a time, committed through a real alarm writer
into the in-memory storage adapter, against a simulated Davantis site over HTTP.

No database and no daemon: what is shown here is the poller's own contract. Its cursor moves
only after the alarms before it are committed; a database outage loses nothing and doubles
nothing, and is not the site's failure; a poll past its deadline fails alone; a site gone
quiet raises `comm_lost`, then `comm_restored`, each once, and a `comm_lost` whose commit
failed is raised again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cms_ingest.config import FloodConfig
from cms_ingest.db.memory import MemoryStorage
from cms_ingest.runtime.poller import SitePoller
from cms_ingest.runtime.sites import SiteRuntime
from cms_ingest.runtime.tasks import Gate
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
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


@contextlib.asynccontextmanager
async def davantis(
    tmp_path: Path, **site: Any
) -> AsyncIterator[tuple[DavantisSite, SiteRuntime, MemoryStorage, AlarmWriter]]:
    """A simulated site, its runtime (client, health) and a running writer into memory."""
    device = DavantisSite(media_delay=0)
    memory = memory_storage()
    writer = AlarmWriter(memory, media_deadline_of=lambda _site: 600.0)
    async with DavantisSimulator({"default": device}) as sim:
        config = app_config(NO_DATABASE, tmp_path, [davantis_site("s", sim.url(), **site)])
        async with site_registry(config) as sites, running(writer.run):
            yield device, sites.by_id["s"], memory, writer


def stored(memory: MemoryStorage) -> list[str]:
    """The source ids of the stored alarms, in the order they were written."""
    return [row.alarm.source_id for row in sorted(memory.alarms.values(), key=lambda r: r.id)]


async def stored_cursor(memory: MemoryStorage) -> Any:
    return (await memory.load_cursors(["s"]))["s"]


async def test_the_cursor_moves_only_after_its_alarms_are_committed(tmp_path: Path) -> None:
    async with davantis(tmp_path) as (device, site, memory, writer):
        poller = site_poller(site, writer)
        assert await poller.poll_once()  # a new site starts at its newest alarm
        start = poller.cursor
        assert start is not None and await stored_cursor(memory) == start

        posted = [str(alarm.id) for alarm in device.add_alarms(3)]
        memory.unavailable = True
        assert not await poller.poll_once()
        # The device answered; our database did not: nothing stored, cursor kept, and the
        # site is not counted as failing (its comm loss is not told either).
        assert poller.cursor == start
        assert memory.alarms == {}
        assert site.health.up is True and site.health.consecutive_failures == 0

        memory.unavailable = False
        assert await poller.poll_once()  # the same range polled again, now committed
        assert stored(memory) == posted
        assert poller.cursor != start
        assert await stored_cursor(memory) == poller.cursor

        assert await poller.poll_once()  # nothing new: nothing written twice
        assert stored(memory) == posted


async def test_a_poll_started_from_a_stale_cursor_doubles_nothing(tmp_path: Path) -> None:
    """A restart resumes from the committed cursor, maybe behind what was stored (a failover):
    what is polled again is absorbed, and only the new alarms are stored."""
    async with davantis(tmp_path) as (device, site, memory, writer):
        first = site_poller(site, writer)
        assert await first.poll_once()
        start = first.cursor
        posted = [str(alarm.id) for alarm in device.add_alarms(2)]
        assert await first.poll_once()

        again = site_poller(site, writer, cursor=start)
        posted += [str(alarm.id) for alarm in device.add_alarms(1)]
        assert await again.poll_once()
        assert stored(memory) == posted
        assert again.cursor == await stored_cursor(memory)


async def test_a_poll_past_its_deadline_fails_and_keeps_the_cursor(tmp_path: Path) -> None:
    async with davantis(tmp_path, poll_deadline_s=0.3, request_timeout_s=5.0) as (
        device,
        site,
        memory,
        writer,
    ):
        poller = site_poller(site, writer)
        assert await poller.poll_once()
        start = poller.cursor
        posted = [str(alarm.id) for alarm in device.add_alarms(2)]
        device.slow_alarm_polls(1, delay=1.0)  # each request would be in time; the poll is not

        loop = asyncio.get_running_loop()
        began = loop.time()
        assert not await poller.poll_once()
        assert loop.time() - began < 0.9, "cut at the poll's deadline, not the request's"
        assert poller.cursor == start and memory.alarms == {}
        assert site.health.up is False
        assert "poll exceeded its deadline of 0.3 s" in (site.health.last_error or "")

        assert await poller.poll_once()  # the device is fast again: nothing was lost
        assert stored(memory) == posted
        assert site.health.up is True


async def fail_for(poller: SitePoller, seconds: float) -> None:
    """Poll a failing site until `seconds` have passed (wall time: comm loss reads it)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        assert not await poller.poll_once()
        await asyncio.sleep(0.02)


async def test_a_quiet_site_raises_comm_lost_then_comm_restored_once_each(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path, supervision_timeout=0.3, options={"restore_after_s": 0.3}) as (
        device,
        site,
        memory,
        writer,
    ):
        poller = site_poller(site, writer)
        assert await poller.poll_once()
        device.fail_alarm_polls(1000)

        await fail_for(poller, 0.15)
        assert stored(memory) == [], "not before the supervision timeout"
        await fail_for(poller, 0.4)
        [lost] = memory.alarms.values()
        assert lost.alarm.event_type.value == "comm_lost" and lost.alarm.vendor == "cms"
        history = (await memory.supervision_states(["s"]))["s"]
        assert history.open_outage is not None  # what a restarted poller resumes from

        device.fail_alarm_polls(0)
        assert await poller.poll_once()
        assert len(memory.alarms) == 1, "not before restore_after_s of good polls"
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.5
        while loop.time() < until:
            assert await poller.poll_once()
            await asyncio.sleep(0.02)
        kinds = [row.alarm.event_type.value for row in memory.alarms.values()]
        assert kinds == ["comm_lost", "comm_restored"]
        assert (await memory.supervision_states(["s"]))["s"].open_outage is None


async def test_a_comm_lost_whose_commit_failed_is_raised_on_a_later_poll(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path, supervision_timeout=0.2) as (device, site, memory, writer):
        poller = site_poller(site, writer)
        assert await poller.poll_once()
        device.fail_alarm_polls(1000)
        memory.unavailable = True  # the site and our database fail together
        await fail_for(poller, 0.4)
        assert memory.alarms == {}

        memory.unavailable = False
        assert not await poller.poll_once()
        await fail_for(poller, 0.1)
        kinds = [row.alarm.event_type.value for row in memory.alarms.values()]
        assert kinds == ["comm_lost"], "raised once the database answers, and once only"


async def test_a_flood_committed_after_an_outage_is_grouped_once(tmp_path: Path) -> None:
    """Beyond the limit a camera's alarms join a burst; when the commit fails the same alarms
    come back on the next poll, and the burst is neither counted twice nor split."""
    async with davantis(tmp_path) as (device, site, memory, writer):
        poller = site_poller(site, writer, flood=FloodConfig(max_per_minute=2))
        assert await poller.poll_once()
        posted = [str(alarm.id) for alarm in device.add_alarms(6, camera=1)]
        memory.unavailable = True
        assert not await poller.poll_once()
        memory.unavailable = False
        assert await poller.poll_once()

        rows = sorted(memory.alarms.values(), key=lambda row: row.id)
        assert [row.alarm.source_id for row in rows] == posted
        head = posted[2]  # the limit (2), then the burst's first alarm
        assert [row.alarm.group_of for row in rows] == [None, None, None, head, head, head]
        assert rows[2].repeat_count == 3
        members = {row.id for row in rows[3:]}
        assert not [media for media in memory.media.values() if media.alarm_id in members]


async def test_flood_members_get_the_sites_priority_too(tmp_path: Path) -> None:
    """Priority and flood marks are set together (one copy of each alarm): a burst's members
    carry the site's priority like the alarms before them."""
    async with davantis(tmp_path, priorities={"intrusion": 7}) as (device, site, memory, writer):
        poller = site_poller(site, writer, flood=FloodConfig(max_per_minute=2))
        assert await poller.poll_once()
        posted = [str(alarm.id) for alarm in device.add_alarms(5, camera=1)]
        assert await poller.poll_once()
        rows = sorted(memory.alarms.values(), key=lambda row: row.id)
        assert [row.alarm.source_id for row in rows] == posted
        assert [row.alarm.group_of for row in rows] == [None, None, None, posted[2], posted[2]]
        assert [row.alarm.priority for row in rows] == [7] * 5  # not the default (1)


async def test_a_site_taken_over_from_a_dead_daemon_is_polled_at_once(tmp_path: Path) -> None:
    """It waited a lease period already: its first poll comes within `start_within_s` (the
    rate limit of first polls), not anywhere in the next second as a started site's does."""
    async with davantis(tmp_path, poll_interval=10) as (_device, site, _memory, writer):
        loop = asyncio.get_running_loop()
        for _ in range(8):  # a 1 s spread would put all eight under 0.3 s once in 15,000
            poller = site_poller(site, writer, start_within_s=0.02, overdue=True)
            began = loop.time()
            async with running(poller.run):
                await eventually(lambda p=poller: p.cursor is not None, timeout=5, what="poll")
            assert loop.time() - began < 0.3


class CountingGate(Gate):
    """The pollers' shared gate, counting who went through it and how many at once."""

    def __init__(self, room: int) -> None:
        super().__init__(room)
        self.entries = 0
        self.inside = 0
        self.most_inside = 0

    @contextlib.asynccontextmanager
    async def within(self, patience_s: float) -> AsyncIterator[bool]:
        async with super().within(patience_s) as placed:
            self.entries += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            try:
                yield placed
            finally:
                self.inside -= 1


async def test_only_first_polls_pass_the_gate_the_pollers_share(tmp_path: Path) -> None:
    """Sites started together pass their first poll (a login, the device's set-up) through
    one gate that bounds how many run at once; the polls after it do not wait for it."""
    async with davantis(tmp_path, poll_interval=0.1) as (device, site, _memory, writer):
        device.slow_alarm_polls(4, delay=0.2)
        gate = CountingGate(2)
        pollers = [
            site_poller(site, writer, start_within_s=0.01, first_poll_gate=gate) for _ in range(4)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for poller in pollers:
                await stack.enter_async_context(running(poller.run))
            await eventually(
                lambda: all(p.cursor is not None for p in pollers), timeout=10, what="first polls"
            )
            polled = device.requests["GET /alarms"]
            await eventually(
                lambda: device.requests["GET /alarms"] >= polled + 12, timeout=10, what="polls"
            )
        assert gate.entries == 4, "each poller's first poll once, and no later poll"
        assert gate.most_inside == 2


async def test_a_first_poll_does_not_wait_for_the_gate_beyond_its_patience(
    tmp_path: Path,
) -> None:
    """With the loop too busy for the gate's holders to be quick, the sites behind them are
    polled after their patience ran out, not starved until a place comes."""
    async with davantis(tmp_path, poll_interval=0.1) as (device, site, _memory, writer):
        gate = Gate(1)
        async with gate:  # the one place held for the whole test: no place comes
            poller = site_poller(
                site, writer, start_within_s=0.01, first_poll_gate=gate, first_poll_patience_s=0.3
            )
            began = asyncio.get_running_loop().time()
            async with running(poller.run):
                await eventually(lambda: poller.cursor is not None, timeout=10, what="first poll")
                waited = asyncio.get_running_loop().time() - began
                polled = device.requests["GET /alarms"]
                await eventually(
                    lambda: device.requests["GET /alarms"] >= polled + 3, timeout=10, what="polls"
                )
            assert gate.locked() and gate.waiting == 0, "in without a place; none taken"
        assert 0.25 <= waited < 3  # (a timer may fire up to the clock resolution early)
