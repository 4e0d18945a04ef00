"""Event-loop lag: how late the daemon's one event loop runs what is due.

Every poller, the writer, media and actions share one loop; code that blocks it (a huge
answer parsed in one go, a slow disk, a CPU-bound bug) delays every site at once, and nothing
else would show it. A task sleeps a short tick and measures how much later than asked it woke
up: the overshoot is the lag. Each measurement goes to a histogram; a lag over
`BLOCKED_AFTER_S` logs `event_loop_blocked` once per episode, and `event_loop_recovered`
when the loop turns on time again.
"""

from __future__ import annotations

import asyncio

import structlog

from cms_ingest.metrics import Metrics
from cms_ingest.runtime.tasks import sleep_or_stop

log = structlog.get_logger("cms_ingest.looplag")

# Short enough that a turn of the loop longer than 50 ms (a hand-off done in one go, a huge
# answer parsed at once) shows in the histogram, not only the rare one over a second.
TICK_S = 0.05
BLOCKED_AFTER_S = 1.0


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

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            if await sleep_or_stop(self._tick_s, stop):
                return
            self.observe(max(0.0, loop.time() - asked - self._tick_s), now=loop.time())

    def observe(self, lag: float, *, now: float) -> None:
        self._metrics.event_loop_lag.observe(lag)
        if lag > self._blocked_after_s:
            if self._episode_worst is None:
                self._episode_worst = lag
                self._episode_started = now - lag
                self._metrics.event_loop_blocked.inc()
                log.warning(
                    "event_loop_blocked",
                    lag_s=round(lag, 3),
                    note="something blocked the event loop: every site, commit and action "
                    "waited; logged once until it turns on time again",
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
