"""Communication loss: comm_lost / comm_restored, flapping, restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from cms_ingest.domain import CommHistory, OpenOutage
from cms_ingest.runtime.comm_loss import CommLossTracker
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, free_port, running_daemon

T0 = datetime.now(UTC) + timedelta(seconds=5)  # after the tracker's own start


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def tracker(
    *,
    timeout_s: float = 60,
    open_outage: OpenOutage | None = None,
    last_success: datetime | None = None,
) -> CommLossTracker:
    return CommLossTracker(
        site_id="s",
        timeout_s=timeout_s,
        restore_after_s=10,
        history=CommHistory(last_success, open_outage),
    )


def test_one_outage_for_a_flapping_site_and_one_restore() -> None:
    sup = tracker()
    assert sup.observe(True, now=at(0)) == []
    assert sup.observe(False, "cannot connect", now=at(30)) == []
    lost = sup.observe(False, "cannot connect", now=at(61))
    assert [a.event_type.value for a in lost] == ["comm_lost"]
    assert lost[0].vendor == "cms" and lost[0].priority == 2
    assert "61 s" in lost[0].description and "communication failures" in lost[0].description
    # Bouncing: up, down, up... never a second comm_lost; the restore window restarts.
    for step in range(10):
        ok = step % 2 == 0
        assert sup.observe(ok, "" if ok else "cannot connect", now=at(62 + step * 3)) == []
    assert sup.observe(True, now=at(100)) == []
    restored = sup.observe(True, now=at(110))
    assert [a.event_type.value for a in restored] == ["comm_restored"]
    assert restored[0].source_id.split(":", 1)[1] == lost[0].source_id.split(":", 1)[1]
    assert "1 min 50 s" in restored[0].description  # from the last success at 0 to 110
    assert sup.observe(True, now=at(120)) == []


def test_authentication_failures_say_so() -> None:
    sup = tracker(timeout_s=10)
    sup.observe(True, now=at(0))
    alarms = sup.observe(False, "authentication failed: password grant refused", now=at(11))
    assert "authentication failures" in alarms[0].description


def test_an_outage_open_before_a_restart_is_not_raised_again() -> None:
    outage = OpenOutage("comm_lost:123", at(-300))
    sup = tracker(timeout_s=10, open_outage=outage, last_success=at(-300))
    assert sup.observe(False, "still down", now=at(100)) == []  # already raised
    sup.observe(True, now=at(101))
    restored = sup.observe(True, now=at(111))
    assert [a.source_id for a in restored] == ["comm_restored:123"]


def test_a_long_stopped_daemon_does_not_cry_wolf_at_start() -> None:
    sup = tracker(timeout_s=60, last_success=datetime.now(UTC) - timedelta(days=2))
    assert (
        sup.observe(False, "first poll failed", now=datetime.now(UTC) + timedelta(seconds=1)) == []
    )


async def comm_events(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT event_type FROM alarms WHERE vendor = 'cms' ORDER BY id")
    return [r["event_type"] for r in rows]


async def test_site_down_then_back_across_a_restart(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite()
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [
                davantis_site(
                    "d1", sim.url(), supervision_timeout=1.5, options={"restore_after_s": 1.0}
                )
            ],
        )
        async with running_daemon(config):
            site.offline = True
            await eventually(lambda: _events_are(db, ["comm_lost"]), timeout=15, what="comm_lost")
            row = await db.fetchrow("SELECT * FROM alarms WHERE event_type = 'comm_lost'")
            assert row["site_id"] == "d1" and row["priority"] == 2 and row["camera_id"] is None
            assert "503" in row["description"] or "answered" in row["description"]
        # Restarted while the site is still down: the open outage is not raised twice.
        async with running_daemon(config):
            import asyncio

            await asyncio.sleep(3.0)  # polls keep failing for longer than the timeout
            assert await comm_events(db) == ["comm_lost"]
            site.offline = False
            await eventually(
                lambda: _events_are(db, ["comm_lost", "comm_restored"]),
                timeout=15,
                what="comm_restored",
            )
            restored = await db.fetchrow("SELECT * FROM alarms WHERE event_type = 'comm_restored'")
            assert "outage of" in restored["description"]


async def _events_are(db: asyncpg.Connection, expected: list[str]) -> bool:
    return await comm_events(db) == expected


async def test_simulator_stopped_flapping_then_back(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The site's server really goes away (connection refused), bounces, then stays."""
    import asyncio

    port = free_port()
    site = DavantisSite()
    sim = DavantisSimulator({"default": site})
    await sim.start(port=port)
    config = app_config(
        database_url,
        tmp_path,
        [davantis_site("d1", sim.url(), supervision_timeout=2.0, options={"restore_after_s": 2.0})],
    )
    try:
        async with running_daemon(config):
            await sim.stop()  # the site's server is gone
            started = asyncio.get_running_loop().time()
            await eventually(lambda: _events_are(db, ["comm_lost"]), timeout=15, what="comm_lost")
            detected = asyncio.get_running_loop().time() - started
            assert 1.5 <= detected <= 14  # the timeout, plus at most one backoff step
            for _ in range(3):  # flapping: up for less than restore_after_s, then down again
                await sim.start(port=port)
                await asyncio.sleep(0.8)
                await sim.stop()
                await asyncio.sleep(0.5)
            assert await comm_events(db) == ["comm_lost"]  # one outage, no restore yet
            await sim.start(port=port)  # back for good
            await eventually(
                lambda: _events_are(db, ["comm_lost", "comm_restored"]), timeout=25, what="restored"
            )
    finally:
        await sim.stop()
