"""exacqVision as the field may answer (issues 13 and 15): each test puts the simulator in the
mode the manual allows (or a real server shows) and checks the driver over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from cms_ingest.domain import Action, MediaKind
from cms_ingest.probe import run_probe
from cms_ingest.simulators.base import static_answer
from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.sitehttp import SiteHttp
from cms_ingest.vendors import build_client
from cms_ingest.vendors.base import (
    BadDeviceResponse,
    DeviceRefused,
    MediaNotReady,
    VendorContext,
    VendorError,
)
from cms_ingest.vendors.exacq import ExacqClient
from tests.conftest import eventually
from tests.support import app_config, exacq_site, running_daemon
from tests.test_vendor_parsing import Problems

RESETS = "cms_ingest_device_resets_total"
JSON = {"Content-Type": "application/json"}
SEEN_LIMIT = 500  # vendors/exacq.py: occurrences a cursor remembers at most


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def exacq(url: str, http: aiohttp.ClientSession, problems: Problems, **options: Any) -> ExacqClient:
    context = VendorContext(
        site_id="x1",
        http=SiteHttp(http, url, timeout_s=2.0),
        problems=problems,
        username="cms",
        password="secret",
    )
    client = build_client("exacq", context, options)
    assert isinstance(client, ExacqClient)
    return client


async def rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM alarms WHERE vendor = 'exacq' ORDER BY id")


async def at_least(db: asyncpg.Connection, n: int) -> bool:
    return len(await rows(db)) >= n


async def polls(site: ExacqSite, n: int) -> None:
    target = site.requests["GET /v1/events.web"] + n
    await eventually(lambda: site.requests["GET /v1/events.web"] >= target, what=f"{n} polls")


def ago(seconds: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds)


# ------------------------------------------------------------------ device reset


async def test_a_reset_server_keeps_all_20_alarms(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """10 alarms stored, the server reinstalled, its ids start again at 1: 20 of 20 stored."""
    site = ExacqSite(event_id_style="counter")
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config) as daemon:
            first = [site.activate_event(1, 11, start=ago(300 - i)) for i in range(10)]
            await eventually(lambda: at_least(db, 10), what="the first life's 10 alarms")
            for event in first:
                site.end_event(event)
            await polls(site, 2)
            site.reset_device()
            for i in range(10):  # ids 1..10 again; these events happen now
                site.end_event(site.activate_event(3, 12, start=ago(10 - i)))
            await eventually(lambda: at_least(db, 20), what="the new life's 10 alarms")
            await polls(site, 3)
            stored = await rows(db)
    assert len(stored) == 20
    old, new = stored[:10], stored[10:]
    assert [r["source_id"] for r in old] == [str(i) for i in range(1, 11)]  # untouched
    life = new[0]["source_id"].split("@", 1)[1]
    assert [r["source_id"] for r in new] == [f"{i}@{life}" for i in range(1, 11)]
    assert {r["camera_id"] for r in new} == {"12"}
    assert daemon.metrics.sample(RESETS, vendor="exacq") == 1  # detected once


async def test_numeric_ids_starting_again_below_the_highest_are_a_reset(
    http: aiohttp.ClientSession,
) -> None:
    """The id we remember is gone from memory; the new id is below the highest seen."""
    site = ExacqSite(event_id_style="counter", event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        client = exacq(sim.url(), http, problems)
        for _ in range(5):
            site.end_event(site.activate_event(1, 11, start=ago(600)))
        event = site.activate_event(1, 11, start=ago(500))  # id 6
        cursor = (await client.poll(None)).cursor
        site.end_event(event)
        cursor = {**cursor, "seen": []}  # as if remembered occurrences aged out
        await client.close()
        site.reset_device()
        site.activate_event(2, 13)  # id 1
        client = exacq(sim.url(), http, problems)  # a daemon restarted on that cursor
        result = await client.poll(cursor)
        assert problems.reported == ["device_reset"]
        assert [a.source_id.split("@")[0] for a in result.alarms] == ["1"]
        assert "@" in result.alarms[0].source_id and result.cursor["life"]
        await client.close()


@pytest.mark.parametrize("scope", ["occurrence", "definition"])
async def test_an_id_naming_the_event_definition_is_one_alarm_per_occurrence(
    scope: str, http: aiohttp.ClientSession
) -> None:
    """Issue 13 item 3: repeats share the id; each repeat is its own alarm. With
    `event_id_scope: definition` a repeat is not taken for a device reset."""
    site = ExacqSite(event_id_style="definition", event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        options = {"event_id_scope": scope} if scope == "definition" else {}  # or the default
        client = exacq(sim.url(), http, problems, **options)
        cursor = None
        source_ids = []
        for repeat in range(3):
            event = site.activate_event(1, 11, start=ago(100 - 10 * repeat))
            result = await client.poll(cursor)
            source_ids += [alarm.source_id for alarm in result.alarms]
            cursor = result.cursor
            site.end_event(event)
            cursor = (await client.poll(cursor)).cursor
        assert len(source_ids) == 3 and len(set(source_ids)) == 3
        assert all(event.id in source_id for source_id in source_ids)
        expected = ["device_reset", "device_reset"] if scope == "occurrence" else []
        assert problems.reported == expected
        await client.close()


# ------------------------------------------------------------------ short events, gaps


async def test_an_event_shorter_than_a_poll_is_stored_once(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Issue 13 item 2: it starts and ends between two polls; the triggered links show it."""
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        site_config = exacq_site("x1", sim.url(), poll_interval=0.5)
        config = app_config(database_url, tmp_path, [site_config])
        async with running_daemon(config):
            await polls(site, 1)
            site.end_event(site.activate_event(1, 11))  # never listed as active
            lasting = site.activate_event(24, 12)  # listed and linked: still one alarm
            await eventually(lambda: at_least(db, 2), what="the short and the lasting event")
            await polls(site, 4)
            stored = await rows(db)
            assert sorted((r["vendor_event"], r["camera_id"]) for r in stored) == [
                ("1", "11"),
                ("24", "12"),
            ]
            assert lasting.id in {r["source_id"] for r in stored}


