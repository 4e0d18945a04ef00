"""CamStreamer cloud accounts: the daemon against the CamStreamer simulator over real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.vendors.camstreamer import BudgetExhausted, QueryBudget, check_site
from tests.conftest import eventually
from tests.support import app_config, camstreamer_site, final, running_daemon

GATE = "ACCC8EE8A9CA"


def options(sim: CamStreamerSimulator, **extra: Any) -> dict[str, Any]:
    return {
        "offline_grace_s": 2.5,
        "clip_seconds": 10,
        "device_url_template": sim.device_url_template(),
        "device_access_token": "device-token",
        # A bigger plan than the default 10,000/day: with that, the budget would (rightly)
        # space status polls several seconds apart. The 1 query/s rate stays.
        "daily_limit": 1_000_000,
        **extra,
    }


async def events(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT event_type FROM alarms ORDER BY id")
    return [r["event_type"] for r in rows]


async def polled(account: CamStreamerAccount, n: int) -> bool:
    return account.requests["POST /api/graphql.php"] >= n


async def test_budget_spaces_queries_and_counts_the_day() -> None:
    budget = QueryBudget(rate_per_s=10.0, daily_limit=3)
    started = time.monotonic()
    for _ in range(3):
        await budget.acquire()
    assert time.monotonic() - started >= 2 * 0.11 * 0.95  # spaced 1.1/rate apart
    assert budget.remaining == 0
    with pytest.raises(BudgetExhausted):
        await budget.acquire()
    budget.restore(budget.day, 1)  # a restart reads the day's count back from the cursor
    assert budget.remaining == 0  # never lower than what this process already used


def test_check_site() -> None:
    assert check_site("https://x", {"device_url_template": "https://devices.example"})[0][0] == (
        "device_url_template"
    )
    assert check_site("https://x", {}) == []
    hosts = {"download_hosts": ["cloud.camstreamer.com", "dl.example:8443", "http://x/y"]}
    assert check_site("https://x", hosts) == [
        ("download_hosts", "'http://x/y' is not a host or host:port")
    ]


async def test_a_disconnect_raises_one_alarm_with_its_clip_and_a_blip_none(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = CamStreamerAccount(prepare_seconds=1.5)
    async with CamStreamerSimulator({"default": account}) as sim:
        config = app_config(
            database_url, tmp_path, [camstreamer_site("cs", sim.url(), options=options(sim))]
        )
        async with running_daemon(config):
            await eventually(lambda: polled(account, 2), what="status polls")
            account.disconnect("ACCC8EE8A9CB")  # a blip shorter than the grace
            seen_after = account.requests["POST /api/graphql.php"] + 1
            await eventually(lambda: polled(account, seen_after), what="seen")
            account.connect("ACCC8EE8A9CB")
            account.disconnect(GATE)  # a real disconnect
            await eventually(lambda: _events_at_least(db, 1), timeout=15, what="camera_offline")
            await asyncio.sleep(2.5)
            assert await events(db) == ["camera_offline"]  # the blip raised nothing
            row = await db.fetchrow("SELECT * FROM alarms")
            assert row["camera_id"] == GATE and '"external_id"' in row["raw"]
            account.connect(GATE)
            await eventually(lambda: _events_at_least(db, 2), timeout=10, what="camera_online")
            assert await events(db) == ["camera_offline", "camera_online"]

            async def clip_ready() -> Any:
                return await db.fetchrow("SELECT * FROM alarm_media WHERE state <> 'pending'")

            media = await eventually(clip_ready, timeout=30, what="the clip")
            assert media["state"] == "ready", media["last_error"]
            assert media["kind"] == "video" and media["content_type"] == "video/mp4"
            assert account.recordings_prepared and account.recordings_prepared[0][1] == 1080
            assert account.downloads == 1
        assert account.max_queries_in_window(1.0) <= 1  # never more than 1 query per second
        assert account.rate_limited == 0


async def _events_at_least(db: asyncpg.Connection, n: int) -> bool:
    return len(await events(db)) >= n


async def test_offline_at_first_start_raises_nothing_but_a_restart_remembers(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = CamStreamerAccount(recorded=False)
    account.disconnect(GATE)  # offline before the daemon ever looked
    async with CamStreamerSimulator({"default": account}) as sim:
        config = app_config(
            database_url, tmp_path, [camstreamer_site("cs", sim.url(), options=options(sim))]
        )
        async with running_daemon(config):
            await eventually(lambda: polled(account, 4), timeout=10, what="polls")
        assert await events(db) == []
        account.connect(GATE)
        async with running_daemon(config):
            await eventually(lambda: polled(account, 7), timeout=10, what="polls")
            assert await events(db) == []  # never alarmed offline: no "online" either
            account.disconnect("ACCC8EE8A9CC")
        # It went offline while the daemon was down: raised after the grace on restart.
        async with running_daemon(config):
            await eventually(
                lambda: _events_at_least(db, 1), timeout=15, what="offline after restart"
            )
            assert await events(db) == ["camera_offline"]

            async def settled() -> Any:
                return await db.fetchrow(
                    "SELECT state, last_error FROM alarm_media WHERE state <> 'pending'"
                )

            media = await eventually(settled, timeout=15, what="clip settled")
            assert media["state"] == "unavailable"  # the camera recorded nothing


async def test_expired_token_is_renewed_with_oauth(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = CamStreamerAccount()
    async with CamStreamerSimulator({"default": account}) as sim:
        oauth = options(
            sim, client_id="cms-client", client_secret="cms-secret", refresh_token="refresh-1"
        )
        site = camstreamer_site("cs", sim.url(), token=None, options=oauth)
        config = app_config(database_url, tmp_path, [site])
        async with running_daemon(config) as daemon:
            await eventually(lambda: polled(account, 2), what="polls")
            assert account.oauth_refreshes == 1
            account.expire_tokens()
            count = account.requests["POST /api/graphql.php"]
            await eventually(
                lambda: polled(account, count + 3), timeout=10, what="polls after expiry"
            )
            assert account.oauth_refreshes == 2
            assert daemon.sites is not None and daemon.sites.by_id["cs"].health.up is True


async def test_output_action_on_then_off(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = CamStreamerAccount()
    async with CamStreamerSimulator({"default": account}) as sim:
        config = app_config(
            database_url, tmp_path, [camstreamer_site("cs", sim.url(), options=options(sim))]
        )
        async with running_daemon(config):
            action_id = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target, params) "
                "VALUES ('cs', 'output', $1, '{\"port\": 2, \"duration_s\": 1.5}') RETURNING id",
                GATE,
            )
            row = await final(db, int(action_id))
            assert row["state"] == "succeeded", row["error"]
            calls = [(serial, action) for serial, action, _ in account.vapix_calls]
            assert calls == [(GATE, "2:/"), (GATE, "2:\\")]
            held = account.vapix_calls[1][2] - account.vapix_calls[0][2]
            assert 1.4 <= held <= 4.0  # 1.5 s, plus waiting for the budget's 1 query/s slot
            assert account.port_state[(GATE, 2)] is False
        assert account.max_queries_in_window(1.0) <= 1


def test_status_cadence_follows_what_the_budget_leaves() -> None:
    budget = QueryBudget(rate_per_s=1.0, daily_limit=10_000)
    full = budget.status_interval(floor=10.0)
    assert full >= 10.0  # at most 8,000 status polls in a whole day at 80 %
    budget.used = 9_990  # almost spent: stretch to make the rest last until midnight
    assert budget.status_interval(floor=10.0) > full
