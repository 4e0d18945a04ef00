"""exacqVision sites: the daemon against the exacq simulator over real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.vendors.exacq import API, event_key
from tests.conftest import eventually
from tests.support import app_config, exacq_site, final, running_daemon


async def alarm_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM alarms ORDER BY id")


async def count_at_least(db: asyncpg.Connection, n: int) -> bool:
    return len(await alarm_rows(db)) >= n


async def has_cursor(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL"))


async def more_polls(site: ExacqSite, n: int) -> None:
    """Until the daemon has polled the site's events `n` more times."""
    target = site.requests["GET /v1/events.web"] + n
    await eventually(lambda: site.requests["GET /v1/events.web"] >= target, what=f"{n} polls")


def test_event_identity_without_id() -> None:
    assert event_key({"id": "abc", "type": 1}) == "abc"
    assert event_key({"type": 1, "sourceId": 11, "start": "2026-11-21T05:00:00-05:00"}) == (
        "1:11:2026-11-21T05:00:00-05:00"
    )
    assert event_key({"type": 1}) is None
    assert API.events == "/v1/events.web"  # the assumed path lives in one place


async def test_a_lasting_event_is_one_alarm_also_across_a_restart(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = ExacqSite(event_ids=False)  # identified by type, source and start
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config):
            event = site.activate_event(1, 11)
            await eventually(lambda: count_at_least(db, 1), what="the event")
            await more_polls(site, 20)
        async with running_daemon(config):  # still active after the restart: not new
            await more_polls(site, 20)
            assert len(await alarm_rows(db)) == 1
            site.end_event(event)
            await more_polls(site, 2)  # the daemon has seen it end
            site.activate_event(1, 11)  # ends and starts again: a second alarm
            await eventually(lambda: count_at_least(db, 2), what="the recurrence")
            rows = await alarm_rows(db)
            assert [r["event_type"] for r in rows] == ["motion", "motion"]
            assert rows[0]["source_id"] != rows[1]["source_id"]
            assert rows[0]["camera_name"] == "Gate cam" and rows[0]["vendor_event"] == "1"
            assert rows[0]["description"] == "Video motion on Gate cam"


CONTRACT_TYPES = {1: "motion", 2: "video_loss", 3: "input", 6: "input", 22: "input"}
CONTRACT_TYPES |= {21: "camera_offline", 24: "analytics", 27: "intrusion", 28: "intrusion"}


