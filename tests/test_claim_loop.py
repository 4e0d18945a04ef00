"""The claim loop (`runtime/claims.py`) and its two users, without a daemon.

The loop's own tests drive it with `Queue`, a small job source written here: it implements
the loop's port (`ClaimedJobs`), so nothing of ours is mocked. The media fetcher and the
action worker are then run directly against the real store and a simulated Davantis site.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from cms_ingest.config import ActionsConfig, AppConfig
from cms_ingest.db.store import Store
from cms_ingest.runtime.actions import ActionWorker
from cms_ingest.runtime.claims import ClaimLoop, ClaimTimings, DeadlinePassed, within
from cms_ingest.runtime.media import MediaFetcher
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, final

# ---------------------------------------------------------------------- the loop alone


@dataclass(frozen=True)
class Job:
    id: int
    seconds: float = 0.0  # how long carrying it out takes
    crashes: bool = False  # settling it fails (as when the database is gone)


class Queue:
    """Jobs waiting in memory; records what the loop did with each."""

    def __init__(self, *jobs: Job, deadline_s: float = 5.0) -> None:
        self.due = list(jobs)
        self.deadline_s = deadline_s
        self.limits: list[int] = []  # what each claim asked for
        self.started: list[int] = []
        self.settled: dict[int, str] = {}
        self.released: list[int] = []
        self.running_now = 0
        self.most_at_once = 0
        self.on_claim: asyncio.Event | None = None  # set after a claim that took something
        self.renewals: list[list[int]] = []  # the jobs of each claim renewal

    def add(self, *jobs: Job) -> None:
        self.due.extend(jobs)

    async def before_claim(self) -> None:
        pass

    async def claim(self, limit: int) -> list[Job]:
        self.limits.append(limit)
        taken, self.due = self.due[:limit], self.due[limit:]
        if taken and self.on_claim is not None:
            self.on_claim.set()
        return taken

    async def run_one(self, job: Job) -> None:
        self.started.append(job.id)
        self.running_now += 1
        self.most_at_once = max(self.most_at_once, self.running_now)
        try:
            async with within(self.deadline_s, DeadlinePassed(f"job {job.id} is late")):
                await asyncio.sleep(job.seconds)
            if job.crashes:
                raise RuntimeError("the outcome could not be written")
            self.settled[job.id] = "done"
        except DeadlinePassed as exc:
            self.settled[job.id] = f"timed out: {exc}"
        finally:
            self.running_now -= 1

    async def not_settled(self, job: Job, error: Exception) -> None:
        self.settled[job.id] = f"not settled: {error}"

    async def release(self, jobs: Sequence[Job]) -> None:
        self.released.extend(job.id for job in jobs)

    async def renew(self, jobs: Sequence[Job]) -> None:
        self.renewals.append(sorted(job.id for job in jobs))


def timings(
    workers: int = 4, idle_s: float = 30.0, stop_grace_s: float = 0.0, cancel_wait_s: float = 1.0
) -> ClaimTimings:
    # A long idle wait by default: what happens sooner was caused by a wake-up.
    return ClaimTimings(
        workers=workers, idle_s=idle_s, stop_grace_s=stop_grace_s, cancel_wait_s=cancel_wait_s
    )


@contextlib.asynccontextmanager
async def looping(
    loop: ClaimLoop[Job], stop: asyncio.Event | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    stop = stop or asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_claims_of_running_jobs_are_renewed_while_they_run_and_only_then() -> None:
    queue = Queue(Job(1, seconds=0.9), Job(2, seconds=0.2))
    renewing = dataclasses.replace(timings(), renew_every_s=0.25)
    loop = ClaimLoop(queue, name="test", timings=renewing)
    async with looping(loop):
        loop.wake()
        await eventually(lambda: queue.settled.get(1) == "done", what="job 1 done")
        await asyncio.sleep(0.6)  # idle: nothing in flight, nothing to renew
    assert queue.renewals[0] == [1, 2] or queue.renewals[0] == [1]
    assert [1] in queue.renewals, "the long job renewed on its own once the short one ended"
    assert 2 <= len(queue.renewals) <= 4, queue.renewals  # about 0.9 s / 0.25 s, none idle

    unrenewed = Queue(Job(3, seconds=0.6))
    loop = ClaimLoop(unrenewed, name="test", timings=timings())
    async with looping(loop):
        loop.wake()
        await eventually(lambda: unrenewed.settled.get(3) == "done", what="job 3 done")
    assert unrenewed.renewals == [], "no renew_every_s: claims are not renewed"


class SlowRenewals(Queue):
    """A renewal is a write that lands whatever happens to its caller (as a query already
    sent to the database does); the order of writes is recorded."""

    def __init__(self, *jobs: Job) -> None:
        super().__init__(*jobs)
        self.writes: list[str] = []
        self.renewing = asyncio.Event()

    async def renew(self, jobs: Sequence[Job]) -> None:
        self.renewing.set()
        await asyncio.shield(self._land("renewed", 0.4))

    async def release(self, jobs: Sequence[Job]) -> None:
        await super().release(jobs)
        self.writes.append("released")

    async def _land(self, write: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        self.writes.append(write)


async def test_a_renewal_in_flight_at_stop_lands_before_the_rows_are_handed_back() -> None:
    queue = SlowRenewals(Job(1, seconds=30))
    renewing = dataclasses.replace(timings(cancel_wait_s=1.0), renew_every_s=0.1)
    loop = ClaimLoop(queue, name="test", timings=renewing)
    stop = asyncio.Event()
    async with looping(loop, stop):
        loop.wake()
        await asyncio.wait_for(queue.renewing.wait(), timeout=5)
        stop.set()  # while the renewal's write is on its way
    assert queue.released == [1]
    assert queue.writes == ["renewed", "released"], "a renewal landing last re-claims the row"


async def test_a_wake_up_claims_at_once_and_nothing_is_claimed_without_one() -> None:
    queue = Queue()
    loop = ClaimLoop(queue, name="test", timings=timings())
    async with looping(loop) as task:
        await eventually(lambda: queue.limits, what="the first claim")
        queue.add(Job(1))
        await asyncio.sleep(0.3)
        assert queue.started == [], "claimed without a wake-up, before the idle wait"
        started = time.monotonic()
        loop.wake()
        await eventually(lambda: queue.settled.get(1) == "done", what="job 1 done")
        assert time.monotonic() - started < 1.0
        assert not task.done()


async def test_the_idle_wait_looks_again_without_a_wake_up() -> None:
    queue = Queue()
    loop = ClaimLoop(queue, name="test", timings=timings(idle_s=0.2))
    async with looping(loop):
        await eventually(lambda: queue.limits, what="the first claim")
        queue.add(Job(1))
        await eventually(lambda: queue.settled.get(1) == "done", what="job 1", timeout=2)


async def test_a_job_past_its_deadline_is_settled_as_timed_out_and_the_loop_goes_on() -> None:
    queue = Queue(Job(1, seconds=30), Job(2), deadline_s=0.2)
    loop = ClaimLoop(queue, name="test", timings=timings(workers=1))
    async with looping(loop) as task:
        await eventually(lambda: 2 in queue.settled, what="job 2, after job 1", timeout=3)
        assert queue.settled == {1: "timed out: job 1 is late", 2: "done"}
        assert queue.started == [1, 2]
        # The job is settled, then the loop counts it out: a moment apart.
        await eventually(lambda: loop.running == 0, timeout=1, what="no job left running")
        assert not task.done()


async def test_no_more_jobs_run_at_once_than_there_are_workers() -> None:
    queue = Queue(*(Job(n, seconds=0.1) for n in range(10)))
    loop = ClaimLoop(queue, name="test", timings=timings(workers=3))
    async with looping(loop):
        await eventually(lambda: len(queue.settled) == 10, what="all 10 jobs", timeout=5)
    assert queue.most_at_once == 3
    assert max(queue.limits) == 3  # never claimed more than the free slots
    assert queue.released == []


async def test_stop_right_after_a_claim_hands_every_claimed_job_back() -> None:
    queue = Queue(Job(1, seconds=30), Job(2, seconds=30))
    stop = asyncio.Event()
    queue.on_claim = stop  # stop arrives with the claim, before any job got anywhere
    loop = ClaimLoop(queue, name="test", timings=timings())
    async with looping(loop, stop) as task:
        await asyncio.wait_for(task, timeout=5)
    assert queue.settled == {}
    assert sorted(queue.released) == [1, 2]
    assert loop.running == 0


async def test_stop_waits_out_the_grace_then_cancels_and_releases_the_rest() -> None:
    queue = Queue(Job(1, seconds=0.1), Job(2, seconds=30))
    loop = ClaimLoop(queue, name="test", timings=timings(stop_grace_s=0.5))
    stop = asyncio.Event()
    async with looping(loop, stop) as task:
        await eventually(lambda: queue.started == [1, 2], what="both jobs running")
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, timeout=5)
        assert time.monotonic() - started < 2.0
    assert queue.settled == {1: "done"}  # finished within the grace
    assert queue.released == [2]  # cut short: handed back


async def test_a_job_that_cannot_settle_is_reported_and_the_loop_goes_on() -> None:
    queue = Queue(Job(1, crashes=True), Job(2))
    loop = ClaimLoop(queue, name="test", timings=timings(workers=1))
    async with looping(loop) as task:
        await eventually(lambda: 2 in queue.settled, what="job 2, after job 1", timeout=3)
        assert queue.settled == {1: "not settled: the outcome could not be written", 2: "done"}
        assert not task.done()


async def test_a_timeout_raised_inside_the_block_is_not_the_deadline() -> None:
    with pytest.raises(TimeoutError):
        async with within(5.0, DeadlinePassed("never")):
            raise TimeoutError("the client's own")
    with pytest.raises(DeadlinePassed, match="late"):
        async with within(0.05, DeadlinePassed("late")):
            await asyncio.sleep(5)


# ---------------------------------------------------------------------- the real workers


@contextlib.asynccontextmanager
async def site_registry(config: AppConfig) -> AsyncIterator[SiteRegistry]:
    async with aiohttp.ClientSession() as session:
        sites = SiteRegistry(config, session)
        try:
            yield sites
        finally:
            await sites.close()


async def insert_media(db: asyncpg.Connection, site_id: str, alarm_id: int) -> int:
    """An alarm of `site_id` with a pending snapshot row, as a poll commit leaves them."""
    stored = await db.fetchval(
        "INSERT INTO alarms (site_id, vendor, source_id, event_type, occurred_at) "
        "VALUES ($1, 'davantis', $2, 'motion', now()) RETURNING id",
        site_id,
        str(alarm_id),
    )
    return int(
        await db.fetchval(
            "INSERT INTO alarm_media (alarm_id, kind, site_id, locator, deadline_at) "
            "VALUES ($1, 'snapshot', $2, $3, now() + interval '10 minutes') RETURNING id",
            stored,
            site_id,
            json.dumps({"alarm_id": alarm_id}),
        )
    )


def held_all(sites: SiteRegistry) -> Callable[[], list[str]]:
    """Every configured site held by this daemon, as the poller set says when it runs alone."""
    return lambda: list(sites.by_id)


async def media_row(db: asyncpg.Connection, media_id: int) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM alarm_media WHERE id = $1", media_id)


async def test_media_fetcher_downloads_a_ready_snapshot_and_fails_an_unknown_site(
    database_url: str, db: asyncpg.Connection, store: Store, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        site.add_alarms(1, video="unavailable")
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with site_registry(config) as sites:
            fetcher = MediaFetcher(
                store, sites, root=tmp_path / "media", config=config.media, held=held_all(sites)
            )
            ours = await insert_media(db, "d1", 1)
            stray = await insert_media(db, "gone", 1)
            stop = asyncio.Event()
            task = asyncio.create_task(fetcher.run(stop))
            try:
                ready = await eventually(
                    lambda: _in_state(db, ours, "ready"), what="the snapshot", timeout=10
                )
                failed = await eventually(
                    lambda: _in_state(db, stray, "failed"), what="the stray row", timeout=10
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=10)
    data = (tmp_path / "media" / ready["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ready["sha256"]
    assert ready["size_bytes"] == len(data) and ready["claimed_until"] is None
    assert "'gone' is not configured" in failed["last_error"]


async def _in_state(db: asyncpg.Connection, media_id: int, state: str) -> asyncpg.Record | None:
    row = await media_row(db, media_id)
    return row if row["state"] == state else None


async def test_media_fetcher_stopped_mid_download_hands_its_row_back_at_once(
    database_url: str, db: asyncpg.Connection, store: Store, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    downloading = asyncio.Event()

    async def endless(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff\xe0")
        downloading.set()
        await asyncio.sleep(60)
        return response

    async with DavantisSimulator({"default": site}) as sim:
        site.add_alarms(1, video="unavailable")
        sim.respond("GET", "/alarms/1/snapshot", endless)
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with site_registry(config) as sites:
            fetcher = MediaFetcher(
                store, sites, root=tmp_path / "media", config=config.media, held=held_all(sites)
            )
            media_id = await insert_media(db, "d1", 1)
            stop = asyncio.Event()
            task = asyncio.create_task(fetcher.run(stop))
            await asyncio.wait_for(downloading.wait(), timeout=10)
            assert (await media_row(db, media_id))["claimed_until"] is not None
            stop.set()
            started = time.monotonic()
            await asyncio.wait_for(task, timeout=10)
            assert time.monotonic() - started < 3.0
    row = await media_row(db, media_id)
    # Untouched but free: another worker takes it now, not when its claim would run out.
    assert (row["state"], row["attempts"], row["claimed_until"]) == ("pending", 0, None)


async def insert_action(db: asyncpg.Connection, kind: str, target: str, **params: Any) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO actions (site_id, kind, target, params) "
            "VALUES ('d1', $1, $2, $3) RETURNING id",
            kind,
            target,
            json.dumps(params),
        )
    )


@contextlib.asynccontextmanager
async def running_worker(
    store: Store, config: AppConfig
) -> AsyncIterator[tuple[ActionWorker, asyncio.Event, asyncio.Task[None]]]:
    async with site_registry(config) as sites:
        worker = ActionWorker(store, sites, config=config.actions, held=held_all(sites))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker, stop, task
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)


async def test_action_worker_keeps_the_claim_of_a_long_attempt_so_it_fires_once(
    database_url: str, db: asyncpg.Connection, store: Store, tmp_path: Path
) -> None:
    site = DavantisSite()

    async def slow(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        await asyncio.sleep(4.0)  # several claim periods long
        return await device()

    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("PATCH", "/relays/1", slow)
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url(), request_timeout_s=10)],
            # Claimed for 1.5 s at a time (renewed every 0.5 s), swept every 0.2 s: without
            # the renewals the sweep would take the attempt as crashed and fire it again.
            actions=ActionsConfig(sweep_interval_s=0.2, running_timeout_s=1.5),
        )
        async with running_worker(store, config):
            row = await final(db, await insert_action(db, "relay", "1"))
    assert row["state"] == "succeeded", row["error"]
    assert row["attempts"] == 1 and row["error"] is None
    assert site.relay_log == [(1, True)]


async def test_action_worker_stopped_mid_attempt_requeues_an_idempotent_action(
    database_url: str, db: asyncpg.Connection, store: Store, tmp_path: Path
) -> None:
    site = DavantisSite()
    sent = asyncio.Event()

    async def hangs(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        sent.set()
        await asyncio.sleep(60)
        return await device()

    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("PATCH", "/relays/1", hangs)
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url(), request_timeout_s=30)],
            # No claim renewal falls into the stop (a query cut short by the cancel).
            actions=ActionsConfig(sweep_interval_s=0.5, running_timeout_s=60),
        )
        async with running_worker(store, config) as (_worker, stop, task):
            action_id = await insert_action(db, "relay", "1")
            await asyncio.wait_for(sent.wait(), timeout=10)
            stop.set()
            started = time.monotonic()
            await asyncio.wait_for(task, timeout=15)
            # The stop grace (5 s) and no more: then it is cut short and settled by rule.
            assert 4.5 < time.monotonic() - started < 9.0
    row = await db.fetchrow("SELECT * FROM actions WHERE id = $1", action_id)
    assert (row["state"], row["claimed_by"]) == ("queued", None)
    assert row["error"] == "daemon stopped mid-attempt; will retry"
