"""The action worker, driven directly on the in-memory storage adapter.

Actions are queued as an operator's software queues them (`enqueue_action`) and fired at a
simulated Davantis site over HTTP, whose actions are all idempotent, or at `SirenBox`, a
scripted device of a vendor registered for these tests whose siren must never sound twice.
The storage's clock is a manual one: a retry waits until the clock passes its backoff, a claim
left by a worker that died runs out when the clock is moved past it, `not_after` passes when
the clock does. (`test_actions.py` covers every Davantis kind through a whole daemon,
`test_claim_loop.py` the claim renewal and the stop of a running attempt.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from cms_ingest.config import ActionsConfig, SiteConfig
from cms_ingest.db.memory import EXPIRED_ERROR, ManualClock, MemoryStorage
from cms_ingest.domain import Action, ActionResult, MediaKind
from cms_ingest.runtime.actions import ActionWorker
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.vendors import registered
from cms_ingest.vendors.base import (
    ActionSpec,
    AuthenticationFailed,
    BadDeviceResponse,
    Cursor,
    Download,
    MediaProbe,
    PollResult,
    SiteOptions,
    VendorContext,
)
from cms_ingest.vendors.registry import USERNAME_AND_PASSWORD, Vendor
from tests.conftest import eventually
from tests.support import (
    NO_DATABASE,
    app_config,
    clock_at_now,
    davantis_site,
    running,
    site_registry,
)

ACTIONS = ActionsConfig(sweep_interval_s=0.1, running_timeout_s=5.0, max_attempts=3)
FINAL = ("succeeded", "failed", "expired")


@dataclass
class Queue:
    """The storage with its clock, and the worker over one site `s`."""

    memory: MemoryStorage
    sites: SiteRegistry

    @property
    def clock(self) -> ManualClock:
        assert isinstance(self.memory.clock, ManualClock)
        return self.memory.clock

    def worker(self) -> ActionWorker:
        return ActionWorker(
            self.memory, self.sites, config=ACTIONS, held=lambda: list(self.sites.by_id)
        )

    async def enqueue(self, kind: str, target: str, **fields: Any) -> int:
        return await self.memory.enqueue_action(
            site_id="s", kind=kind, target=target, params={}, requested_by="test", **fields
        )

    def row(self, action_id: int) -> Any:
        return self.memory.actions[action_id]

    async def settled(self, action_id: int) -> Any:
        row = self.row(action_id)
        await eventually(lambda: row.state in FINAL, what=f"action {action_id} settled")
        return row


@contextlib.asynccontextmanager
async def davantis(
    tmp_path: Path, memory: MemoryStorage | None = None
) -> AsyncIterator[tuple[DavantisSite, DavantisSimulator, Queue]]:
    device = DavantisSite()
    async with DavantisSimulator({"default": device}) as sim:
        config = app_config(NO_DATABASE, tmp_path, [davantis_site("s", sim.url())])
        async with site_registry(config) as sites:
            yield device, sim, Queue(memory or MemoryStorage(clock=clock_at_now()), sites)


# ---------------------------------------------------------------------- Davantis


async def test_an_action_succeeds_and_a_refusal_is_final(tmp_path: Path) -> None:
    async with davantis(tmp_path) as (device, _sim, queue):
        relay = await queue.enqueue("relay", "1")
        keyswitch = await queue.enqueue("arm", "2")  # an input wired to a hardware keyswitch
        async with running(queue.worker().run):
            done = await queue.settled(relay)
            refused = await queue.settled(keyswitch)
        assert (done.state, done.attempts, done.error) == ("succeeded", 1, None)
        assert done.result["status"] == 200 and done.claimed_until is None
        assert device.relay_log == [(1, True)]
        assert (refused.state, refused.attempts) == ("failed", 1), "a refusal is not retried"
        assert "controlled by hardware" in refused.error
        assert device.input_log == []


async def test_an_idempotent_action_of_unknown_outcome_is_retried_after_its_backoff(
    tmp_path: Path,
) -> None:
    async def broken(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        return web.json_response({"fault": {"faultstring": "busy"}}, status=503)

    async with davantis(tmp_path) as (device, sim, queue):
        sim.respond("PATCH", "/relays/1", broken)  # the first attempt only
        action_id = await queue.enqueue("relay", "1")
        worker = queue.worker()
        async with running(worker.run):
            row = queue.row(action_id)
            await eventually(lambda: row.error is not None, what="the first attempt")
            assert (row.state, row.attempts) == ("queued", 1)
            assert "BadDeviceResponse" in row.error and "503" in row.error
            backoff = (row.next_attempt_at - queue.clock.now).total_seconds()
            assert 0.7 <= backoff <= 1.0, backoff  # actions.RETRY after one attempt

            await asyncio.sleep(0.3)  # swept three times; the storage's clock has not moved
            assert (row.state, row.attempts) == ("queued", 1)

            queue.clock.advance(1.0)
            worker.wake()
            await queue.settled(action_id)
        assert (row.state, row.attempts, row.error) == ("succeeded", 2, None)
        assert device.relay_log == [(1, True)]


async def test_a_queued_action_past_not_after_expires_unfired(tmp_path: Path) -> None:
    async with davantis(tmp_path) as (device, _sim, queue):
        action_id = await queue.enqueue(
            "relay", "1", not_after=queue.clock.now + timedelta(seconds=5)
        )
        queue.clock.advance(10)  # no worker ran meanwhile
        async with running(queue.worker().run):
            row = await queue.settled(action_id)
        assert (row.state, row.attempts, row.error) == ("expired", 0, EXPIRED_ERROR)
        assert device.relay_log == []


async def test_an_action_whose_not_after_passes_once_claimed_is_not_fired(
    tmp_path: Path,
) -> None:
    """Claimed just before `not_after` (by the storage's clock), fired just after it (by
    the worker's): the worker looks again and does not fire late."""
    now = datetime.now(UTC)
    memory = MemoryStorage(clock=ManualClock(now - timedelta(seconds=60)))
    async with davantis(tmp_path, memory) as (device, _sim, queue):
        action_id = await queue.enqueue("relay", "1", not_after=now - timedelta(seconds=1))
        async with running(queue.worker().run):
            row = await queue.settled(action_id)
        assert (row.state, row.attempts) == ("expired", 1)
        assert row.error == "not_after passed before it could be fired"
        assert device.relay_log == []


async def test_an_idempotent_action_left_running_by_a_dead_worker_is_fired_again(
    tmp_path: Path,
) -> None:
    async with davantis(tmp_path) as (device, _sim, queue):
        action_id = await queue.enqueue("relay", "1")
        # Another daemon's worker claimed it, then died mid-attempt.
        [claimed] = await queue.memory.claim_actions(limit=1, claim_s=30, owner="gone:1")
        worker = queue.worker()
        async with running(worker.run):
            row = queue.row(action_id)
            await asyncio.sleep(0.3)  # swept three times: the claim has not run out
            assert (row.state, row.claimed_by) == ("running", "gone:1")
            queue.clock.advance(31)
            worker.wake()
            await queue.settled(action_id)
        assert (row.state, row.attempts) == ("succeeded", 2)
        assert device.relay_log == [(1, True)]
        assert claimed.id == action_id


# ---------------------------------------------------------------------- a siren box


@dataclass
class SirenBox:
    """A scripted device with a siren (not idempotent: sounding it twice is two alarms for
    the neighbours). Each attempt takes the next scripted outcome: an exception it raises, or
    None to sound the siren."""

    context: VendorContext
    options: SiteOptions
    vendor: str = "sirenbox"
    actions: Mapping[str, ActionSpec] = field(
        default_factory=lambda: {"siren": ActionSpec(idempotent=False)}
    )
    script: list[Exception | None] = field(default_factory=list)
    attempts: int = 0
    sounded: list[str] = field(default_factory=list)
    busy: asyncio.Event | None = None  # when set: an attempt waits for it before sounding

    async def poll(self, cursor: Cursor | None) -> PollResult:
        return PollResult(alarms=[], cursor=cursor)

    async def media_status(self, kind: MediaKind, locator: Mapping[str, Any]) -> MediaProbe:
        return MediaProbe(state="unavailable", detail="no camera")

    def download(self, path: str) -> AbstractAsyncContextManager[Download]:
        raise NotImplementedError("no media")

    async def perform(self, action: Action) -> ActionResult:
        self.attempts += 1
        if self.busy is not None:
            await self.busy.wait()
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        self.sounded.append(action.target)
        return ActionResult(result={"sounded": action.target})

    async def close(self) -> None:
        return None


SIRENBOX = Vendor(
    name="sirenbox",
    client=SirenBox,
    options=SiteOptions,
    default_poll_interval_s=1.0,
    credentials=USERNAME_AND_PASSWORD,
    actions={"siren": ActionSpec(idempotent=False)},
)


@pytest.fixture
def sirenbox() -> Iterator[Vendor]:
    with registered(SIRENBOX) as vendor:
        yield vendor


@contextlib.asynccontextmanager
async def siren_site(tmp_path: Path) -> AsyncIterator[tuple[SirenBox, Queue]]:
    site = SiteConfig(
        id="s",
        vendor="sirenbox",
        url="http://127.0.0.1:9",
        username="cms",
        password=SecretStr("secret"),
    )
    async with site_registry(app_config(NO_DATABASE, tmp_path, [site])) as sites:
        box = sites.by_id["s"].client
        assert isinstance(box, SirenBox)
        yield box, Queue(MemoryStorage(clock=clock_at_now()), sites)


@pytest.mark.usefixtures("sirenbox")
async def test_an_action_of_unknown_outcome_that_is_not_idempotent_is_not_retried(
    tmp_path: Path,
) -> None:
    async with siren_site(tmp_path) as (box, queue):
        box.script = [BadDeviceResponse("answered 502 after the request was sent")]
        action_id = await queue.enqueue("siren", "yard")
        async with running(queue.worker().run):
            row = await queue.settled(action_id)
        assert (row.state, row.attempts, box.attempts) == ("failed", 1, 1)
        assert "outcome unknown, not retried (it could fire twice)" in row.error


async def retry_each(queue: Queue, worker: ActionWorker, box: SirenBox, row: Any, n: int) -> None:
    """Let `n` attempts of `row` settle, moving the clock past each one's backoff."""
    for attempt in range(box.attempts + 1, box.attempts + n + 1):

        def settled(attempt: int = attempt) -> bool:
            return box.attempts == attempt and row.state != "running"

        await eventually(settled, what=f"attempt {attempt} settled")
        queue.clock.advance(5.0)  # past RETRY's backoff after up to three attempts
        worker.wake()


@pytest.mark.usefixtures("sirenbox")
async def test_an_attempt_that_surely_never_reached_the_device_is_retried_up_to_the_limit(
    tmp_path: Path,
) -> None:
    async with siren_site(tmp_path) as (box, queue):
        worker = queue.worker()
        async with running(worker.run):
            box.script = [AuthenticationFailed("login refused")] * 2  # then it sounds
            first = queue.row(await queue.enqueue("siren", "yard"))
            await retry_each(queue, worker, box, first, 2)
            await queue.settled(first.id)
            assert (first.state, first.attempts, box.sounded) == ("succeeded", 3, ["yard"])

            box.script = [AuthenticationFailed("login refused")] * ACTIONS.max_attempts
            second = queue.row(await queue.enqueue("siren", "gate"))
            await retry_each(queue, worker, box, second, ACTIONS.max_attempts - 1)
            await queue.settled(second.id)
        assert (second.state, second.attempts) == ("failed", ACTIONS.max_attempts)
        assert f"gave up after {ACTIONS.max_attempts} attempts" in second.error
        assert box.sounded == ["yard"]


@pytest.mark.usefixtures("sirenbox")
async def test_an_action_left_running_by_a_dead_worker_that_is_not_idempotent_fails(
    tmp_path: Path,
) -> None:
    async with siren_site(tmp_path) as (box, queue):
        action_id = await queue.enqueue("siren", "yard")
        await queue.memory.claim_actions(limit=1, claim_s=30, owner="gone:1")
        worker = queue.worker()
        async with running(worker.run):
            queue.clock.advance(31)
            worker.wake()
            row = await queue.settled(action_id)
        assert (row.state, box.attempts) == ("failed", 0), "never fired a second time"
        assert "stopped mid-attempt; outcome unknown, not retried" in row.error


@pytest.mark.usefixtures("sirenbox")
async def test_an_attempt_still_running_here_is_not_taken_for_a_dead_workers(
    tmp_path: Path,
) -> None:
    """The database was unreachable for longer than the claim (its renewals failed): the
    sweep finds the row running with its claim run out, but the attempt is this worker's own
    and goes on; settling it by rule would record a siren that sounds as failed."""
    async with siren_site(tmp_path) as (box, queue):
        box.busy = asyncio.Event()
        action_id = await queue.enqueue("siren", "yard")
        worker = queue.worker()
        found: list[int] = []  # the running rows each sweep found with their claim run out
        stale = queue.memory.stale_running_actions

        async def sweep(site_ids: Any = None) -> list[Action]:
            rows = await stale(site_ids)
            found.append(len(rows))
            return rows

        queue.memory.stale_running_actions = sweep  # type: ignore[method-assign]
        async with running(worker.run):
            row = queue.row(action_id)
            await eventually(lambda: box.attempts == 1, what="the attempt started")
            queue.clock.advance(ACTIONS.running_timeout_s + 1)  # the claim ran out
            found.clear()
            worker.wake()
            await eventually(lambda: found.count(1) >= 3, what="three sweeps that found it")
            assert row.state == "running", "settled by rule while it still ran"
            box.busy.set()
            await queue.settled(action_id)
        assert (row.state, box.sounded) == ("succeeded", ["yard"])


async def test_actions_queued_for_a_site_are_claimed_as_soon_as_it_is_taken(
    tmp_path: Path,
) -> None:
    """A site another daemon held (a take-over, a restart, a database failover): its queued
    actions run as soon as the poller set starts it here, not at the next sweep (60 s)."""
    async with davantis(tmp_path) as (_device, _sim, queue):
        memory = queue.memory
        await memory.ensure_sites(["s"])
        [theirs] = await memory.acquire("other", 600, ["s"], 1)
        tasks = TaskSupervisor()
        writer = AlarmWriter(memory, media_deadline_of=lambda _site: 60.0)
        config = app_config(NO_DATABASE, tmp_path, [davantis_site("s", "http://127.0.0.1:1")])
        # Its poller polls nothing useful here: what counts is that the site is held.

        def wake_the_worker() -> None:  # as the daemon wires them
            worker.wake()

        pollers = PollerSet(
            tasks,
            queue.sites,
            memory,
            writer,
            daemon_id="me",
            media_deadline_s=60.0,
            flood=config.flood,
            on_sites_taken=wake_the_worker,
        )
        slow_sweep = ACTIONS.model_copy(update={"sweep_interval_s": 60.0})
        worker = ActionWorker(memory, queue.sites, config=slow_sweep, held=pollers.held_ids)
        async with running(worker.run):
            action_id = await queue.enqueue("relay", "1")
            await asyncio.sleep(0.5)
            assert queue.row(action_id).state == "queued", "another daemon's site"
            await memory.release("other", {"s": theirs.epoch})
            [ours] = await memory.acquire("me", 600, ["s"], 1)
            taken_at = asyncio.get_running_loop().time()
            assert await pollers.start({"s": ours.epoch}) == {"s"}
            row = await queue.settled(action_id)
            assert row.state == "succeeded"
            assert asyncio.get_running_loop().time() - taken_at < 3.0
            await tasks.stop_all(timeout=2)
