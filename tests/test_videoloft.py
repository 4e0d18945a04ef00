"""Videoloft accounts: the daemon against the Videoloft simulator over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from tests.conftest import eventually
from tests.support import app_config, final, running_daemon, videoloft_site


async def source_ids(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT source_id FROM alarms WHERE event_type IN ('motion', 'audio')")
    return sorted(r["source_id"] for r in rows)


async def count_at_least(db: asyncpg.Connection, n: int) -> bool:
    return len(await source_ids(db)) >= n


async def streams_open(account: VideoloftAccount, n: int) -> bool:
    return account.open_live >= n


@pytest.mark.parametrize("framing", ["sse", "ndjson", "concat"])
async def test_live_alerts_in_each_framing(
    framing: str, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(framing=framing, media_delay=0.2, tail_s=0.5)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(lambda: streams_open(account, 2), what="a long-poll per logger")
            first = account.add_alert("12345.1", type="motion")
            second = account.add_alert("40012.7", type="audio")  # another owner's camera
            await eventually(lambda: count_at_least(db, 2), what="2 alerts")
            rows = await db.fetch("SELECT * FROM alarms ORDER BY source_id")
            by_id = {r["source_id"]: r for r in rows}
            row = by_id[f"12345.1:{first.id}"]
            assert row["event_type"] == "motion" and row["camera_id"] == "12345.1"
            assert row["camera_name"] == "Front door"
            assert '"smx"' in row["raw"]
            assert by_id[f"40012.7:{second.id}"]["event_type"] == "audio"
            assert account.live_connections == 2  # delivered live, no reconnects needed


async def test_alerts_during_a_dropped_long_poll_are_caught_up_once(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            before = account.add_alert("12345.1")
            await eventually(lambda: count_at_least(db, 1), what="first alert live")
            opened = account.live_connections
            account.drop_live_connections()
            # Alerts while no long-poll is open reach nobody live: only /alert has them.
            during = [account.add_alert("12345.2"), account.add_alert("40012.7")]
            await eventually(lambda: count_at_least(db, 3), timeout=15, what="gap caught up")
            await eventually(lambda: streams_open(account, 2), what="long-polls reopened")
            after = account.add_alert("12345.1")
            await eventually(lambda: count_at_least(db, 4), what="live again")
            expected = sorted(f"{a.uidd}:{a.id}" for a in [before, *during, after])
            assert await source_ids(db) == expected  # each exactly once
            assert account.live_connections >= opened + 2


async def test_the_servers_five_minute_cut_and_planned_reconnects(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0, live_max_s=1.0)  # the server ends it
    async with VideoloftSimulator(account) as sim:
        options = {"reconnect_after_s": 0.7}  # and we reconnect ahead of it
        config = app_config(
            database_url, tmp_path, [videoloft_site("v1", sim.url, options=options)]
        )
        async with running_daemon(config):
            added = []
            for _ in range(6):
                added.append(account.add_alert("12345.1"))
                await asyncio.sleep(0.4)
            await eventually(lambda: count_at_least(db, 6), timeout=15, what="6 alerts")
            assert await source_ids(db) == sorted(f"{a.uidd}:{a.id}" for a in added)
            assert account.live_connections >= 4


async def test_token_renewal_by_cookie_then_by_password(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0, token_ttl_s=4.0)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(
                lambda: account.cookie_logins >= 1, timeout=10, what="renewal at 3/4 of 4 s"
            )
            assert account.logins == 1
            account.expire_tokens()
            account.add_alert("12345.1")
            await eventually(lambda: count_at_least(db, 1), timeout=10, what="alert after expiry")
            account.revoke_all()  # cookie too: only the password works now
            # The next renewal (at 3/4 of 4 s) fails by cookie and logs in with the password.
            await eventually(lambda: account.logins >= 2, timeout=10, what="password login")
            account.add_alert("12345.2")
            await eventually(
                lambda: count_at_least(db, 2), timeout=10, what="alert after revocation"
            )


async def test_regional_redirect_and_logger_moved(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0, redirect=True)
    async with VideoloftSimulator(account) as sim:
        # A move must be noticed without waiting for the 10-minute refresh or a reconnect.
        options = {
            "devices_refresh_s": 3600.0,
            "reconnect_after_s": 3600.0,
            "residency_check_s": 0.5,
        }
        config = app_config(
            database_url, tmp_path, [videoloft_site("v1", sim.url, options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            account.move_device("12345.1", 1)
            moved = account.add_alert("12345.1")
            await eventually(lambda: count_at_least(db, 1), timeout=15, what="alert after the move")
            assert await source_ids(db) == [f"12345.1:{moved.id}"]


async def test_camera_status_changes_raise_offline_and_online(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            account.set_status("12345.2", "live")  # first sight: just the state, no alarm
            account.set_status("12345.2", "novideo")
            account.set_status("12345.2", "live")

            async def events() -> list[str]:
                rows = await db.fetch(
                    "SELECT event_type FROM alarms WHERE camera_id = '12345.2' ORDER BY occurred_at, id"
                )
                return [r["event_type"] for r in rows]

            await eventually(lambda: _len_at_least(events, 2), what="offline and online")
            assert await events() == ["camera_offline", "camera_online"]


async def _len_at_least(getter, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await getter()) >= n


async def test_thumbnail_and_mp4_once_ready(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0.8, tail_s=1.0)
    async with VideoloftSimulator(account) as sim:
        options = {"tail_s": 1.0}
        config = app_config(
            database_url, tmp_path, [videoloft_site("v1", sim.url, options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            ongoing = account.add_alert("12345.1", ended=False)
            await eventually(lambda: count_at_least(db, 1), what="alert")
            await asyncio.sleep(1.5)
            video_state = await db.fetchval("SELECT state FROM alarm_media WHERE kind = 'video'")
            assert video_state == "pending"  # still going on: no MP4 requested yet
            account.end_alert(ongoing)

            async def settled() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM alarm_media WHERE state = 'pending'"
                )

            await eventually(settled, timeout=20, what="media settled")
            media = {r["kind"]: r for r in await db.fetch("SELECT * FROM alarm_media")}
            assert media["thumbnail"]["state"] == "ready"
            assert media["thumbnail"]["content_type"] == "image/jpeg"
            assert media["video"]["state"] == "ready", media["video"]["last_error"]
            assert media["video"]["path"].endswith("-video.mp4")
            logs = (tmp_path / "media").rglob("*")
            assert all("token" not in str(p) for p in logs)


async def test_record_and_snapshot_request(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        config = app_config(database_url, tmp_path, [videoloft_site("v1", sim.url)])
        async with running_daemon(config):

            async def act(kind: str, target: str, params: str = "{}") -> asyncpg.Record:
                action_id = await db.fetchval(
                    "INSERT INTO actions (site_id, kind, target, params) VALUES ('v1', $1, $2, $3::jsonb) RETURNING id",
                    kind,
                    target,
                    params,
                )
                return await final(db, int(action_id))

            snap = await act("snapshot_request", "12345.2")
            assert snap["state"] == "succeeded"
            record = await act_slow(db, "12345.1")
            assert record["state"] == "succeeded", record["error"]
            # The second triggerevent 15 s after the first (so the action lasted that long).
            triggers = [t for t in account.tasks if t[1] == "triggerevent"]
            assert len(triggers) == 2 and 14 <= triggers[1][2] - triggers[0][2] <= 16.5
            assert ("12345.2", "capturethumb") in [(u, a) for u, a, _ in account.tasks]
            bad = await act("record", "99999.9")
            assert bad["state"] == "failed" and "uidd" in bad["error"]


async def act_slow(db: asyncpg.Connection, uidd: str) -> asyncpg.Record:
    """`record` for 20 s: triggerevent at once and 15 s later, then the device's own tail."""
    action_id = await db.fetchval(
        "INSERT INTO actions (site_id, kind, target, params) VALUES ('v1', 'record', $1, '{\"duration_s\": 20}') RETURNING id",
        uidd,
    )
    return await final(db, int(action_id), timeout=30)


