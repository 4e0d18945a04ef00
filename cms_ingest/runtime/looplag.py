"""Event-loop lag: how late the daemon's one event loop runs what is due.

Every poller, the writer, media and actions share one loop; code that blocks it (a huge
answer parsed in one go, a slow disk, a CPU-bound bug) delays every site at once, and nothing
else would show it. A task sleeps a short tick and measures how much later than asked it woke
up: the overshoot is the lag. Each measurement goes to a histogram; a lag over
`BLOCKED_AFTER_S` logs `event_loop_blocked` once per episode, and `event_loop_recovered`
when the loop turns on time again.

The garbage collector stops the whole process, loop included: while the monitor runs, each
collection's pause is timed (a `gc.callbacks` hook that only notes the time: no lock, no
metric update inside a collection) and counted on the next tick in
`cms_ingest_gc_pause_seconds`; `event_loop_blocked` says how much of the lag was collection.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import structlog

from cms_ingest.metrics import Metrics
from cms_ingest.runtime.tasks import sleep_or_stop

log = structlog.get_logger("cms_ingest.looplag")

# Short enough that a turn of the loop longer than 50 ms (a hand-off done in one go, a huge
# answer parsed at once) shows in the histogram, not only the rare one over a second.
TICK_S = 0.05
BLOCKED_AFTER_S = 1.0
# Collections noted between two ticks, at most (a tick delayed for minutes must not grow it).
MAX_PENDING_PAUSES = 1000


class LoopLagMonitor:
    """Run as a supervised task (`run(stop)`); one per daemon."""

    def __init__(
        self,
        *,
        tick_s: float = TICK_S,
        blocked_after_s: float = BLOCKED_AFTER_S,
        metrics: Metrics | None = None,
    ) -> None:
        self._tick_s = tick_s
        self._metrics = metrics if metrics is not None else Metrics()
        self._blocked_after_s = blocked_after_s
        self._episode_worst: float | None = None  # set while the loop counts as blocked
        self._episode_started = 0.0
        self._gc_started: float | None = None
        self._gc_pauses: list[tuple[int, float]] = []  # (generation, seconds) since the tick

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_collection)
        try:
            while True:
                asked = loop.time()
                if await sleep_or_stop(self._tick_s, stop):
                    return
                gc_s = self._count_gc_pauses()
                self.observe(
                    max(0.0, loop.time() - asked - self._tick_s), now=loop.time(), gc_s=gc_s
                )
        finally:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        """Called by the collector itself, before and after a collection: note, no more."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            if len(self._gc_pauses) < MAX_PENDING_PAUSES:
                pause = time.perf_counter() - self._gc_started
                self._gc_pauses.append((info["generation"], pause))
            self._gc_started = None

    def _count_gc_pauses(self) -> float:
        """The pauses noted since the last tick into the histogram; their total."""
        pauses, self._gc_pauses = self._gc_pauses, []
        for generation, seconds in pauses:
            self._metrics.gc_pause.labels(generation=str(generation)).observe(seconds)
        return sum(seconds for _, seconds in pauses)

    def observe(self, lag: float, *, now: float, gc_s: float = 0.0) -> None:
        self._metrics.event_loop_lag.observe(lag)
        if lag > self._blocked_after_s:
            if self._episode_worst is None:
                self._episode_worst = lag
                self._episode_started = now - lag
                self._metrics.event_loop_blocked.inc()
                log.warning(
                    "event_loop_blocked",
                    lag_s=round(lag, 3),
                    gc_s=round(gc_s, 3),
                    note="something blocked the event loop (gc_s of it: the garbage "
                    "collector): every site, commit and action waited; logged once until it "
                    "turns on time again",
                )
            else:
                self._episode_worst = max(self._episode_worst, lag)
        elif self._episode_worst is not None:
            log.info(
                "event_loop_recovered",
                worst_lag_s=round(self._episode_worst, 3),
                episode_s=round(now - self._episode_started, 3),
            )
            self._episode_worst = None
