"""Named, tracked, supervised background tasks.

Every long-running part of the daemon (each site's poller, the alarm writer, the media
fetcher, the action worker, the LISTEN connection, the HTTP server) runs as a task the
supervisor knows by name. A task that raises is logged with its traceback and started again
after a backoff; a task that returns while the daemon is not stopping is treated the same way.
One task's death never touches another.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import structlog

from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy

log = structlog.get_logger("cms_ingest.tasks")

RESTART_POLICY = RetryPolicy(base=1.0, factor=2.0, cap=60.0, jitter=0.3)
HEALTHY_AFTER_S = 60.0  # a task that ran this long before dying starts its backoff afresh
# Work over every site of a hand-off or a start (thousands) is done this many at a time,
# the event loop turning in between: ~50 µs a site makes a slice a few milliseconds, where
# 5,000 at once held every other site's poll for a quarter of a second or more.
SLICE = 200

T = TypeVar("T")


async def in_slices(items: Sequence[T], size: int = SLICE) -> AsyncIterator[Sequence[T]]:
    """`items` a slice at a time, letting the event loop turn between two slices."""
    for start in range(0, len(items), size):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + size]


class Flag(asyncio.Event):
    """An `asyncio.Event` that holds no waiter queue until someone waits on it.

    Every site has two (its poller's stop signal and its "polled once" flag): the standard
    Event makes a deque for its waiters up front, 860 bytes an Event where this is 100.
    Same behaviour; a subclass so it goes wherever an Event goes, with every method its own
    (Event's private state is never set up or read).
    """

    def __init__(self) -> None:  # not Event's: that is the deque this class avoids
        self._flag_set = False
        self._flag_waiters: list[asyncio.Future[bool]] | None = None

    def __repr__(self) -> str:
        state = "set" if self._flag_set else "unset"
        return f"<{type(self).__name__} {state}, waiters:{self.waiting}>"

    @property
    def waiting(self) -> int:
        """Waiters (and a StopSignal's sleepers) not woken yet."""
        return len(self._flag_waiters or ())

    def is_set(self) -> bool:
        return self._flag_set

    def set(self) -> None:
        if self._flag_set:
            return
        self._flag_set = True
        waiters, self._flag_waiters = self._flag_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._flag_set = False

    async def wait(self) -> Literal[True]:
        if self._flag_set:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enlist(waiter)
        try:
            await waiter
        finally:
            self._dismiss(waiter)
        return True

    def _enlist(self, waiter: asyncio.Future[bool]) -> None:
        """`waiter` is resolved with True by `set` (unless something resolves it first)."""
        if self._flag_waiters is None:
            self._flag_waiters = []
        self._flag_waiters.append(waiter)

    def _dismiss(self, waiter: asyncio.Future[bool]) -> None:
        if self._flag_waiters is not None and waiter in self._flag_waiters:
            self._flag_waiters.remove(waiter)


class StopSignal(Flag):
    """A task's stop event that a sleeper can wait on cheaply: every poller sleeps on its
    own once a second, and `wait_for(stop.wait(), delay)` costs a task, a cancellation and
    two extra turns of the loop each time (thousands of sites, thousands a second)."""

    async def sleep(self, delay: float) -> bool:
        """Sleep `delay` seconds unless set first; True when set."""
        if self.is_set():
            return True
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(delay, _wake_sleeper, sleeper)
        self._enlist(sleeper)
        try:
            return await sleeper
        finally:
            timer.cancel()
            self._dismiss(sleeper)


def _wake_sleeper(sleeper: asyncio.Future[bool]) -> None:
    if not sleeper.done():
        sleeper.set_result(False)


async def sleep_or_stop(delay: float, stop: asyncio.Event) -> bool:
    """Sleep `delay` seconds unless `stop` is set first; True when stopping."""
    if stop.is_set():
        return True
    if delay <= 0:
        return False
    if isinstance(stop, StopSignal):
        return await stop.sleep(delay)
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        return False
    return True


async def wake_or_stop(wake: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
    """Wait until `wake` or `stop` is set, or `timeout` passes; then clear `wake`, so the
    next call waits for the next wake-up."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    wake.clear()


class Gate:
    """At most `room` holders at once, the others waiting in order (`async with gate:`);
    `async with gate.within(patience_s):` waits that long at most, then goes in anyway.

    asyncio.Semaphore would do for the first, but thousands of pollers wait on this gate at
    a start, and a stop cancels them all at once: a Semaphore takes each cancelled waiter out
    of its queue by a search through the queue (quadratic), this one by a dict lookup."""

    def __init__(self, room: int) -> None:
        self._free = room
        # Each waiter's future: True when handed a place, False when its patience ran out.
        self._waiters: OrderedDict[asyncio.Future[bool], None] = OrderedDict()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def locked(self) -> bool:
        return self._free == 0

    async def __aenter__(self) -> None:
        await self._enter(patience_s=None)

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    @asynccontextmanager
    async def within(self, patience_s: float) -> AsyncIterator[bool]:
        """In with a place if one comes within `patience_s`, else in without one (yields
        which): the gate bounds a crowd's pace, it must not starve anyone when the loop is
        too busy for the holders to be quick."""
        placed = await self._enter(patience_s)
        try:
            yield placed
        finally:
            if placed:
                self._release()

    async def _enter(self, patience_s: float | None) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters[waiter] = None
        timer = None if patience_s is None else loop.call_later(patience_s, self._give_up, waiter)
        try:
            return await waiter  # `_release` hands its place over by setting True
        except asyncio.CancelledError:
            if waiter in self._waiters:
                del self._waiters[waiter]
            elif waiter.done() and not waiter.cancelled() and waiter.result():
                self._release()  # handed a place as it was cancelled: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _give_up(self, waiter: asyncio.Future[bool]) -> None:
        if waiter in self._waiters:  # still waiting (not handed a place, not cancelled)
            del self._waiters[waiter]
            waiter.set_result(False)

    def _release(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1


@dataclass(frozen=True, slots=True)
class Interrupt:
    """When stopping tasks: cancel those `may(name)` allows once `after_s` has passed."""

    after_s: float
    may: Callable[[str], bool]
    reason: str


@dataclass(slots=True)
class _Supervised:
    name: str
    task: asyncio.Task[None]
    stop: asyncio.Event  # this task's own stop signal


class TaskSupervisor:
    """Owns the daemon's tasks by name. Shutdown is ordered by the caller, group by group
    (pollers before the writer they commit through), with `stop_matching`."""

    def __init__(self, *, metrics: Metrics | None = None) -> None:
        self._tasks: dict[str, _Supervised] = {}
        self._metrics = metrics if metrics is not None else Metrics()

    def start(
        self,
        name: str,
        body: Callable[[asyncio.Event], Awaitable[None]],
        *,
        policy: RetryPolicy = RESTART_POLICY,
    ) -> None:
        """Run `body(stop)` as task `name`, restarting it when it dies.

        `body` must return soon after its `stop` event is set.
        """
        if name in self._tasks and not self._tasks[name].task.done():
            raise ValueError(f"task {name!r} is already running")
        stop = StopSignal()
        task = asyncio.create_task(self._guard(name, body, stop, policy), name=name)
        self._tasks[name] = _Supervised(name, task, stop)

    @property
    def names(self) -> list[str]:
        return sorted(name for name, entry in self._tasks.items() if not entry.task.done())

    async def _guard(
        self,
        name: str,
        body: Callable[[asyncio.Event], Awaitable[None]],
        stop: asyncio.Event,
        policy: RetryPolicy,
    ) -> None:
        structlog.contextvars.bind_contextvars(task=name)
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                await body(stop)
                if stop.is_set():
                    return
                log.error("task_exited", detail="returned while the daemon runs; restarting")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task_crashed")
            self._metrics.task_restarts.labels(task=name.split(":", 1)[0]).inc()
            if time.monotonic() - started > HEALTHY_AFTER_S:
                failures = 0
            failures += 1
            if await sleep_or_stop(policy.delay(failures), stop):
                return

    async def stop_tasks(
        self,
        names: Iterable[str],
        *,
        timeout: float,
        interrupt: Interrupt | None = None,
        gentle: bool = True,
    ) -> None:
        """Ask the named tasks to stop, wait up to `timeout`, then cancel what is left.

        `gentle`: the tasks are woken and cut short a slice per turn of the loop, so the
        tasks that go on (a hand-off's other sites) are not held up; a shutdown, where
        nothing goes on, does it all at once, which is quicker in a busy loop.

        With `interrupt`, the tasks still running after its `after_s` that it says may be
        interrupted (`may(name)`: nothing would be lost) are cancelled then, without waiting
        for the rest of the timeout: a poll in flight, say, while its commit would not be."""
        entries = [self._tasks[name] for name in names if name in self._tasks]
        # Each stop wakes its task in the loop's next turn: thousands at once would all run
        # in that one turn.
        size = SLICE if gentle else max(1, len(entries))
        async for part in in_slices(entries, size):
            for entry in part:
                entry.stop.set()
        tasks = [entry.task for entry in entries]
        if interrupt is not None and tasks:
            await asyncio.wait(tasks, timeout=interrupt.after_s)
            cut = [e.task for e in entries if not e.task.done() and interrupt.may(e.name)]
            async for tasks_part in in_slices(cut, size):
                for task in tasks_part:
                    task.cancel()
            if cut:
                log.info("tasks_interrupted", count=len(cut), reason=interrupt.reason)
        await _wait_or_cancel(tasks, timeout)
        for entry in entries:
            self._tasks.pop(entry.name, None)

    async def stop_matching(
        self,
        prefix: str,
        *,
        timeout: float,
        interrupt: Interrupt | None = None,
        gentle: bool = True,
    ) -> None:
        await self.stop_tasks(
            [n for n in list(self._tasks) if n.startswith(prefix)],
            timeout=timeout,
            interrupt=interrupt,
            gentle=gentle,
        )

    async def stop_all(self, *, timeout: float) -> None:
        await self.stop_tasks(list(self._tasks), timeout=timeout)


async def _wait_or_cancel(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.warning("task_cancelled_at_shutdown", task=task.get_name())
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=2.0)
