"""Alarm floods: everything stored, the excess grouped, other sites unaffected."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from cms_ingest.domain import Alarm, EventType, MediaKind, MediaRequest
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, running_daemon

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def alarm(n: int, camera: str = "1") -> Alarm:
    return Alarm(
        site_id="s",
        vendor="davantis",
        source_id=str(n),
        event_type=EventType.MOTION,
        vendor_event="1",
        description="",
        occurred_at=T0,
        camera_id=camera,
        media=(MediaRequest(MediaKind.SNAPSHOT, {"alarm_id": n}),),
    )


def test_beyond_the_limit_alarms_join_the_first_one_and_a_quiet_minute_ends_it() -> None:
    tracker = FloodTracker(max_per_minute=3, quiet_s=60, fetch_media=False)
    out = [tracker.apply([alarm(n)], T0 + timedelta(seconds=n))[0] for n in range(1, 8)]
    assert [a.group_of for a in out] == [None, None, None, None, "4", "4", "4"]
    assert out[4].media == () and out[3].media  # the head keeps its media, members don't
    other = tracker.apply([alarm(100, camera="2")], T0 + timedelta(seconds=8))[0]
    assert other.group_of is None  # per camera
    later = tracker.apply([alarm(8)], T0 + timedelta(seconds=7 + 61))[0]
    assert later.group_of is None  # a quiet minute ended the burst


def test_marks_name_only_what_the_flood_changes_and_untouched_alarms_are_not_copied() -> None:
    tracker = FloodTracker(max_per_minute=1, quiet_s=60, fetch_media=False)
    first, head, member = alarm(1), alarm(2), alarm(3)
    assert [tracker.marks(a, T0) for a in (first, head, member)] == [
        {},
        {},  # the burst's head
        {"group_of": "2", "media": ()},
    ]
    same = alarm(4, camera="9")
    assert tracker.apply([same], T0)[0] is same


def test_a_batch_polled_again_gets_the_same_answer() -> None:
    """A failed commit brings the same alarms back: no double count, no self-grouping."""
    tracker = FloodTracker(max_per_minute=2, quiet_s=60, fetch_media=False)
    batch = [alarm(n) for n in range(1, 6)]
    first = tracker.apply(batch, T0)
    again = tracker.apply(batch, T0 + timedelta(seconds=1))
    assert (
        [a.group_of for a in again] == [a.group_of for a in first] == [None, None, None, "3", "3"]
    )
    assert tracker.apply([alarm(6)], T0 + timedelta(seconds=2))[0].group_of == "3"


def test_fetch_media_keeps_the_members_media() -> None:
    tracker = FloodTracker(max_per_minute=1, quiet_s=60, fetch_media=True)
    out = tracker.apply([alarm(1), alarm(2), alarm(3)], T0)
    assert out[2].group_of == "2" and out[2].media


async def test_a_flood_of_500_from_one_camera_beside_a_normal_site(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    noisy, normal = DavantisSite(media_delay=0), DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": noisy, "normal": normal}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [davantis_site("noisy", sim.url()), davantis_site("normal", sim.url("normal"))],
        )
        async with running_daemon(config):
            for site_id in ("noisy", "normal"):
                await eventually(lambda s=site_id: _has_cursor(db, s), what=f"{site_id} cursor")
            noisy.add_alarms(500, event=1, camera=3)
            added = time.monotonic()
            normal.add_alarm(event=11, camera=1)
            await eventually(
                lambda: _count(db, "normal", 1), timeout=10, what="the normal site's alarm"
            )
            normal_latency = time.monotonic() - added
            await eventually(lambda: _count(db, "noisy", 500), timeout=30, what="all 500 stored")
            heads = await db.fetch(
                "SELECT id, repeat_count FROM alarms WHERE site_id = 'noisy' AND repeat_count > 0"
            )
            assert len(heads) == 1
            members = await db.fetchval(
                "SELECT count(*) FROM alarms WHERE site_id = 'noisy' AND group_id = $1",
                heads[0]["id"],
            )
            assert members == heads[0]["repeat_count"] == 500 - 21  # the limit (20) and the head
            member_media = await db.fetchval(
                "SELECT count(*) FROM alarm_media m JOIN alarms a ON a.id = m.alarm_id "
                "WHERE a.group_id IS NOT NULL"
            )
            assert member_media == 0  # not fetched (flood.fetch_media is false)
            assert await db.fetchval("SELECT group_id FROM alarms WHERE site_id = 'normal'") is None
            assert normal_latency < 3


async def _has_cursor(db: asyncpg.Connection, site_id: str) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM site_state WHERE site_id = $1", site_id))


async def _count(db: asyncpg.Connection, site_id: str, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms WHERE site_id = $1", site_id)) >= n
