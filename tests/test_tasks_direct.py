"""The task supervisor, driven directly: named tasks restarted with backoff when they crash or
return while the daemon runs, one task's death never touching another, and a stop that waits
for each task, then cancels what does not end in time. (`test_vendor_tasks.py` shows a
vendor's background task on it; this is the supervisor's own contract.)
"""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc

import pytest
from structlog.testing import capture_logs

from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.tasks import (
    SLICE,
    Flag,
    Gate,
    Interrupt,
    StopSignal,
    TaskSupervisor,
    in_slices,
    sleep_or_stop,
)

QUICK = RetryPolicy(base=0.05, factor=2.0, cap=1.0, jitter=0.0)  # 0.05, 0.1, 0.2 ... s


async def test_a_crashing_task_is_restarted_with_growing_backoff_and_others_go_on() -> None:
    supervisor = TaskSupervisor()
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    calm = asyncio.Event()

    async def crashes_three_times(stop: asyncio.Event) -> None:
        starts.append(loop.time())
        if len(starts) <= 3:
            raise RuntimeError("a bug")
        await stop.wait()

    async def steady(stop: asyncio.Event) -> None:
        calm.set()
        await stop.wait()

    with capture_logs() as logs:
        supervisor.start("steady", steady, policy=QUICK)
        supervisor.start("flaky", crashes_three_times, policy=QUICK)
        await asyncio.wait_for(calm.wait(), timeout=5)
        while len(starts) < 4:
            await asyncio.sleep(0.02)
        assert supervisor.names == ["flaky", "steady"]
        await supervisor.stop_all(timeout=2)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    for gap, backoff in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert backoff - 0.01 <= gap < backoff + 0.5, gaps
    crashed = [entry for entry in logs if entry["event"] == "task_crashed"]
    assert len(crashed) == 3 and all(entry["exc_info"] is True for entry in crashed)
    assert supervisor.names == []


