"""The daemon against Davantis sites that behave as the manual allows but our first
simulator did not: a device reset, arming events in other languages, inputs that do not
name their cameras, a catch-up longer than a poll's page cap. Real HTTP, real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from cms_ingest.metrics import Metrics
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL
from tests.conftest import eventually
from tests.support import app_config, davantis_site, running_daemon


async def count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM alarms WHERE vendor = 'davantis'"))


async def cursor(db: asyncpg.Connection) -> dict[str, object] | None:
    import json

    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = 'd1'")
    return None if value is None else dict(json.loads(value) if isinstance(value, str) else value)


def bad_input(metrics: Metrics, what: str) -> float:
    return metrics.sample("cms_ingest_bad_input_total", source="device:davantis", what=what)


@pytest.mark.parametrize(
    "first_batch", [10, 3], ids=["ids-1-to-10-again", "newest-id-below-the-cursor"]
)
async def test_a_reset_device_loses_no_alarm_and_duplicates_none(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, first_batch: int
) -> None:
    """10 alarms stored, the box factory-reset (ids start again at 1), 10 new alarms: 20 of
    20 stored, the old rows untouched, the new ones tagged with the device's new life."""
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config) as daemon:
            await eventually(lambda: cursor(db), what="first cursor")
            site.add_alarms(10)
            await eventually(lambda: _at_least(db, 10), what="10 alarms before the reset")
            before = [dict(row) for row in await db.fetch("SELECT * FROM alarms ORDER BY id")]
            site.factory_reset()
            site.add_alarms(first_batch)
            await eventually(lambda: _at_least(db, 10 + first_batch), what="after the reset")
            site.add_alarms(10 - first_batch)
            await eventually(lambda: _at_least(db, 20), what="20 alarms")
            await eventually(lambda: _cursor_at(db, 10), what="cursor at the new alarm 10")
            rows = [dict(row) for row in await db.fetch("SELECT * FROM alarms ORDER BY id")]
    assert len(rows) == 20
    assert rows[:10] == before  # old rows untouched
    life = (await cursor(db) or {})["life"]
    assert isinstance(life, str) and life
    assert [row["source_id"] for row in rows[10:]] == [f"{n}@{life}" for n in range(1, 11)]
    assert daemon.metrics.sample("cms_ingest_device_resets_total", vendor="davantis") == 1


async def _at_least(db: asyncpg.Connection, n: int) -> bool:
    return await count(db) >= n


async def _cursor_at(db: asyncpg.Connection, last_id: int) -> bool:
    current = await cursor(db)
    return current is not None and current.get("last_id") == last_id


@pytest.mark.parametrize("language", ["fr", "de", "es", "it", "nl"])
async def test_arming_events_in_the_device_language(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, language: str
) -> None:
    site = DavantisSite(media_delay=0, language=language)
    async with DavantisSimulator({"default": site}) as sim:
        options = {"armed_only": False}
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options=options)]
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: cursor(db), what="first cursor")
            site.set_input(1, False)
            site.set_input(1, True)
            site.add_alarm(event=102, camera=0, description="Zustand 7")  # says neither
            await eventually(lambda: _at_least(db, 3), what="three event-102 alarms")
            rows = await db.fetch("SELECT event_type, description FROM alarms ORDER BY id")
    assert [row["event_type"] for row in rows] == ["disarmed", "armed", "system"]
    assert rows[2]["description"] == "Zustand 7"
    assert bad_input(daemon.metrics, "arming_event_unclassified") == 1


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        ("on_cameras", [False, True]),  # the cameras name their inputs
        ("none", [None, None]),  # nothing links them: inputs differ, so unknown
    ],
)
async def test_arming_per_input_when_inputs_do_not_list_cameras(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    links: str,
    expected: list[bool | None],
) -> None:
    site = DavantisSite(media_delay=0, cameras=4, input_cameras=links)  # input 1: cameras 1-2
    async with DavantisSimulator({"default": site}) as sim:
        options = {"armed_only": False}
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options=options)]
        )
        async with running_daemon(config) as daemon:
            await eventually(lambda: cursor(db), what="first cursor")
            site.set_input(1, False)
            await eventually(lambda: _at_least(db, 1), what="the disarm event")
            site.add_alarm(event=2, camera=1)
            site.add_alarm(event=2, camera=3)
            await eventually(lambda: _at_least(db, 3), what="two person alarms")
            rows = await db.fetch("SELECT camera_id, armed FROM alarms ORDER BY id")
    assert [row["armed"] for row in rows[1:]] == expected
    assert (bad_input(daemon.metrics, "camera_input_unknown") > 0) == (links == "none")


async def test_a_catch_up_beyond_the_page_cap_resumes_from_the_stored_cursor(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    page = 10
    site = DavantisSite(media_delay=0, page_cap=page)
    site.add_alarms(2)
    async with DavantisSimulator({"default": site}) as sim:
        options = {"page_cap": page}
        config = app_config(
            database_url, tmp_path, [davantis_site("d1", sim.url(), options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: cursor(db), what="first cursor")
        total = 2 * MAX_PAGES_PER_POLL * page + 50  # three polls' worth
        site.add_alarms(total)  # while the daemon is down
        async with running_daemon(config):
            await eventually(lambda: _at_least(db, total), timeout=20, what="the catch-up")
            await eventually(lambda: _no_backlog(db), what="backlog drained")
            ids = [int(r["source_id"]) for r in await db.fetch("SELECT source_id FROM alarms")]
    assert sorted(ids) == list(range(3, total + 3))


async def _no_backlog(db: asyncpg.Connection) -> bool:
    current = await cursor(db)
    return current is not None and "backlog" not in current
