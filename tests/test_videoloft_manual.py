"""Videoloft against a simulator that behaves as the manual says (issue 14): the daemon over
real HTTP and a real PostgreSQL, one test per finding."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from cms_ingest.metrics import Metrics
from cms_ingest.probe import run_probe
from cms_ingest.simulators.videoloft import LASTACTIVITY_MODES, VideoloftAccount, VideoloftSimulator
from cms_ingest.vendors.videoloft import CATCH_UP_WAIT_S
from tests.conftest import eventually
from tests.support import app_config, final, running_daemon, videoloft_site
from tests.test_vendor_parsing import Problems, client


async def motion_ids(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT source_id FROM alarms WHERE event_type IN ('motion', 'audio')")
    return sorted(r["source_id"] for r in rows)


async def events(db: asyncpg.Connection, camera: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM alarms WHERE camera_id = $1 AND event_type LIKE 'camera_%' ORDER BY id",
        camera,
    )


# ------------------------------------------------------------- 1. reconnect gaps


@pytest.mark.parametrize(
    "answer_first", [False, True], ids=["answer-once-registered", "answer-first"]
)
async def test_no_alert_is_lost_at_reconnects(
    answer_first: bool, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The logger registers a stream 0.5-2 s after the request and sends nothing from before
    (answering then, or at once: the manual does not say): alerts keep coming while the
    streams are cut again and again."""
    account = VideoloftAccount(
        media_delay=0,
        tail_s=0,
        live_connect_delay=(0.5, 2.0),
        live_max_s=1.5,
        live_answer_first=answer_first,
    )
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(lambda: account.open_live >= 2, what="a long-poll per logger")
            rng = random.Random(14)
            added = []
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline:
                added.append(account.add_alert(rng.choice(list(account.devices))))
                if rng.random() < 0.1:
                    account.drop_live_connections()
                await asyncio.sleep(0.1)
            expected = sorted(f"{a.uidd}:{a.id}" for a in added)

            async def all_stored() -> bool:
                return set(await motion_ids(db)) >= set(expected)

            await eventually(all_stored, timeout=20, what="every alert")
            stored = await motion_ids(db)
    lost = set(expected) - set(stored)
    assert not lost, f"lost {len(lost)} of {len(expected)}"
    assert stored == expected  # and none twice
    assert account.live_connections >= 8  # the streams really were cut, many times


# ------------------------------------------------------------- 2. token placement