async def test_every_event_type_is_ingested_and_mapped(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Issue 13 item 1: no default filter (type 7, device failure, was dropped before)."""
    site = ExacqSite(event_monitoring=False)
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first poll")
            for kind in range(1, 30):
                site.activate_event(kind, 12)
            await eventually(lambda: count_at_least(db, 29), what="29 events")
            rows = await alarm_rows(db)
            got = {int(r["vendor_event"]): r["event_type"] for r in rows}
            assert got == {kind: CONTRACT_TYPES.get(kind, "system") for kind in range(1, 30)}


async def test_event_types_filter_only_when_configured(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        options = {"event_types": [1, 7]}
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url(), options=options)])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first poll")
            for kind in (1, 7, 11):  # 11 (storage) is not in the configured filter
                site.activate_event(kind, 12)
            await eventually(lambda: count_at_least(db, 2), what="2 events")
            await more_polls(site, 2)  # time for the storage event to land, were it let through
            rows = await alarm_rows(db)
            assert sorted(int(r["vendor_event"]) for r in rows) == [1, 7]


@pytest.mark.parametrize("mode", ["401", "403", "302", "html", "success_false"])
async def test_each_expired_session_symptom_means_one_new_login(
    mode: str, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = ExacqSite(expiry_mode=mode, session_key="sessionID" if mode == "403" else "sessionId")
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config) as daemon:
            await eventually(lambda: has_cursor(db), what="first poll")
            assert site.logins == 1
            site.expire_sessions()
            site.activate_event(1, 11)
            await eventually(lambda: count_at_least(db, 1), what=f"event after a {mode} expiry")
            assert site.logins == 2
            assert daemon.sites is not None
            assert daemon.sites.by_id["x1"].health.up is True
        assert site.logouts == 2  # the replaced session after the new login; ours on shutdown


async def test_frame_and_a_slow_export(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from cms_ingest.config import MediaConfig

    site = ExacqSite(export_seconds=2.0)
    async with ExacqSimulator({"default": site}) as sim:
        options = {"pre_seconds": 1, "post_seconds": 1}
        config = app_config(
            database_url,
            tmp_path,
            [exacq_site("x1", sim.url(), options=options)],
            media=MediaConfig(retry_base_s=0.2, retry_max_s=0.5),
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first poll")
            site.activate_event(1, 13, start=datetime.now(UTC) - timedelta(seconds=1))

            async def settled() -> bool:
                row = await db.fetchrow(  # one statement: two would race a commit
                    "SELECT count(*) FILTER (WHERE state = 'pending') AS pending, "
                    "count(*) AS total FROM alarm_media"
                )
                return row["total"] == 2 and row["pending"] == 0

            await eventually(settled, timeout=20, what="media settled")
            rows = await db.fetch("SELECT * FROM alarm_media ORDER BY id")
            alarms = await db.fetch("SELECT id, source_id FROM alarms")
            media = {r["kind"]: r for r in rows}
            assert len(rows) == 2, (rows, alarms)
            assert (
                media["snapshot"]["state"] == "ready"
                and media["snapshot"]["content_type"] == "image/jpeg"
            )
            video = media["video"]
            assert video["state"] == "ready", video["last_error"]
            assert video["content_type"] == "video/mp4" and video["attempts"] >= 3  # it was slow
            exports = list(site.exports.values())
            assert len(exports) == 1 and exports[0]["finished"]  # finished: the server freed it
            assert exports[0]["downloaded"]
            assert site.requests["GET /v1/export.web"] >= 4


async def test_soft_trigger_held_for_5_s_then_off(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config):
            started = time.monotonic()
            action_id = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target, params) "
                "VALUES ('x1', 'soft_trigger', '3', '{\"duration_s\": 5}') RETURNING id"
            )
            row = await final(db, int(action_id))
            assert row["state"] == "succeeded", row["error"]
            transitions = site.trigger_transitions[3]
            assert [state for _, state in transitions] == ["on", "off"]  # on the whole time
            held = transitions[1][0] - transitions[0][0]
            assert 4.8 <= held <= 6.0
            assert site.trigger_state(3) == "off"
            assert time.monotonic() - started >= 5
            unknown = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target) VALUES ('x1', 'soft_trigger', '99') RETURNING id"
            )
            refused = await final(db, int(unknown))
            assert refused["state"] == "failed" and "refused" in refused["error"]


async def test_daemon_stopping_mid_hold_turns_the_trigger_off(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = ExacqSite()
    async with ExacqSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [exacq_site("x1", sim.url())])
        async with running_daemon(config):
            await db.execute(
                "INSERT INTO actions (site_id, kind, target, params) "
                "VALUES ('x1', 'soft_trigger', '4', '{\"duration_s\": 60}')"
            )
            await eventually(lambda: site.trigger_state(4) == "on", what="hold started")
            await asyncio.sleep(1.5)
        # The daemon stopped (SIGTERM path): the hold ended with an explicit off.
        assert site.trigger_state(4) == "off"
        assert [state for _, state in site.trigger_transitions[4]] == ["on", "off"]
        assert site.trigger_sets[-1][1] == "off"
        row = await db.fetchrow("SELECT state, error FROM actions")
        assert row["state"] == "failed" and "stopped" in row["error"]


async def test_an_export_made_before_a_restart_is_asked_for_again_not_made_twice(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The export id lives in the media row's locator, not only in the client's memory: the
    manual has no call that lists exports, so a daemon that forgot it would make another."""
    from datetime import UTC, datetime, timedelta

    from cms_ingest.config import MediaConfig

    site = ExacqSite(export_seconds=3.0)
    async with ExacqSimulator({"default": site}) as sim:
        options = {"pre_seconds": 1, "post_seconds": 1}
        config = app_config(
            database_url,
            tmp_path,
            [exacq_site("x1", sim.url(), options=options)],
            media=MediaConfig(retry_base_s=0.2, retry_max_s=0.5),
        )

        async def video_state() -> str | None:
            return await db.fetchval("SELECT state FROM alarm_media WHERE kind = 'video'")

        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first poll")
            site.activate_event(1, 13, start=datetime.now(UTC) - timedelta(seconds=2))
            await eventually(lambda: len(site.exports) == 1, timeout=15, what="an export made")

            async def remembered() -> bool:
                locator = await db.fetchval(
                    "SELECT locator->>'export_id' FROM alarm_media WHERE kind = 'video'"
                )
                return locator is not None

            await eventually(remembered, what="the export id kept in the media row")
        assert await video_state() == "pending"  # stopped while the export was being made
        async with running_daemon(config):

            async def settled() -> bool:
                return await video_state() != "pending"

            await eventually(settled, timeout=20, what="the video settled")
            assert await video_state() == "ready"
        assert len(site.exports) == 1  # the same export, asked for again
