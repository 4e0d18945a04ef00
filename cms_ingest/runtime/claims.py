"""The claim loop shared by the media fetcher and the action worker.

Both work a queue table the same way: wake on a signal or a timer, claim a batch of due rows
(for the sites this daemon holds), run each as its own task with at most `workers` at once,
let each settle its row, and at shutdown hand back or settle what is still claimed. A row
taken for work is a *claim* (`claimed_until` in the table); "lease" is a site's only.

What differs is the job: `ClaimedJobs` is the port a kind of work implements, and
`ClaimLoop` runs it. Deadlines are per step of a job (a media status, a download, an action
attempt), so the loop offers them as `within()` rather than imposing one on a whole job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from cms_ingest.runtime.tasks import sleep_or_stop, wake_or_stop


class Claimed(Protocol):
    """A claimed row: anything with the row's id."""

    @property
    def id(self) -> int: ...


Job = TypeVar("Job", bound=Claimed)


class ClaimedJobs(Protocol[Job]):
    """One kind of queued work, as the claim loop drives it."""

    async def before_claim(self) -> None:
        """Each turn, before claiming: tidy the queue (never raises; log and go on)."""

    async def claim(self, limit: int) -> list[Job]:
        """Up to `limit` due rows, claimed for this worker; [] when none or on failure."""

    async def run_one(self, job: Job) -> None:
        """Carry one job out and settle its row (done, retry later, failed)."""

    async def not_settled(self, job: Job, error: Exception) -> None:
        """`run_one` raised: the row's outcome was not written (never raises)."""

    async def release(self, jobs: Sequence[Job]) -> None:
        """Shutdown: these jobs were cut short and may still be claimed (never raises)."""

    async def renew(self, jobs: Sequence[Job]) -> None:
        """Keep the claims of these running jobs alive, every `renew_every_s` when the
        timings set it (never raises)."""


@dataclass(frozen=True, slots=True)
class ClaimTimings:
    """How a claim loop paces itself and stops."""

    workers: int  # jobs running at once
    idle_s: float  # the longest wait between turns without a wake-up
    # Shutdown: running jobs get `stop_grace_s` to finish, then are cancelled and get
    # `cancel_wait_s` to unwind (settle or clean up) before the loop returns.
    stop_grace_s: float
    cancel_wait_s: float
    # Short claims renewed while their jobs run, so a dead worker's rows come back soon:
    # `renew` is called this often with the jobs in flight (None: claims are not renewed).
    renew_every_s: float | None = None


class ClaimLoop(Generic[Job]):
    """Claims jobs of one kind and runs each as a task named `<name>:<row id>`."""

    def __init__(self, jobs: ClaimedJobs[Job], *, name: str, timings: ClaimTimings) -> None:
        self._jobs = jobs
        self._name = name
        self._timings = timings
        self._wake = asyncio.Event()
        self._running: dict[asyncio.Task[None], Job] = {}

    @property
    def running(self) -> int:
        """Jobs in flight now."""
        return len(self._running)

    def running_ids(self) -> set[int]:
        """The ids of the rows whose jobs are in flight now."""
        return {job.id for job in self._running.values()}

    def wake(self) -> None:
        """Rows were added or became due: claim now rather than at the next idle tick."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        stop_renewing = asyncio.Event()
        renewing = asyncio.create_task(
            self._renew_claims(stop_renewing), name=f"{self._name}:renew"
        )
        try:
            while not stop.is_set():
                await self._jobs.before_claim()
                await self._claim_and_start()
                # New rows, a free slot, shutdown, or the periodic look for due retries.
                await wake_or_stop(self._wake, stop, self._timings.idle_s)
        finally:
            await self._stop_running(stop_renewing, renewing)

    async def _renew_claims(self, stop: asyncio.Event) -> None:
        every = self._timings.renew_every_s
        if every is None:
            return
        while not await sleep_or_stop(every, stop):
            if self._running:
                await self._jobs.renew(list(self._running.values()))

    async def _claim_and_start(self) -> None:
        free = self._timings.workers - len(self._running)
        if free <= 0:
            return
        for job in await self._jobs.claim(free):
            task = asyncio.create_task(self._run_one(job), name=f"{self._name}:{job.id}")
            self._running[task] = job
            task.add_done_callback(self._finished)

    async def _run_one(self, job: Job) -> None:
        try:
            await self._jobs.run_one(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one job's failure must not end the loop or other jobs
            await self._jobs.not_settled(job, exc)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()  # a slot is free

    async def _stop_running(
        self, stop_renewing: asyncio.Event, renewing: asyncio.Task[None]
    ) -> None:
        """Shutdown: let running jobs finish within the grace (their claims still renewed),
        cancel the rest, end the renewal, and hand the cancelled ones to `release`."""
        running = dict(self._running)
        cut_short = set(running)
        if cut_short and self._timings.stop_grace_s > 0:
            _done, cut_short = await asyncio.wait(cut_short, timeout=self._timings.stop_grace_s)
        for task in cut_short:
            task.cancel()
        if cut_short:
            await asyncio.wait(cut_short, timeout=self._timings.cancel_wait_s)
        # Renewal ends before `release`, its last write done: one landing after it would
        # claim the handed-back rows again (seen: media rows still claimed after a SIGTERM
        # on a loaded machine).
        stop_renewing.set()
        _done, late = await asyncio.wait({renewing}, timeout=self._timings.cancel_wait_s)
        for task in late:  # a renewal stuck on a failing database: nothing to land
            task.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
        if cut_short:
            await self._jobs.release([running[task] for task in cut_short])


class ClaimWorker(ClaimedJobs[Job]):
    """A kind of work that is its own job source (a subclass implements the methods of
    `ClaimedJobs`): builds its loop and offers `wake` and `run`, what the daemon calls."""

    def __init__(self, *, name: str, timings: ClaimTimings) -> None:
        self._loop = ClaimLoop(self, name=name, timings=timings)

    def wake(self) -> None:
        """Rows were added or became due (or a notification may have been lost): claim now
        rather than at the next idle tick."""
        self._loop.wake()

    async def run(self, stop: asyncio.Event) -> None:
        await self._loop.run(stop)

    async def renew(self, jobs: Sequence[Job]) -> None:
        """Claims not renewed by default (see `ClaimTimings.renew_every_s`)."""


class DeadlinePassed(Exception):
    """A step of a job ran past its deadline (`within`)."""


@contextlib.asynccontextmanager
async def within(seconds: float, passed: DeadlinePassed) -> AsyncIterator[None]:
    """Run the block for at most `seconds`; past that, raise `passed`.

    A `TimeoutError` the block raises by itself (a client's own timeout) is not the
    deadline: it passes through unchanged, to be handled as the bug it is."""
    guard = asyncio.timeout(seconds)
    try:
        async with guard:
            yield
    except TimeoutError:
        if not guard.expired():
            raise
        raise passed from None