@pytest.mark.parametrize("anywhere", [False, True], ids=["as-the-manual", "token-anywhere"])
async def test_the_token_goes_where_the_manual_puts_it(
    anywhere: bool, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The simulator reads the token only where the manual puts it, route by route (and,
    switched, anywhere: a lenient logger works as well)."""
    account = VideoloftAccount(media_delay=0, tail_s=0.2, token_anywhere=anywhere)
    async with VideoloftSimulator(account) as sim:
        site = videoloft_site("v1", sim.url, options={"tail_s": 0.2})
        config = app_config(database_url, tmp_path, [site])
        async with running_daemon(config):
            await eventually(lambda: account.open_live >= 2, what="long-polls")
            account.drop_live_connections()
            gap = account.add_alert("12345.1", duration_s=0.1)  # only /alert has it
            await eventually(lambda: account.open_live >= 2, what="long-polls again")
            live = account.add_alert("12345.2", duration_s=0.1)
            expected = sorted([f"12345.1:{gap.id}", f"12345.2:{live.id}"])
            await eventually(lambda: _equals(motion_ids(db), expected), what="both alerts")

            async def media_ready() -> bool:
                states = await db.fetch("SELECT state FROM alarm_media")
                return len(states) == 4 and all(r["state"] == "ready" for r in states)

            await eventually(media_ready, timeout=20, what="thumbnails and MP4s")
            action_id = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target, params)"
                " VALUES ('v1', 'record', '12345.1', '{\"duration_s\": 1}') RETURNING id"
            )
            record = await final(db, int(action_id))
            assert record["state"] == "succeeded", record["error"]
            assert await _comm(db) == []


async def test_an_authentication_refusal_in_the_alert_read_is_reported_not_fatal() -> None:
    """/alert refusing every token: the poll goes on (live alerts arrive), the gap stays
    open, and it is read back once /alert answers again."""
    account = VideoloftAccount(media_delay=0, tail_s=0)
    problems = Problems()
    async with VideoloftSimulator(account) as sim, aiohttp.ClientSession() as session:
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            cursor = dict((await videoloft.poll(None)).cursor)
            account.refused_paths.add("/alert")
            account.drop_live_connections()
            during = account.add_alert("12345.1")
            seen: list[str] = []

            async def poll_for(source_id: str) -> bool:
                nonlocal cursor
                result = await videoloft.poll(cursor)
                cursor = dict(result.cursor)
                seen.extend(alarm.source_id for alarm in result.alarms)
                return source_id in seen

            async def reconnected() -> bool:
                await poll_for("")  # the poll reopens the long-polls
                return account.open_live >= 2

            await eventually(reconnected, what="long-polls again")
            live = account.add_alert("12345.1")
            await eventually(lambda: poll_for(f"12345.1:{live.id}"), what="the live alert")
            assert "gaps" in cursor and "12345.1" in cursor["gaps"]
            account.refused_paths.clear()
            await eventually(lambda: poll_for(f"12345.1:{during.id}"), what="the gap read")
        finally:
            await videoloft.close()
    assert "catch_up" in problems.reported
    # The live alert is above the gap's floor, so the gap read finds it again: it is not
    # handed over twice.
    assert sorted(seen) == sorted([f"12345.1:{during.id}", f"12345.1:{live.id}"])


# ------------------------------------------------------------- 3 and 4. camera status


async def test_camera_offline_at_start_and_during_a_stream_gap(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    account.set_status("12345.2", "offline")  # before we ever looked
    async with VideoloftSimulator(account) as sim:
        site = videoloft_site("v1", sim.url, options={"residency_check_s": 0.5})
        config = app_config(database_url, tmp_path, [site])
        async with running_daemon(config):
            await eventually(lambda: _has_events(db, "12345.2", 1), what="offline at start")
            await eventually(lambda: account.open_live >= 2, what="long-polls")
            account.drop_live_connections()
            account.set_status("12345.1", "novideo")  # no stream open: only the status has it
            await eventually(lambda: _has_events(db, "12345.1", 1), what="offline in a gap")
            rows = await events(db, "12345.1") + await events(db, "12345.2")
    assert [r["event_type"] for r in rows] == ["camera_offline", "camera_offline"]


@pytest.mark.parametrize("lastactivity", LASTACTIVITY_MODES)
async def test_each_offline_episode_is_its_own_alarm_timed_when_seen(
    lastactivity: str, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """`lastactivity` is not defined by the manual (its sample is years old): whatever a
    logger puts there, two episodes are two alarms, each at the time we saw it."""
    account = VideoloftAccount(media_delay=0, tail_s=0, lastactivity=lastactivity)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(lambda: account.open_live >= 2, what="long-polls")
            for status in ("offline", "live", "offline", "live"):
                account.set_status("12345.2", status)
                await asyncio.sleep(0.05)
            await eventually(lambda: _has_events(db, "12345.2", 4), what="4 status alarms")
            rows = await events(db, "12345.2")
    assert [r["event_type"] for r in rows] == ["camera_offline", "camera_online"] * 2
    now = datetime.now(UTC)
    assert all(now - timedelta(seconds=30) < r["occurred_at"] <= now for r in rows)
    assert len({r["source_id"] for r in rows}) == 4


# ------------------------------------------------------------- 5. MP4


async def test_mp4_of_a_24_7_camera_and_of_an_alert_whose_motion_went_on(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=1.0, continuous=["12345.1"])
    async with VideoloftSimulator(account) as sim:
        site = videoloft_site("v1", sim.url, options={"tail_s": 1.0})
        config = app_config(database_url, tmp_path, [site])
        async with running_daemon(config):
            await eventually(lambda: account.open_live >= 2, what="long-polls")
            alert = account.add_alert("12345.1", duration_s=0.5)  # live record: end known
            await eventually(lambda: _equals(motion_ids(db), [f"12345.1:{alert.id}"]))
            account.extend_alert(alert, 2.0)  # the motion went on
            assert alert.end_ms is not None

            async def video_state() -> str:
                return str(await db.fetchval("SELECT state FROM alarm_media WHERE kind='video'"))

            await eventually(lambda: _equals(video_state(), "ready"), timeout=20, what="MP4")
    built = account.mp4_requests[-1]
    assert built["rom"] == "0"  # 24/7 recording (the manual): not "1"
    assert built["endt"] == str(alert.end_ms // 1000)  # the end as it is now


# ------------------------------------------------------------- 6. loggers


async def test_a_device_without_a_logger_is_reported(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    account.unallocate("40012.7")
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config) as daemon:
            await eventually(lambda: account.open_live >= 1, what="a long-poll")
            assert daemon.sites is not None
            described = await daemon.sites.by_id["v1"].client.describe()
            status = daemon.status()
    assert _bad_input(daemon.metrics, "device_without_logger") > 0
    assert "device_without_logger" in status["sites"][0]["bad_input"]
    assert described["not watched (viewerInfo names no logger)"] == ["40012.7"]


async def test_an_unreachable_logger_does_not_delay_the_others() -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    problems = Problems()
    async with VideoloftSimulator(account) as sim, aiohttp.ClientSession() as session:
        videoloft = client("videoloft", sim.url, session, problems)
        videoloft._options = videoloft._options.model_copy(update={"residency_check_s": 0.2})
        polls = Timed(videoloft)
        try:
            polls.cursor = dict((await videoloft.poll(None)).cursor)
            await eventually(lambda: account.open_live >= 2, what="long-polls")
            await polls.for_seconds(0.3)  # their gaps read
            polls.durations.clear()
            account.set_logger_hanging(0)  # accepts connections, never answers (timeout 2 s)
            account.drop_live_connections()
            await polls.for_seconds(1.0)
            healthy = account.add_alert("12345.2")  # on logger 1
            await polls.for_seconds(2.5)
            assert "logger_unreachable" in problems.reported  # its status read timed out
            assert f"12345.2:{healthy.id}" in polls.seen
            assert max(polls.durations) < 0.5, polls.durations  # no poll waited for it
            # A gap of one of its devices, open from before: its read is waited for at most
            # CATCH_UP_WAIT_S, once; it times out in the background, then the logger waits
            # (30 s) while the other logger's alerts keep coming.
            gap = {"floor": polls.cursor["last_ids"]["12345.1"], "offset": 0, "top": 0}
            polls.cursor["gaps"] = {"12345.1": gap}
            videoloft._logger_down_until.clear()
            polls.durations.clear()
            await polls.for_seconds(1.0)
            again = account.add_alert("12345.2")
            await polls.for_seconds(0.5)
        finally:
            account.set_logger_hanging(0, False)
            await videoloft.close()
    assert CATCH_UP_WAIT_S - 0.1 < polls.durations[0] < CATCH_UP_WAIT_S + 0.4, polls.durations
    assert max(polls.durations[1:]) < 0.5, polls.durations  # not the 2 s request timeout
    assert f"12345.2:{again.id}" in polls.seen
    assert "12345.1" in polls.cursor["gaps"]  # still open: read once it answers


class Timed:
    """Polls in a row, each with the cursor the one before returned; how long each took."""

    def __init__(self, videoloft: Any) -> None:
        self.videoloft = videoloft
        self.cursor: dict[str, Any] = {}
        self.durations: list[float] = []
        self.seen: list[str] = []

    async def for_seconds(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            result = await self.videoloft.poll(self.cursor)
            self.durations.append(round(time.monotonic() - started, 2))
            self.cursor = dict(result.cursor)
            self.seen += [alarm.source_id for alarm in result.alarms]
            await asyncio.sleep(0.1)


# ------------------------------------------------------------- 7. snapshot_request


@pytest.mark.parametrize("status_param", ["both", "uid", "uidd"])
async def test_snapshot_request_stores_the_captured_image(
    status_param: str, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """`lastthumb` comes from /cameras/status, whichever of `uid=` (the manual) or `uidd=`
    (working clients) the logger reads the devices from."""
    account = VideoloftAccount(media_delay=0, tail_s=0, status_param=status_param)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            action_id = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target)"
                " VALUES ('v1', 'snapshot_request', '12345.2') RETURNING id"
            )
            done = await final(db, int(action_id), timeout=20)
    assert done["state"] == "succeeded", done["error"]
    result = json.loads(done["result"]) if isinstance(done["result"], str) else done["result"]
    image = tmp_path / "media" / result["path"]
    assert image.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, as /getthumb gave it
    assert result["thumb_time"] == account.devices["12345.2"].last_thumb
    assert result["path"].endswith(f"{action_id}-action-snapshot.jpg")


# ------------------------------------------------------------- probe


async def test_probe_connects_the_live_stream_and_downloads_real_media() -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        account.add_alert("12345.1", start=datetime.now(UTC) - timedelta(minutes=5))
        out = io.StringIO()
        code = await run_probe(videoloft_site("v1", sim.url), out=out)
    report = out.getvalue()
    assert code == 0, report
    assert "[PASS] live stream of every logger" in report
    assert report.count(": connected") == 2
    assert "thumbnail: " in report and "video: " in report
    assert "thumb captured now on 12345.1:" in report
    assert "no alarm with a ready snapshot" not in report


# ------------------------------------------------------------- helpers


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _has_events(db: asyncpg.Connection, camera: str, count: int) -> bool:
    return len(await events(db, camera)) >= count


async def _comm(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT event_type FROM alarms WHERE vendor = 'cms' ORDER BY id")
    return [r["event_type"] for r in rows]


def _bad_input(metrics: Metrics, what: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("what") == what and sample.name.endswith("_total"):
                total += sample.value
    return total