async def test_live_records_come_again_until_their_commit_is_confirmed() -> None:
    """A poll whose result was not committed (database down) is answered again, not lost."""
    import aiohttp

    from cms_ingest.runtime.sites import build_site

    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim, aiohttp.ClientSession() as session:
        client = build_site(videoloft_site("v1", sim.url), session).client
        try:
            start = await client.poll(None)  # every device's cursor; long-polls open
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            alert = account.add_alert("12345.1")
            first = await eventually(
                lambda: _poll_with_alarms(client, start.cursor), what="live alert"
            )
            assert [a.source_id for a in first.alarms] == [f"12345.1:{alert.id}"]
            # The poller could not commit: it polls again with the old cursor.
            again = await client.poll(start.cursor)
            assert [a.source_id for a in again.alarms] == [f"12345.1:{alert.id}"]
            # Committed this time: the next poll (with the new cursor) has nothing new.
            after = await client.poll(again.cursor)
            assert after.alarms == []
        finally:
            await client.close()


async def _poll_with_alarms(client, cursor):  # type: ignore[no-untyped-def]
    result = await client.poll(cursor)  # nothing yet: the cursor comes back unchanged
    return result if result.alarms else None


async def test_no_live_long_poll_is_a_communication_failure(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        site = videoloft_site(
            "v1", sim.url, supervision_timeout=1.5, options={"restore_after_s": 1.0}
        )
        config = app_config(database_url, tmp_path, [site])
        async with running_daemon(config) as daemon:
            await eventually(lambda: streams_open(account, 2), what="long-polls")
            account.set_logger_offline(0)  # one logger down: the other still streams
            healthy = account.add_alert("12345.2")  # a camera on the logger still up
            await eventually(lambda: count_at_least(db, 1), timeout=5, what="alert not held back")
            assert await source_ids(db) == [f"12345.2:{healthy.id}"]
            await asyncio.sleep(2.0)
            assert await _comm(db) == []
            assert daemon.sites is not None and daemon.sites.by_id["v1"].health.up is True
            account.set_logger_offline(1)  # now no live long-poll at all
            await eventually(lambda: _comm_is(db, ["comm_lost"]), timeout=20, what="comm_lost")
            lost = await db.fetchval(
                "SELECT description FROM alarms WHERE event_type = 'comm_lost'"
            )
            assert "no live long-poll" in lost
            account.set_logger_offline(0, False)
            account.set_logger_offline(1, False)
            await eventually(
                lambda: _comm_is(db, ["comm_lost", "comm_restored"]), timeout=30, what="restored"
            )


async def _comm(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT event_type FROM alarms WHERE vendor = 'cms' ORDER BY id")
    return [r["event_type"] for r in rows]


async def _comm_is(db: asyncpg.Connection, expected: list[str]) -> bool:
    return await _comm(db) == expected
