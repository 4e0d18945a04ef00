"""Deadlines on polls, media downloads and actions, against a real device that is slow.

Each HTTP request has its own timeout, but a device answering every request just inside it
(or trickling a body) could hold a poll, a media worker or an action for as long as it
likes. A poll past its deadline is a failed poll (outcome `timeout`): the cursor stays, the
site's other work and every other site go on, and nothing is lost once the device is fast
again.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from structlog.testing import capture_logs

from cms_ingest.config import ActionsConfig, MediaConfig
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.looplag import LoopLagMonitor
from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, final, running_daemon


async def _alarm_ids(db: asyncpg.Connection, site_id: str) -> list[int]:
    rows = await db.fetch(
        "SELECT source_id FROM alarms WHERE site_id = $1 AND vendor = 'davantis' "
        "ORDER BY source_id::bigint",
        site_id,
    )
    return [int(row["source_id"]) for row in rows]


async def _cursor(db: asyncpg.Connection, site_id: str) -> Any:
    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = $1", site_id)
    return None if value is None else json.loads(value)


def _timeouts(metrics: Metrics, site_id: str) -> float:
    return metrics.sample(
        "cms_ingest_polls_total", site_id=site_id, vendor="davantis", outcome="timeout"
    )


async def test_a_poll_past_its_deadline_fails_as_timeout_and_other_sites_go_on(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    slow, fast = DavantisSite(media_delay=0), DavantisSite(media_delay=0)
    async with DavantisSimulator({"slow": slow, "fast": fast}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [
                # Every answer comes well inside the request timeout, yet the poll is late.
                # 1 s: a normal poll on a loaded machine stays inside it (0.4 s did not once).
                davantis_site("slow", sim.url("slow"), request_timeout_s=5, poll_deadline_s=1.0),
                davantis_site("fast", sim.url("fast")),
            ],
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: _cursor(db, "slow"), what="the slow site's first cursor")
            slow.add_alarms(2, snapshot="unavailable", video="unavailable")
            await eventually(lambda: _has_ids(db, "slow", [1, 2]), what="the first alarms")
            cursor = await _cursor(db, "slow")
            assert daemon.sites is not None
            health = daemon.sites.by_id["slow"].health
            await eventually(lambda: health.up is True, what="the slow site up before the test")
            before = _timeouts(daemon.metrics, "slow")
            with capture_logs() as logs:
                slow.slow_alarm_polls(3, delay=2.5)
                slow.add_alarms(2, snapshot="unavailable", video="unavailable")
                await eventually(
                    lambda: _timeouts(daemon.metrics, "slow") >= before + 3, what="3 late polls"
                )
                assert await _cursor(db, "slow") == cursor, "a late poll moves no cursor"
                # Meanwhile the other site is polled as usual.
                fast.add_alarms(1, snapshot="unavailable", video="unavailable")
                await eventually(lambda: _alarm_ids(db, "fast"), what="the fast site's alarm")
                # Fast again: nothing was lost, nothing stored twice.
                await eventually(
                    lambda: _has_ids(db, "slow", [1, 2, 3, 4]), what="every alarm", timeout=15
                )
                # The poll that stored them logs the recovery once its commit has returned: a
                # moment after the rows are visible.
                await eventually(
                    lambda: any(e["event"] == "site_recovered" for e in logs),
                    what="the recovery logged",
                )
    failing = [e for e in logs if e["event"] == "site_failing" and e.get("site_id") == "slow"]
    assert len(failing) == 1, failing  # logged once when the site starts failing
    assert "deadline of 1 s" in failing[0]["error"]
    assert [e for e in logs if e["event"] == "site_recovered" and e.get("site_id") == "slow"]


async def _has_ids(db: asyncpg.Connection, site_id: str, ids: list[int]) -> bool:
    return await _alarm_ids(db, site_id) == ids


def _trickle(seconds: float) -> Any:
    """A snapshot served one byte every 0.1 s for `seconds`: each read is quick, the whole
    download is not (inside the vendor's own 600 s download timeout)."""

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff\xe0")
        for _ in range(int(seconds * 10)):
            await asyncio.sleep(0.1)
            await response.write(b"\x00")
        await response.write_eof()
        return response

    return answer


async def test_a_trickling_media_download_is_cut_at_its_deadline_and_retried(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("GET", "/alarms/1/snapshot", _trickle(30), times=1)
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url())],
            media=MediaConfig(retry_base_s=0.2, retry_max_s=0.5, download_timeout_s=0.8),
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: _cursor(db, "d1"), what="the first cursor")
            site.add_alarms(1, video="unavailable")
            row = await eventually(lambda: _snapshot(db, "ready"), what="snapshot", timeout=10)
    assert row["attempts"] == 2
    assert (
        daemon.metrics.sample(
            "cms_ingest_media_fetches_total", vendor="davantis", kind="snapshot", outcome="timeout"
        )
        == 1
    )
    assert not list((tmp_path / "media" / ".partial").glob("*")), "no half-written file left"


