"""One poller per site: scheduling, commit of results, health.

The loop owns the timing (a fixed cadence at the site's `poll_interval`, no catch-up bursts
after a slow poll, backoff while the site fails) and the health transitions; the vendor
client only answers "what is new after this cursor". The cursor in memory moves only after the
alarms before it are committed, so a crash at any point replays at worst what the unique key
then absorbs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from cms_ingest.config import SiteConfig
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.db.storable import stored_source_id
from cms_ingest.domain import Alarm, PollCommit
from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.comm_loss import CommLossTracker
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.runtime.sites import SiteRuntime
from cms_ingest.runtime.tasks import Gate, sleep_or_stop
from cms_ingest.runtime.writer import AlarmWriter, LeaseLost
from cms_ingest.sitehttp import DeviceTimeout, TlsFailure, TransportError, heavy_turn
from cms_ingest.vendors.base import AuthenticationFailed, BadDeviceResponse, VendorError

log = structlog.get_logger("cms_ingest.poller")

# While a site fails: back off gently (0.5, 0.75, 1.1 ... s) up to 10 s. A dead site costs
# one request per 10 s; a site back from a blip is polled again within seconds, because
# every second of delay is alarm latency.
FAILURE_BACKOFF = RetryPolicy(base=0.5, factor=1.5, cap=10.0, jitter=0.3)
# A first poll waits for the shared gate at most this long, or one poll interval if longer,
# then goes ahead anyway. The gate paces a crowd of first polls (a daemon joining, a start);
# with the loop saturated (more sites than the CPU can poll) its holders are slow, and at
# 10,000 sites polled once a second only 5,592 had been polled at all after 30 s.
FIRST_POLL_PATIENCE_S = 5.0


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, AuthenticationFailed):
        return "auth_error"
    if isinstance(exc, BadDeviceResponse):
        return "bad_response"
    if isinstance(exc, DeviceTimeout):
        return "timeout"
    if isinstance(exc, TlsFailure):
        return "tls_error"
    return "error"


class SitePoller:
    def __init__(
        self,
        site: SiteRuntime,
        writer: AlarmWriter,
        *,
        cursor: Mapping[str, Any] | None,
        comm_loss: CommLossTracker,
        flood: FloodTracker,
        metrics: Metrics | None = None,
        start_within_s: float = 1.0,
        overdue: bool = False,
        first_poll_gate: Gate | None = None,
        first_poll_patience_s: float = FIRST_POLL_PATIENCE_S,
    ) -> None:
        """`start_within_s`: the first poll comes at a random moment within this long (or
        within one poll interval, up to 1 s, if longer), so sites started together do not
        all log in at once. `overdue`: taken over from a daemon that died, the site has
        waited a lease period already: within `start_within_s` only. `first_poll_gate`:
        shared by the pollers started together, bounds how many first polls (a login, the
        camera list...) run at once; none waits for it longer than `first_poll_patience_s`
        or one poll interval."""
        self._site = site
        self._first_poll_gate = first_poll_gate
        self._first_poll_patience_s = max(first_poll_patience_s, site.config.poll_interval)
        self._start_within_s = start_within_s
        self._overdue = overdue
        self._metrics = metrics = metrics if metrics is not None else Metrics()
        self.fenced = False  # set when a commit was refused: the site is another daemon's now
        # While a commit is under way: a stop waits for it (a poll in flight may be cut short).
        self.committing = False
        self._writer = writer
        self.cursor = cursor
        self._comm_loss = comm_loss
        self._flood = flood
        self._db_failing = False
        self._series = metrics.poll_series(site.config.id, site.config.vendor)
        self._series.seconds_since_success = comm_loss.seconds_since_success
        self._poll_duration = metrics.poll_duration.labels(vendor=site.config.vendor)

    @property
    def _labels(self) -> dict[str, str]:
        return {"site_id": self._site.config.id, "vendor": self._site.config.vendor}

    async def run(self, stop: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(**self._labels)
        interval = self._site.config.poll_interval
        # Spread thousands of sites over the interval instead of polling them in lockstep;
        # a first poll (a login, the camera list...) costs several requests: many sites
        # starting together are spread wider (`start_within_s`).
        spread = self._start_within_s
        if not self._overdue:
            spread = max(min(interval, 1.0), spread)
        next_at = time.monotonic() + random.uniform(0, spread)
        gate = self._first_poll_gate
        while not await sleep_or_stop(next_at - time.monotonic(), stop):
            if gate is not None:
                async with gate.within(self._first_poll_patience_s):
                    ok = await self.poll_once()
                gate = None
            else:
                ok = await self.poll_once()
            if self.fenced:
                # Not ours any more: poll nothing until the lease keeper stops this task.
                await stop.wait()
                return
            now = time.monotonic()
            if ok:
                next_at = max(next_at + interval, now)  # keep cadence; never burst to catch up
            else:
                failures = max(1, self._site.health.consecutive_failures)
                next_at = now + max(interval, FAILURE_BACKOFF.delay(failures))

    async def poll_once(self) -> bool:
        """One poll and its commit. True when the site answered and the result is stored."""
        client = self._site.client
        deadline = self._site.config.poll_deadline()
        started = time.monotonic()
        guard = asyncio.timeout(deadline)
        try:
            async with guard:
                result = await client.poll(self.cursor)
        except TimeoutError as exc:
            if not guard.expired():  # the client's own, not our deadline: a client bug
                return await self._crashed(exc)
            # A device that trickles or never ends its answers (or a client stuck in a loop
            # that awaits): this poll failed, the cursor stays, the next poll starts afresh.
            error = f"poll exceeded its deadline of {deadline:g} s (poll_deadline_s)"
            return await self._failed("timeout", error)
        except (TransportError, VendorError) as exc:
            return await self._failed(_outcome(exc), _describe(exc))
        except Exception as exc:  # a client bug on odd input: this site fails, visibly, alone
            return await self._crashed(exc)
        finally:
            self._poll_duration.observe(time.monotonic() - started)
        changed = bool(result.alarms) or result.cursor != self.cursor
        if changed and not await self._commit(result.alarms, result.cursor, result.notes):
            return False  # our database failed, not the site: comm loss is not told
        self._series.count("ok")
        self._site.health.success()
        await self._track_comm(ok=True)
        return True

    async def _crashed(self, exc: Exception) -> bool:
        if self._site.health.up is not False:
            log.error(
                "poll_crashed",
                note="a bug in the vendor client; polling goes on",
                exc_info=exc,
            )
        return await self._failed(
            "error",
            f"internal error: {_describe(exc)}",
            comm_error=f"internal error: {type(exc).__name__}",
        )

    async def _failed(self, outcome: str, error: str, *, comm_error: str | None = None) -> bool:
        """The poll failed: counted by `outcome`, the site's health and comm loss told
        (`comm_error`, when given, is what comm loss records instead of `error`)."""
        self._series.count(outcome)
        self._site.health.failure(error)
        await self._track_comm(ok=False, error=error if comm_error is None else comm_error)
        return False

    async def _track_comm(self, *, ok: bool, error: str = "") -> None:
        """comm_lost / comm_restored, committed like any alarm; kept pending if that fails."""
        before = self._comm_loss.outage
        alarms = self._comm_loss.observe(ok, error)
        if alarms and not await self._commit(alarms, self.cursor, []):
            self._comm_loss.outage = before  # raise it again on the next poll

    async def _commit(
        self, alarms: list[Alarm], cursor: Mapping[str, Any] | None, notes: list[str]
    ) -> bool:
        site = self._site.config
        # The store makes every value storable (alarms, media locators, the cursor), in one
        # place; flood groups name their head by the same source_id, cleaned alike there.
        await heavy_turn(len(alarms))
        now = datetime.now(UTC)
        prioritized = [self._prepared(alarm, site, now) for alarm in alarms]
        commit = PollCommit(
            site_id=self._site.config.id,
            vendor=self._site.config.vendor,
            alarms=prioritized,
            cursor=cursor,
            problems=self._site.problems,
        )
        self.committing = True
        try:
            return await self._hand_over(commit, prioritized, cursor, notes)
        finally:
            self.committing = False

    def _prepared(self, alarm: Alarm, site: SiteConfig, now: datetime) -> Alarm:
        """The alarm with its priority and its flood marks, in one copy (none when nothing
        changes): two copies per alarm were 8.5 % of the daemon's CPU in a storm."""
        changes = self._flood.marks(alarm, now)
        priority = site.priority(alarm.event_type, alarm.camera_id)
        if priority != alarm.priority:
            changes["priority"] = priority
        return alarm.changed(**changes) if changes else alarm

    async def _hand_over(
        self,
        commit: PollCommit,
        prioritized: list[Alarm],
        cursor: Mapping[str, Any] | None,
        notes: list[str],
    ) -> bool:
        """The commit through the writer; the cursor moves on once it is stored."""
        alarms = commit.alarms
        try:
            inserted = await self._writer.commit(commit)
        except LeaseLost:
            self.fenced = True
            log.warning(
                "commit_refused_lease_lost",
                alarms=len(alarms),
                note="another daemon holds this site now; it resumes from the committed cursor",
            )
            return False
        except DatabaseUnavailable as exc:
            # The database, not the site, failed: keep the cursor, poll the same range again.
            self._series.count("db_error")
            if not self._db_failing:
                self._db_failing = True
                log.error("commit_failed", error=str(exc), note="cursor kept; will retry")
            return False
        if self._db_failing:
            self._db_failing = False
            log.info("commit_recovered")
        self.cursor = cursor
        self._observe(prioritized, {row.source_id for row in inserted})
        for note in notes:
            log.info("poll_note", note=note, alarms=len(inserted))
        return True

    def _observe(self, alarms: list[Alarm], new_ids: set[str]) -> None:
        """The alarms stored now, counted: label sets looked up once per poll, not per
        alarm (a storm's full pages)."""
        now = datetime.now(UTC)
        vendor = self._site.config.vendor
        latency = self._metrics.ingest_latency.labels(vendor=vendor)
        by_type: Counter[str] = Counter()
        grouped = 0
        for alarm in alarms:
            if stored_source_id(alarm.source_id) not in new_ids:
                continue
            by_type[alarm.event_type.value] += 1
            grouped += alarm.group_of is not None
            latency.observe(max(0.0, (now - alarm.occurred_at).total_seconds()))
        for event_type, count in by_type.items():
            self._metrics.alarms.labels(vendor=vendor, event_type=event_type).inc(count)
        if grouped:
            self._metrics.flood_grouped.labels(vendor=vendor).inc(grouped)


def _describe(exc: BaseException) -> str:
    kind = "authentication failed" if isinstance(exc, AuthenticationFailed) else type(exc).__name__
    return f"{kind}: {exc}"
