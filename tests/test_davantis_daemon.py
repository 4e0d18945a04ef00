"""The daemon against simulated Davantis sites over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, running_daemon


async def alarm_ids(db: asyncpg.Connection, site_id: str = "d1") -> list[int]:
    rows = await db.fetch(
        "SELECT source_id FROM alarms WHERE site_id = $1 ORDER BY source_id::bigint", site_id
    )
    return [int(row["source_id"]) for row in rows]


async def cursor_of(db: asyncpg.Connection, site_id: str = "d1") -> int | None:
    value = await db.fetchval(
        "SELECT cursor->>'last_id' FROM site_state WHERE site_id = $1", site_id
    )
    return None if value is None else int(value)


async def has_cursor(db: asyncpg.Connection, site_id: str = "d1") -> bool:
    return await cursor_of(db, site_id) is not None


@pytest.mark.parametrize("connections", ["keep", "close"])
async def test_new_alarms_become_rows_with_mapping(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, connections: str
) -> None:
    # The manual does not say whether the device keeps connections open: both ways work
    # (closed ones: the lean path's kept connection is found closed and replaced).
    site = DavantisSite(media_delay=0.2)
    site.add_alarms(5)  # history: a first start takes the newest id, no backlog flood
    sim = DavantisSimulator({"default": site})
    sim.close_connections = connections == "close"
    async with sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config) as daemon:
            await eventually(lambda: has_cursor(db), what="first cursor")
            assert await cursor_of(db) == 5
            # Clock skew read off the device's Date header (the simulator is on our clock).
            assert daemon.sites is not None
            skew = daemon.sites.by_id["d1"].problems.skew_s
            assert skew is not None and abs(skew) < 2
            site.add_alarm(event=11, camera=2)
            site.add_alarm(event=1, camera=1)
            site.add_alarm(event=2, camera=3, snapshot="unavailable", video="unavailable")
            await eventually(lambda: _count(db, 3), what="3 alarms")
            rows = await db.fetch("SELECT * FROM alarms ORDER BY source_id::bigint")
            assert [r["source_id"] for r in rows] == ["6", "7", "8"]
            assert [r["event_type"] for r in rows] == ["intrusion", "motion", "person"]
            assert [r["vendor_event"] for r in rows] == ["11", "1", "2"]
            assert [r["priority"] for r in rows] == [1, 5, 2]
            assert all(r["vendor"] == "davantis" and r["status"] == "new" for r in rows)
            assert all(r["armed"] is True for r in rows)
            assert rows[0]["camera_id"] == "2" and rows[0]["camera_name"]
            assert rows[0]["description"] == "Intrusion detected"
            assert '"idcamera"' in rows[0]["raw"]
            assert rows[0]["occurred_at"] <= rows[0]["received_at"]
            # Media: ready after the device finishes recording; "unavailable" stays so.
            await eventually(lambda: _media_settled(db, 6), timeout=15, what="media settled")
            media = {
                (r["alarm_id"], r["kind"]): r
                for r in await db.fetch(
                    "SELECT m.*, a.source_id FROM alarm_media m JOIN alarms a ON a.id = m.alarm_id"
                )
            }
            states = sorted((r["source_id"], r["kind"], r["state"]) for r in media.values())
            assert states == [
                ("6", "snapshot", "ready"),
                ("6", "video", "ready"),
                ("7", "snapshot", "ready"),
                ("7", "video", "ready"),
                ("8", "snapshot", "unavailable"),
                ("8", "video", "unavailable"),
            ]
            snapshot = next(
                r for r in media.values() if r["source_id"] == "6" and r["kind"] == "snapshot"
            )
            alarm_id = snapshot["alarm_id"]
            day = rows[0]["occurred_at"].strftime("%Y/%m/%d")
            assert snapshot["path"] == f"d1/{day}/{alarm_id}-snapshot.jpg"
            assert snapshot["content_type"] == "image/jpeg"
            stored = tmp_path / "media" / snapshot["path"]
            assert stored.read_bytes()[:3] == b"\xff\xd8\xff"
            assert snapshot["size_bytes"] == stored.stat().st_size
            import hashlib

            assert snapshot["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
            video = next(
                r for r in media.values() if r["source_id"] == "6" and r["kind"] == "video"
            )
            assert (
                video["path"].endswith(f"{alarm_id}-video.mp4")
                and video["content_type"] == "video/mp4"
            )
    # The media URLs the device advertises (a NAT address) were never used.
    assert not list((tmp_path / "media" / ".partial").glob("*"))


async def _count(db: asyncpg.Connection, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms")) >= n


async def _media_settled(db: asyncpg.Connection, n: int) -> bool:
    # One statement: two would race a commit landing between them.
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'pending') AS pending, count(*) AS total "
        "FROM alarm_media"
    )
    return row["pending"] == 0 and row["total"] >= n


async def test_catch_up_of_750_alarms_after_downtime(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    site.add_alarms(2)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
        # The daemon is down while 750 alarms arrive: 2.5 times the 300-per-answer cap.
        site.add_alarms(750, event=1)
        queries: list[dict[str, str]] = []

        async def recorded(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
            queries.append(dict(request.query))
            return await device()

        sim.respond("GET", "/alarms", recorded, times=None)
        async with running_daemon(config):
            await eventually(lambda: _count(db, 750), timeout=30, what="750 alarms")
            await eventually(lambda: has_cursor(db), what="cursor")
            assert await alarm_ids(db) == list(range(3, 753))
            assert await cursor_of(db) == 752
            # It paged back with max_date (twice: 300 + 300 + 150) from the stored cursor
            # (min_id one below it: the cursor's own alarm comes back, a reset check), rather
            # than dropping the older ones.
            paged_back = [q for q in queries if "max_date" in q and q.get("min_id") == "1"]
            assert len(paged_back) >= 2, queries


async def test_backfill_ingests_history_on_first_start(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    site = DavantisSite(media_delay=0)
    site.add_alarm(started=datetime.now(UTC) - timedelta(hours=5))
    site.add_alarm(started=datetime.now(UTC) - timedelta(minutes=30))
    site.add_alarm(started=datetime.now(UTC) - timedelta(minutes=10))
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options={"backfill": "1h"})]
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
            assert await alarm_ids(db) == [2, 3]
            assert await cursor_of(db) == 3


async def test_token_expiry_and_revocation_during_polling(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
            site.add_alarm()
            await eventually(lambda: _count(db, 1), what="alarm 1")
            site.expire_access_tokens()  # -> access_token_expired: refresh with the refresh token
            site.add_alarm()
            await eventually(lambda: _count(db, 2), what="alarm 2 after expiry")
            assert site.refreshes >= 1
            logins = site.logins
            site.revoke_tokens()  # access and refresh both refused: log in again
            site.add_alarm()
            await eventually(lambda: _count(db, 3), what="alarm 3 after revocation")
            assert site.logins == logins + 1
            assert await alarm_ids(db) == [1, 2, 3]


async def test_token_with_short_lifetime_is_refreshed_before_expiry(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0, access_ttl=2.0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: site.refreshes >= 2, timeout=10, what="two refreshes")
            site.add_alarm()
            await eventually(lambda: _count(db, 1), what="alarm")
    assert site.logins == 1  # refreshed ahead of expiry, never had to log in again


async def test_faulty_site_recovers_and_never_delays_another(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    good, bad = DavantisSite(media_delay=0), DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": good, "bad": bad}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("good", sim.url()), davantis_site("bad", sim.url("bad"))],
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: has_cursor(db, "bad"), what="bad cursor")
            await eventually(lambda: has_cursor(db, "good"), what="good cursor")
            assert daemon.sites is not None
            bad_health = daemon.sites.by_id["bad"].health
            for fault in ("malformed", "fail", "slow"):
                if fault == "malformed":
                    bad.malformed_alarm_polls(5)
                elif fault == "fail":
                    bad.fail_alarm_polls(6, status=500)  # a burst of 500s (~10 s of backoff)
                else:
                    bad.slow_alarm_polls(2, delay=3.0)  # beyond the 2 s request timeout
                bad.add_alarm()
                good.add_alarm()
                # The healthy site's alarm lands promptly while the other one is failing.
                await eventually(
                    lambda: _site_count(db, "good", len(good.alarms)),
                    timeout=2.0,
                    what="good alarm",
                )
                await eventually(
                    lambda: _site_count(db, "bad", len(bad.alarms)),
                    timeout=30,
                    what=f"bad recovers from {fault}",
                )
                # The poll's rows commit first, then the poller marks the site up: a
                # moment apart, so await it rather than read it once.
                await eventually(lambda: bad_health.up, timeout=2.0, what=f"up after {fault}")
            assert await alarm_ids(db, "bad") == [1, 2, 3]
            labels = {"outcome": "bad_response", "site_id": "bad", "vendor": "davantis"}
            assert daemon.metrics.sample("cms_ingest_polls_total", **labels) >= 5


async def _site_count(db: asyncpg.Connection, site_id: str, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms WHERE site_id = $1", site_id)) >= n


async def test_media_late_missing_too_large_and_past_deadline(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from cms_ingest.config import MediaConfig

    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("d1", sim.url(), media_deadline_s=3.0)],
            media=MediaConfig(max_bytes=10_000, retry_base_s=0.2, retry_max_s=0.5),
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
            site.add_alarm(media_delay=1.0)  # 1: late, then ready
            site.add_alarm(snapshot="unavailable", video="unavailable")  # 2: none at all
            site.add_alarm(video_size=50_000)  # 3: video over the cap
            site.add_alarm(media_delay=3600)  # 4: never ready in time
            site.add_alarm(event=0)  # 5: system event: no media
            await eventually(lambda: _count(db, 5), what="5 alarms")
            await eventually(lambda: _media_settled(db, 10), timeout=20, what="all media settled")
            rows = await db.fetch(
                "SELECT a.source_id, m.kind, m.state, m.last_error, m.attempts FROM alarm_media m "
                "JOIN alarms a ON a.id = m.alarm_id ORDER BY a.source_id::bigint, m.kind"
            )
            got = {(r["source_id"], r["kind"]): r for r in rows}
            assert (
                got[("1", "snapshot")]["state"] == "ready"
                and got[("1", "snapshot")]["attempts"] >= 2
            )
            assert got[("1", "video")]["state"] == "ready"
            assert got[("2", "snapshot")]["state"] == "unavailable"
            assert got[("3", "snapshot")]["state"] == "ready"
            assert got[("3", "video")]["state"] == "failed"
            assert "cap" in got[("3", "video")]["last_error"]
            assert got[("4", "video")]["state"] == "failed"
            assert "deadline" in got[("4", "video")]["last_error"]
            assert "recording" in got[("4", "video")]["last_error"]
            assert got[("5", "snapshot")]["state"] == "unavailable"
            assert not [p for p in (tmp_path / "media").rglob("*-video.*") if "/3-" in str(p)]


async def test_every_event_code_maps_and_armed_only_false_takes_all(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options={"armed_only": False})]
        )
        async with running_daemon(config):
            for event in (0, 1, 2, 3, 7, 10, 11, 18, 42):
                site.add_alarm(event=event, armed=False)  # disarmed: only seen without cra=yes
            site.set_input(1, False)  # raises event 102 "Disarmed"
            site.set_input(1, True)  # and 102 "Armed"
            await eventually(lambda: _count(db, 11), what="11 alarms")
            rows = await db.fetch(
                "SELECT vendor_event, event_type, armed FROM alarms ORDER BY source_id::bigint"
            )
            assert [(r["vendor_event"], r["event_type"]) for r in rows] == [
                ("0", "system"),
                ("1", "motion"),
                ("2", "person"),
                ("3", "vehicle"),
                ("7", "other"),
                ("10", "sabotage"),
                ("11", "intrusion"),
                ("18", "input"),
                ("42", "other"),
                ("102", "disarmed"),
                ("102", "armed"),
            ]
            # Without cra=yes the state comes from the inputs (all armed), then from event 102.
            assert [r["armed"] for r in rows] == [True] * 9 + [False, True]
            assert "cra=" not in str(site.requests)


async def test_one_token_renewal_however_many_callers(tmp_path: Path) -> None:
    import aiohttp

    from cms_ingest.domain import MediaKind
    from cms_ingest.runtime.sites import build_site

    site = DavantisSite(media_delay=0)
    site.add_alarms(3)
    async with DavantisSimulator({"default": site}) as sim, aiohttp.ClientSession() as session:
        client = build_site(davantis_site("d1", sim.url()), session).client
        await client.poll(None)
        assert (site.logins, site.refreshes) == (1, 0)
        site.expire_access_tokens()
        # The poller, the media fetcher and the action worker all hit the expiry at once.
        await asyncio.gather(
            *(client.poll({"last_id": 0}) for _ in range(5)),
            *(client.media_status(MediaKind.SNAPSHOT, {"alarm_id": 2}) for _ in range(5)),
        )
        assert (site.logins, site.refreshes) == (1, 1)


async def test_priority_overrides_per_site_and_camera(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        overrides = {"priorities": {"motion": 4}, "camera_priorities": {"2": {"intrusion": 3}}}
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url(), **overrides)])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
            site.add_alarm(event=1, camera=1)  # motion: the site's 4
            site.add_alarm(event=11, camera=2)  # intrusion on camera 2: the camera's 3
            site.add_alarm(event=11, camera=1)  # intrusion elsewhere: the CMS default 1
            await eventually(lambda: _count(db, 3), what="3 alarms")
            rows = await db.fetch("SELECT priority FROM alarms ORDER BY source_id::bigint")
            assert [r["priority"] for r in rows] == [4, 3, 1]


async def test_armed_state_per_camera_from_inputs_and_arming_events(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0, cameras=4)  # input 1 covers cameras 1-2, input 2 3-4
    async with DavantisSimulator({"default": site}) as sim:
        options = {"armed_only": False}
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="first cursor")
            site.set_input(1, False)  # someone on site disarms the perimeter (cameras 1-2)
            await eventually(lambda: _count(db, 1), what="the 102 Disarmed event")
            site.add_alarm(event=2, camera=1)
            site.add_alarm(event=2, camera=3)
            await eventually(lambda: _count(db, 3), what="two person alarms")
            rows = await db.fetch(
                "SELECT event_type, camera_id, armed FROM alarms ORDER BY source_id::bigint"
            )
            assert [(r["event_type"], r["camera_id"], r["armed"]) for r in rows] == [
                ("disarmed", "0", False),
                ("person", "1", False),  # its input is disarmed
                ("person", "3", True),  # the other input is still armed
            ]


async def test_a_site_back_after_a_hand_off_gets_a_fresh_client(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A site this daemon gave up and took again starts like after a restart: a new client
    (new login, no session or in-memory state from the earlier tenure), from the stored
    cursor; the old client is closed only later (an action may still run on it)."""
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config) as daemon:
            assert daemon.sites is not None
            assert daemon.keeper is not None
            assert daemon.pollers is not None
            await eventually(lambda: has_cursor(db), what="first cursor")
            site.add_alarm()
            await eventually(lambda: _count(db, 1), what="alarm before the hand-off")
            old_client, logins = daemon.sites.by_id["d1"].client, site.logins
            await daemon.keeper.release(["d1"], reason="test")
            assert "d1" not in daemon.pollers.held
            site.add_alarm()  # raised while nobody holds the site
            held = daemon.pollers.held
            await eventually(lambda: "d1" in held, what="lease taken again")
            await eventually(lambda: _count(db, 2), what="alarm raised meanwhile")
            assert daemon.sites.by_id["d1"].client is not old_client
            assert site.logins == logins + 1  # the new client logged in
            site.add_alarm()
            await eventually(lambda: _count(db, 3), what="alarm after")
            assert await alarm_ids(db) == [1, 2, 3]  # each once, the one raised meanwhile too
            retired = [client for _since, client in daemon.sites._retired]
            assert retired == [old_client]  # kept open for actions still running on it
            await daemon.sites.close_retired(0)
            assert daemon.sites._retired == []