async def test_a_slow_media_status_is_cut_at_its_deadline_and_asked_again(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    late_probes: list[str] = []

    async def media_lookups_late_once(
        request: web.Request, device: DeviceAnswer
    ) -> web.StreamResponse:
        # Polls ask for armed alarms only (cra=yes); the media status looks an alarm up.
        if "cra" not in request.query and not late_probes:
            late_probes.append(request.query_string)
            await asyncio.sleep(1.5)  # inside the request timeout (5 s)
        return await device()

    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("GET", "/alarms", media_lookups_late_once, times=None)
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url(), request_timeout_s=5)],
            media=MediaConfig(retry_base_s=0.2, retry_max_s=0.5, probe_timeout_s=0.5),
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: _cursor(db, "d1"), what="the first cursor")
            site.add_alarms(1, video="unavailable")
            row = await eventually(lambda: _snapshot(db, "ready"), what="snapshot", timeout=10)
    assert late_probes, "the media status was asked for"
    assert row["attempts"] == 2
    assert (
        daemon.metrics.sample(
            "cms_ingest_media_fetches_total", vendor="davantis", kind="snapshot", outcome="timeout"
        )
        == 1
    )


async def _snapshot(db: asyncpg.Connection, state: str) -> asyncpg.Record | None:
    row = await db.fetchrow("SELECT * FROM alarm_media WHERE kind = 'snapshot'")
    return row if row is not None and row["state"] == state else None


async def test_an_action_without_outcome_by_its_deadline_is_settled_by_the_rule(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)

    async def late(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        await asyncio.sleep(1.5)  # inside the request timeout (5 s), past the attempt's
        return await device()

    async with DavantisSimulator({"default": site}) as sim:
        sim.respond("PATCH", "/relays/1", late, times=1)
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url(), request_timeout_s=5)],
            actions=ActionsConfig(sweep_interval_s=0.5, running_timeout_s=5, attempt_timeout_s=0.5),
        )
        with capture_logs() as logs:
            async with running_daemon(config):
                action_id = int(
                    await db.fetchval(
                        "INSERT INTO actions (site_id, kind, target) VALUES ('d1', 'relay', '1') "
                        "RETURNING id"
                    )
                )
                row = await final(db, action_id)
    # relay is idempotent: the attempt without an outcome was repeated, and the repeat worked.
    assert row["state"] == "succeeded", row["error"]
    assert row["attempts"] == 2
    retries = [e for e in logs if e["event"] == "action_retry"]
    assert len(retries) == 1 and "no outcome within 0.5 s" in retries[0]["error"], retries