async def test_an_event_during_a_communication_gap_is_stored(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 13 item 2: the event starts and ends while the server cannot be read."""
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        cursor = (await client.poll(None)).cursor
        down = static_answer(503, b"Service Unavailable", {"Content-Type": "text/plain"})
        sim.respond("GET", "/v1/events.web", down, times=2)
        for _ in range(2):
            with pytest.raises(BadDeviceResponse):
                await client.poll(cursor)
            event = site.activate_event(2, 13)
            site.end_event(event)
        result = await client.poll(cursor)
        assert [(a.vendor_event, a.camera_id) for a in result.alarms] == [("2", "13")] * 2
        await client.close()


async def test_events_without_ids_seen_both_ways_are_one_alarm_each(
    http: aiohttp.ClientSession,
) -> None:
    site = ExacqSite(event_ids=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        cursor = (await client.poll(None)).cursor
        site.end_event(site.activate_event(1, 11, start=ago(20)))
        site.activate_event(1, 11, start=ago(5))  # same camera and type, another start
        site.activate_event(3, 12, start=ago(5))
        found = []
        for _ in range(3):
            result = await client.poll(cursor)
            found += result.alarms
            cursor = result.cursor
        assert sorted((a.vendor_event, a.camera_id, a.occurred_at) for a in found) == [
            ("1", "11", ago(20)),
            ("1", "11", ago(5)),
            ("3", "12", ago(5)),
        ]
        await client.close()


async def test_unreadable_event_monitoring_never_costs_the_active_events(
    http: aiohttp.ClientSession,
) -> None:
    """A server answering the (assumed) Event Monitoring paths with its login page, or the
    links with garbage: reported once, the active events are still alarms."""
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        login_page = static_answer(200, b"<html>login</html>", {"Content-Type": "text/html"})
        sim.respond("GET", "/v1/eventmonitoring.web", login_page, times=2)
        client = exacq(sim.url(), http, problems)
        site.activate_event(1, 11)
        assert len((await client.poll(None)).alarms) == 1
        assert problems.reported == ["monitoring_profiles"]
        client = exacq(sim.url(), http, problems)  # a server that lists profiles this time
        garbage = static_answer(200, b'{"success": true}', {"Content-Type": "application/json"})
        sim.respond("GET", "/v1/eventmonitoring.web/CMS/triggered", garbage, times=None)
        site.activate_event(3, 12)
        assert len((await client.poll(None)).alarms) == 2
        assert problems.reported == ["monitoring_profiles", "triggered_links"]
        await client.close()


async def test_an_event_that_ends_while_the_commit_failed_is_not_lost(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 15: the runtime keeps the old cursor when a commit fails and polls again; the
    event is no longer active by then (and this server offers no triggered links)."""
    site = ExacqSite(event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        committed = (await client.poll(None)).cursor
        event = site.activate_event(1, 11)
        first = await client.poll(committed)  # its commit fails: `committed` stays
        site.end_event(event)
        again = await client.poll(committed)
        assert [a.source_id for a in first.alarms] == [event.id]
        assert [a.source_id for a in again.alarms] == [event.id]
        after = await client.poll(again.cursor)  # that commit landed: nothing twice
        assert after.alarms == []
        await client.close()
        site.event_monitoring = True  # a restart, now with the link still in the server's 60 s
        client = exacq(sim.url(), http, Problems())
        assert (await client.poll(again.cursor)).alarms == []  # it is in the cursor
        await client.close()


async def test_the_cursor_stays_bounded_and_storable(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Issue 15: an id PostgreSQL refuses (NUL, a lone surrogate) never reaches the cursor,
    and a burst of events leaves at most SEEN_LIMIT remembered occurrences."""
    site = ExacqSite(event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config):
            await polls(site, 1)
            bad = site.activate_event(1, 11)
            bad.id = "e\x00vil\ud800"
            await eventually(lambda: at_least(db, 1), what="the event with an odd id")
            for i in range(SEEN_LIMIT + 50):
                site.end_event(site.activate_event(3, 12, start=ago(i % 50)))
                if i % 100 == 0:
                    await polls(site, 1)  # they end before the next poll: only some listed
            cursor = await db.fetchval("SELECT cursor::text FROM site_state")
            stored = await rows(db)
    assert stored[0]["source_id"] == "e\ufffdvil\ufffd"
    assert "\\u0000" not in cursor and "\\ud800" not in cursor
    assert len(cursor) < 200 * SEEN_LIMIT


# ------------------------------------------------------------------ poison times


async def test_event_starts_in_year_1_and_9999_never_escape_media_status(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 15: the minimal answer (one event, an absurd start): no exception but our own."""
    site = ExacqSite(utc_offset="+00:00", event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        client = exacq(sim.url(), http, problems)
        site.activate_event(1, 11, start=datetime(1, 1, 1, 0, 0, 5, tzinfo=UTC))
        site.activate_event(1, 12, start=datetime(9999, 12, 31, 23, 59, 50, tzinfo=UTC))
        result = await client.poll(None)
        assert len(result.alarms) == 2 and set(problems.reported) == {"event_start"}
        for alarm in result.alarms:
            assert datetime(2000, 1, 1, tzinfo=UTC) < alarm.occurred_at
            for media in alarm.media:
                with contextlib.suppress(VendorError):  # ours are fine; OverflowError was not
                    await client.media_status(media.kind, media.locator)
        for when in ("0001-01-01T00:00:05+00:00", "9999-12-31T23:59:50+00:00"):
            for kind in (MediaKind.SNAPSHOT, MediaKind.VIDEO):
                probe = await client.media_status(kind, {"camera": "11", "time": when, "key": "k"})
                assert probe.state == "unavailable"  # a row stored before this fix
        await client.close()


async def test_odd_event_ids_are_reported_and_the_event_still_an_alarm(
    http: aiohttp.ClientSession,
) -> None:
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        client = exacq(sim.url(), http, problems)
        start = "2026-11-21T05:00:00-05:00"
        body = (
            '{"success": true, "events": ['
            f'{{"id": NaN, "type": 1, "sourceId": 11, "start": "{start}"}},'
            f'{{"id": 1.5, "type": 2, "sourceId": 11, "start": "{start}"}},'
            f'{{"id": {{"x": 1}}, "type": 3, "sourceId": 11, "start": "{start}"}}]}}'
        )
        sim.respond("GET", "/v1/events.web", static_answer(200, body, JSON))
        result = await client.poll(None)
        assert sorted(a.source_id for a in result.alarms) == [
            f"{kind}:11:{start}" for kind in (1, 2, 3)
        ]
        assert problems.reported == ["event_id", "event_id"]  # NaN is no id at all
        await client.close()


async def test_times_without_offset_are_in_the_servers_timezone(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 13 item 7: config.web's `timezone` (hours) places times that carry no offset."""
    site = ExacqSite(utc_offset="-05:00", naive_times=True)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        event = site.activate_event(1, 11, start=ago(30))
        result = await client.poll(None)
        assert [a.occurred_at for a in result.alarms] == [event.start]
        await client.close()


@pytest.mark.parametrize(
    ("value", "offset_h", "reported"),
    [
        (-5, -5, []),
        (5.5, 5.5, []),
        ("-05:00", -5, []),
        ("America/New_York", -5, []),
        ("EST5", 0, ["timezone"]),
        (99, 0, ["timezone"]),
        (None, 0, []),
    ],
)
async def test_the_servers_timezone_in_every_reasonable_form(
    value: Any, offset_h: float, reported: list[str], http: aiohttp.ClientSession
) -> None:
    site = ExacqSite(naive_times=True, utc_offset="+00:00")
    async with ExacqSimulator({"default": site}) as sim:
        config = {"success": True, "Cameras": [{"id": 11, "name": "Gate cam"}], "timezone": value}
        answer = static_answer(200, json.dumps(config), {"Content-Type": "application/json"})
        sim.respond("GET", "/v1/config.web", answer)
        problems = Problems()
        client = exacq(sim.url(), http, problems)
        naive = datetime(2026, 11, 21, 5, 0, tzinfo=UTC)  # listed as "2026-11-21T05:00:00"
        site.activate_event(1, 11, start=naive)
        (alarm,) = (await client.poll(None)).alarms
        assert alarm.occurred_at == naive - timedelta(hours=offset_h)
        assert problems.reported == reported
        await client.close()


# ------------------------------------------------------------------ media


async def test_the_snapshot_is_the_recorded_frame_never_a_later_live_one(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 13 item 6."""
    site = ExacqSite(recorded=False, event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        site.activate_event(1, 11, start=ago(5))
        (alarm,) = (await client.poll(None)).alarms
        snapshot = next(m for m in alarm.media if m.kind is MediaKind.SNAPSHOT)
        probe = await client.media_status(snapshot.kind, snapshot.locator)
        assert probe.path is not None
        with pytest.raises(MediaNotReady):
            async with client.download(probe.path):
                pass
        assert site.requests["GET /v1/video.web"] == 0  # no live frame in its place
        site.recorded = True
        async with client.download(probe.path) as download:
            assert download.content_type == "image/jpeg"
        assert site.requests["GET /v1/frame.web"] == 2
        await client.close()


async def video_probe(client: ExacqClient, site: ExacqSite) -> Any:
    site.activate_event(1, 11, start=ago(3))
    (alarm,) = (await client.poll(None)).alarms
    return next(m for m in alarm.media if m.kind is MediaKind.VIDEO)


async def test_an_export_the_server_cleaned_up_is_made_again(
    http: aiohttp.ClientSession,
) -> None:
    """The manual: an export is cleaned up after 15 minutes of inactivity. The status answers
    404 for it: the one case for a second export, which is then downloaded."""
    site = ExacqSite(export_seconds=0.5, event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems(), pre_seconds=1, post_seconds=0)
        video = await video_probe(client, site)
        assert (await client.media_status(video.kind, video.locator)).state == "pending"
        (first,) = site.exports.values()
        site.export_idle_s = 0.0  # as if 15 minutes passed without a request naming it
        probe = await client.media_status(video.kind, video.locator)
        assert probe.state == "pending" and "gone" in probe.detail
        assert first["cleaned"] and len(site.exports) == 1  # not made again within that call
        site.export_idle_s = 900.0
        while (probe := await client.media_status(video.kind, video.locator)).state != "ready":
            await asyncio.sleep(0.1)
        assert len(site.exports) == 2
        assert probe.path is not None
        async with client.download(probe.path) as download:
            async for _ in download.chunks:
                pass
        second = next(e for e in site.exports.values() if e is not first)
        assert second["downloaded"] and second["finished"] and not first["downloaded"]
        await client.close()


async def test_an_export_is_ready_at_status_completed_not_at_100_percent(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 13 item 4: progress reaches 100 a while before the status says completed."""
    site = ExacqSite(export_seconds=0.2, finalize_seconds=1.0, event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems(), pre_seconds=1, post_seconds=0)
        video = await video_probe(client, site)
        while (probe := await client.media_status(video.kind, video.locator)).state != "ready":
            await asyncio.sleep(0.1)
        (export,) = site.exports.values()
        assert site.export_completed(export)  # was: ready at 100 %, download refused
        assert probe.path is not None
        async with client.download(probe.path) as download:
            assert download.content_type == "video/mp4"
            async for _ in download.chunks:
                pass
        assert len(site.exports) == 1 and export["finished"] and export["format"] == "mp4"
        await client.close()


@pytest.mark.parametrize(
    ("offered", "configured", "chosen", "reported"),
    [
        (("ps_zip", "avi"), None, "ps_zip", []),
        (("ps_zip", "avi", "mp4"), "avi", "avi", []),
        (("ps_zip", "avi"), "mp4", "ps_zip", ["export_format"]),
    ],
)
async def test_the_export_format_comes_from_the_servers_list(
    offered: tuple[str, ...],
    configured: str | None,
    chosen: str,
    reported: list[str],
    http: aiohttp.ClientSession,
) -> None:
    site = ExacqSite(export_seconds=0, export_formats=offered, event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        problems = Problems()
        options: dict[str, Any] = {"pre_seconds": 1, "post_seconds": 0}
        if configured:
            options["export_format"] = configured
        client = exacq(sim.url(), http, problems, **options)
        video = await video_probe(client, site)
        await eventually(
            lambda: _ready(client, video), what="export ready", timeout=5
        )  # was: "mp4" asked for, refused
        assert [export["format"] for export in site.exports.values()] == [chosen]
        assert problems.reported == reported
        await client.close()


async def _ready(client: ExacqClient, video: Any) -> bool:
    return (await client.media_status(video.kind, video.locator)).state == "ready"


async def test_a_business_success_false_is_no_new_login(http: aiohttp.ClientSession) -> None:
    """Issue 13 item 7: a refusal in a 200 `success: false` is not an expired session."""
    site = ExacqSite(failure_status=200, event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems(), pre_seconds=0, post_seconds=0)
        await client.poll(None)
        locator = {"camera": "99", "time": ago(5).isoformat(), "key": "k"}  # no such camera
        for _ in range(3):
            with pytest.raises(BadDeviceResponse, match="unknown camera 99"):
                await client.media_status(MediaKind.VIDEO, locator)
        assert site.logins == 1 and site.sessions == 1
        await client.close()


# ------------------------------------------------------------------ actions, probe


async def test_a_200_invalid_request_is_a_refused_soft_trigger(
    http: aiohttp.ClientSession,
) -> None:
    """Issue 13 item 5: the manual's answer, text/plain `Invalid Request`, with a 200."""
    site = ExacqSite(refusal_status=200)
    async with ExacqSimulator({"default": site}) as sim:
        client = exacq(sim.url(), http, Problems())
        action = Action(1, "x1", "soft_trigger", "99", {"duration_s": 1}, 0, None)
        with pytest.raises(DeviceRefused, match="Invalid Request"):
            await client.perform(action)
        assert [tid for tid, _, _ in site.trigger_sets] == [99]  # no hold, no `off` after it
        await client.close()


async def test_probe_reports_time_zone_export_formats_and_event_monitoring(
    tmp_path: Path,
) -> None:
    site = ExacqSite(utc_offset="-05:00", export_formats=("ps_zip", "avi"))
    async with ExacqSimulator({"default": site}) as sim:
        out = io.StringIO()
        code = await run_probe(exacq_site("x1", sim.url()), out=out)
        text = out.getvalue()
    assert code == 0, text
    assert "[PASS] server time zone" in text and "server time zone UTC-05:00" in text
    assert "[PASS] export formats" in text and "exports are made as ps_zip" in text
    assert "[PASS] event monitoring" in text and "CMS" in text