async def test_a_task_that_returns_while_the_daemon_runs_is_restarted() -> None:
    supervisor = TaskSupervisor()
    runs = 0

    async def returns_at_once(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await stop.wait()

    with capture_logs() as logs:
        supervisor.start("quitter", returns_at_once, policy=QUICK)
        while runs < 2:
            await asyncio.sleep(0.02)
        with pytest.raises(ValueError, match="already running"):
            supervisor.start("quitter", returns_at_once, policy=QUICK)
        await supervisor.stop_all(timeout=2)
    assert [entry["event"] for entry in logs if entry["event"] == "task_exited"] == ["task_exited"]
    assert runs == 2


async def test_stop_waits_for_each_task_then_cancels_what_does_not_end() -> None:
    supervisor = TaskSupervisor()
    finished: list[str] = []

    async def polite(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # its last commit
        finished.append("polite")

    async def deaf(stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            finished.append("deaf cancelled")
            raise

    supervisor.start("polite", polite)
    supervisor.start("deaf", deaf)
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with capture_logs() as logs:
        await supervisor.stop_tasks(["polite", "deaf"], timeout=0.3)
    assert 0.25 <= loop.time() - began < 2.0
    assert sorted(finished) == ["deaf cancelled", "polite"]
    cancelled = [entry for entry in logs if entry["event"] == "task_cancelled_at_shutdown"]
    assert [entry["task"] for entry in cancelled] == ["deaf"]
    assert supervisor.names == []


async def test_a_stop_interrupts_what_may_be_cut_short_and_waits_for_the_rest() -> None:
    """Stopping pollers: one still waiting for its device is cancelled once `after_s` has
    passed; one committing is waited for; neither waits for the whole timeout."""
    supervisor = TaskSupervisor()
    finished: list[str] = []
    device = asyncio.Event()  # never set: a device that does not answer

    async def waits_for_its_device(stop: asyncio.Event) -> None:
        await device.wait()
        finished.append("poll")

    async def commits(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0.4)  # its commit, under way when the stop came
        finished.append("commit")

    supervisor.start("poller:a", waits_for_its_device)
    supervisor.start("poller:b", commits)
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        await supervisor.stop_matching(
            "poller:",
            timeout=5.0,
            interrupt=Interrupt(after_s=0.1, may=lambda name: name == "poller:a", reason="test"),
        )
    took = loop.time() - started
    assert finished == ["commit"], "the commit ended, the poll was cut short"
    assert 0.35 <= took < 2.0, f"{took:.2f} s: waited for the commit only"
    assert supervisor.names == []
    cut = [entry for entry in logs if entry["event"] == "tasks_interrupted"]
    assert cut == [
        {"event": "tasks_interrupted", "count": 1, "reason": "test", "log_level": "info"}
    ]
    assert not [entry for entry in logs if entry["event"] == "task_cancelled_at_shutdown"]


async def test_a_stop_signal_ends_a_sleep_at_once_and_a_sleep_ends_by_itself() -> None:
    stop = StopSignal()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sleep_or_stop(0.05, stop) is False
    assert loop.time() - started >= 0.049  # uvloop's clock and timers count whole milliseconds
    sleepers = [asyncio.ensure_future(sleep_or_stop(30, stop)) for _ in range(3)]
    cancelled = asyncio.ensure_future(sleep_or_stop(30, stop))
    await asyncio.sleep(0)  # one loop turn: each is asleep
    assert stop.waiting == 4
    cancelled.cancel()
    await asyncio.sleep(0)
    assert stop.waiting == 3, "a cancelled sleeper leaves"
    started = loop.time()
    stop.set()
    assert await asyncio.gather(*sleepers) == [True, True, True]
    assert loop.time() - started < 0.5
    assert cancelled.cancelled() and stop.waiting == 0, "nothing left behind"
    assert await sleep_or_stop(30, stop) is True, "already set: no sleep at all"


@pytest.mark.parametrize("kind", [Flag, StopSignal])
async def test_a_flag_behaves_as_an_asyncio_event(kind: type[Flag]) -> None:
    flag = kind()
    assert isinstance(flag, asyncio.Event) and not flag.is_set()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    cancelled = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)  # one loop turn: each has reached its wait
    assert flag.waiting == 4
    assert not any(waiter.done() for waiter in waiters), "nobody woken before the set"
    cancelled.cancel()
    await asyncio.sleep(0)
    assert flag.waiting == 3, "a cancelled waiter leaves"
    flag.set()
    flag.set()  # a second set changes nothing
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert cancelled.cancelled() and flag.is_set()
    assert await asyncio.wait_for(flag.wait(), 1) is True, "set: no wait at all"
    flag.clear()
    assert not flag.is_set()
    late = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert flag.waiting == 1 and not late.done(), "cleared: waits again"
    flag.set()
    assert await asyncio.wait_for(late, 1) is True
    assert "set" in repr(flag)


def test_a_flag_costs_a_fraction_of_an_event() -> None:
    """Every site holds two: the standard Event's waiter deque is most of its size."""

    def bytes_each(make: type[asyncio.Event]) -> float:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = [make() for _ in range(1000)]
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert len(kept) == 1000
        return (after - before) / 1000

    event, flag = bytes_each(asyncio.Event), bytes_each(Flag)
    assert flag < event / 2, f"Flag {flag:.0f} B, Event {event:.0f} B"


async def test_work_in_slices_lets_the_loop_turn_between_slices() -> None:
    """A hand-off's per-site work comes a slice at a time: a task that is ready meanwhile
    runs between two slices, not after all of them."""
    turns: list[int] = []  # how many items were done when the other task ran
    done = 0

    async def other() -> None:
        for _ in range(3):
            turns.append(done)
            await asyncio.sleep(0)

    other_task = asyncio.create_task(other())
    async for part in in_slices(list(range(5 * SLICE)), SLICE):
        done += len(part)
    await other_task
    assert turns[:3] == [SLICE, 2 * SLICE, 3 * SLICE]


async def test_stopping_many_tasks_wakes_them_a_slice_per_turn() -> None:
    """Thousands of pollers stopped together (a hand-off) would all wake in one turn of the
    loop: their stops are set a slice at a time, so others run in between."""
    supervisor = TaskSupervisor()
    woken: list[int] = []
    count = 3 * SLICE

    async def body(stop: asyncio.Event) -> None:
        await stop.wait()
        woken.append(1)

    for index in range(count):
        supervisor.start(f"poller:{index}", body)
    await asyncio.sleep(0)  # every task waits on its stop
    seen: list[int] = []

    async def watcher() -> None:
        while len(woken) < count:
            seen.append(len(woken))
            await asyncio.sleep(0)

    watching = asyncio.create_task(watcher())
    await supervisor.stop_tasks([f"poller:{i}" for i in range(count)], timeout=5)
    await watching
    assert len(woken) == count
    between = [n for n in seen if 0 < n < count]
    assert between, f"no turn of the loop between the first and the last wake-up: {seen}"
    assert max(b - a for a, b in zip([0, *between], [*between, count], strict=True)) <= SLICE


async def test_a_gate_lets_in_its_room_in_order_and_forgets_cancelled_waiters() -> None:
    gate = Gate(2)
    order: list[int] = []
    release = asyncio.Event()

    async def holder(index: int) -> None:
        async with gate:
            order.append(index)
            await release.wait()

    tasks = [asyncio.create_task(holder(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and gate.locked() and gate.waiting == 4
    tasks[2].cancel()  # a waiter stopped (a shutdown): out of the queue, nobody's place taken
    tasks[4].cancel()
    await asyncio.sleep(0.01)
    assert gate.waiting == 2
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 5]
    assert not gate.locked() and gate.waiting == 0
    async with gate, gate:  # both places free again
        pass


async def test_a_place_handed_to_a_waiter_cancelled_meanwhile_goes_to_the_next() -> None:
    gate = Gate(1)
    entered: list[str] = []

    async def waiter(name: str) -> None:
        async with gate:
            entered.append(name)

    await gate.__aenter__()
    first = asyncio.create_task(waiter("first"))
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0.01)
    await gate.__aexit__(None, None, None)  # the place goes to `first`...
    first.cancel()  # ...cancelled before it could run: the place must not be lost
    # A lost place would leave `second` waiting for ever.
    await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
    assert entered == ["second"]
    assert not gate.locked()


async def test_many_waiters_cancelled_at_once_leave_the_gate_as_it_was() -> None:
    """A shutdown cancels thousands of pollers waiting for their first poll at once (each
    leaves the queue by a dict lookup: `bench/sites.py` shows the stop's time)."""
    gate = Gate(1)
    await gate.__aenter__()

    async def waiter() -> None:
        async with gate:
            pass

    tasks = [asyncio.create_task(waiter()) for _ in range(20000)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.waiting == 0 and gate.locked()
    await gate.__aexit__(None, None, None)
    assert not gate.locked()


async def test_a_gates_patience_lets_a_waiter_in_without_a_place_once_it_ran_out() -> None:
    gate = Gate(1)
    loop = asyncio.get_running_loop()
    await gate.__aenter__()  # the one place, held
    began = loop.time()
    placed = await asyncio.wait_for(_enter_within(gate, 0.2), 5)
    waited = loop.time() - began
    assert not placed and gate.waiting == 0
    assert 0.15 <= waited < 2  # (a timer may fire up to the clock resolution early)
    assert gate.locked(), "leaving without a place gives none back"
    patient = asyncio.create_task(_enter_within(gate, 5.0))
    await asyncio.sleep(0.05)
    await gate.__aexit__(None, None, None)  # a place comes in time: handed over
    assert await asyncio.wait_for(patient, 5) is True
    assert not gate.locked(), "the place was given back on leaving"


async def _enter_within(gate: Gate, patience_s: float) -> bool:
    async with gate.within(patience_s) as placed:
        return placed