async def test_a_blocked_event_loop_is_measured_and_logged_once_per_episode(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with DavantisSimulator({"default": DavantisSite(media_delay=0)}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config) as daemon:
            assert "loop_lag" in daemon.supervisor.names
            slow_ticks = _lag_count_over_1s(daemon.metrics)
            with capture_logs() as logs:
                time.sleep(1.3)  # blocking the loop on purpose
                await eventually(
                    lambda: [e for e in logs if e["event"] == "event_loop_recovered"],
                    what="the recovery line",
                )
    blocked = [e for e in logs if e["event"] == "event_loop_blocked"]
    assert len(blocked) == 1, blocked
    assert blocked[0]["lag_s"] > 1.0
    recovered = [e for e in logs if e["event"] == "event_loop_recovered"]
    assert recovered[0]["worst_lag_s"] >= blocked[0]["lag_s"]
    assert _lag_count_over_1s(daemon.metrics) >= slow_ticks + 1
    assert daemon.metrics.sample("cms_ingest_event_loop_blocked_total") == 1


def _lag_count_over_1s(metrics: Metrics) -> float:
    total = metrics.sample("cms_ingest_event_loop_lag_seconds_count")
    return total - metrics.sample("cms_ingest_event_loop_lag_seconds_bucket", le="1.0")


def test_a_long_block_is_one_episode_logged_once_with_its_worst_lag() -> None:
    metrics = Metrics()
    monitor = LoopLagMonitor(metrics=metrics)
    with capture_logs() as logs:
        for now, lag in enumerate([0.01, 1.5, 3.0, 1.1, 0.02, 0.01, 2.0, 0.0]):
            monitor.observe(lag, now=float(now))
    assert [(e["event"], e.get("lag_s", e.get("worst_lag_s"))) for e in logs] == [
        ("event_loop_blocked", 1.5),
        ("event_loop_recovered", 3.0),
        ("event_loop_blocked", 2.0),
        ("event_loop_recovered", 2.0),
    ]
    assert metrics.sample("cms_ingest_event_loop_blocked_total") == 2  # one per episode
    assert metrics.sample("cms_ingest_event_loop_lag_seconds_count") == 8


async def test_garbage_collections_are_timed_by_generation_while_the_monitor_runs() -> None:
    metrics = Metrics()
    monitor = LoopLagMonitor(tick_s=0.01, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    await asyncio.sleep(0)  # the monitor hooks into the collector as it starts
    assert monitor._on_collection in gc.callbacks

    def counted(generation: int) -> float:
        name = "cms_ingest_gc_pause_seconds_count"
        return metrics.sample(name, generation=str(generation))

    try:
        for _ in range(1000):  # garbage only the collector can free
            cycle: list[object] = []
            cycle.append(cycle)
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        await eventually(  # counted on the monitor's next tick
            lambda: counted(0) >= 1 and counted(2) >= 2, what="the collections counted"
        )
        full = metrics.sample("cms_ingest_gc_pause_seconds_sum", generation="2")
        assert 0 < full < 5
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)
    assert monitor._on_collection not in gc.callbacks, "a stopped monitor unhooks itself"


def test_a_blocked_loop_says_how_much_of_the_lag_was_garbage_collection() -> None:
    monitor = LoopLagMonitor(metrics=Metrics())
    with capture_logs() as logs:
        monitor.observe(1.6, now=10.0, gc_s=1.25)
    assert [(e["event"], e["lag_s"], e["gc_s"]) for e in logs] == [
        ("event_loop_blocked", 1.6, 1.25)
    ]


def test_default_deadlines_follow_the_site_and_the_action() -> None:
    site = davantis_site("d1", "http://127.0.0.1:1", request_timeout_s=10, poll_interval=0.5)
    assert site.poll_deadline() == 30
    assert davantis_site("d1", "http://x", request_timeout_s=20).poll_deadline() == 60
    assert davantis_site("d1", "http://x", poll_interval=40).poll_deadline() == 80
    assert davantis_site("d1", "http://x", poll_deadline_s=5).poll_deadline() == 5
    actions = ActionsConfig(attempt_timeout_s=60)
    assert actions.attempt_deadline({}) == 60
    assert actions.attempt_deadline({"duration_s": 30}) == 90  # a hold gets its own length
    for odd in (float("nan"), float("-inf"), "30", True, None, -5):
        assert actions.attempt_deadline({"duration_s": odd}) == 60, odd
    assert actions.attempt_deadline({"duration_s": 10**400}) == 60 + 86400  # capped at a day
