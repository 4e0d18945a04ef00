"""CamTrace sites: the daemon against the CamTrace simulator over real HTTP."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta
from pathlib import Path

import asyncpg
import bcrypt
import pytest
from structlog.testing import capture_logs

from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.vendors.camtrace import alarm_type, check_site, hash_password, wsse_digest
from tests.conftest import eventually
from tests.support import app_config, camtrace_site, final, running_daemon

# ---------------------------------------------------------------------- the digest


def test_wsse_digest_public_vector() -> None:
    digest = wsse_digest(
        "d36e316282959a9ed4c89851497a717f", "2003-12-15T14:43:07Z", "taadtaadpstcsm"
    )
    assert digest == "quR/EWLAV4xLf9Zqyw4pDmfV9OY="


def test_wsse_digest_over_a_bcrypt_hash_derived_here() -> None:
    salt = bcrypt.gensalt(rounds=4).decode().replace("$2b$", "$2y$")
    hashed = hash_password("s3cret", salt)
    assert hashed.startswith(salt[:7]) and len(hashed) == 60  # the whole string, prefix included
    assert bcrypt.checkpw(b"s3cret", hashed.replace("$2y$", "$2b$").encode())
    nonce, created = "n0nce/+=", "2026-11-21T10:00:00Z"
    expected = base64.b64encode(hashlib.sha1((nonce + created + hashed).encode()).digest()).decode()
    assert wsse_digest(nonce, created, hashed) == expected
    assert hash_password("demo", None) == hashlib.md5(b"demo").hexdigest()  # no salt: MD5


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        ("MOTION Alarm", "MOTION"),
        ("MOTION Alarm starts at 12/09/2014 at 11:44:07, with 5s pre-alarm", "MOTION"),
        ("porte1 Alarm", "PORTE1"),
        ("VIDEO LOSS alarm", "VIDEO LOSS"),
        ("porte1", "PORTE1"),
    ],
)
def test_alarm_type_from_description(description: str, kind: str) -> None:
    assert alarm_type(description) == kind


def test_basic_over_plain_http_is_refused_unless_allowed() -> None:
    assert check_site("http://192.0.2.1", {"auth": "basic"})[0][0] == "auth"
    assert check_site("https://192.0.2.1", {"auth": "basic"}) == []
    assert check_site("http://192.0.2.1", {"auth": "basic", "allow_basic_over_http": True}) == []
    assert check_site("http://192.0.2.1", {}) == []


# ---------------------------------------------------------------------- the daemon


async def ids(db: asyncpg.Connection, site_id: str = "c1") -> list[int]:
    rows = await db.fetch("SELECT source_id FROM alarms WHERE site_id = $1", site_id)
    return sorted(int(r["source_id"]) for r in rows)


async def has_cursor(db: asyncpg.Connection, site_id: str = "c1") -> bool:
    return bool(
        await db.fetchval("SELECT cursor IS NOT NULL FROM site_state WHERE site_id = $1", site_id)
    )


async def count_at_least(db: asyncpg.Connection, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms")) >= n


@pytest.mark.parametrize("connections", ["keep", "close"])
async def test_alarms_mapping_and_media(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, connections: str
) -> None:
    # Whether the server keeps its HTTP connections is not in the manual: both ways work.
    site = CamTraceSite(media_delay=0.5, slice_after_s=1.0)
    site.add_alarms(3)  # history: not ingested on a first start
    sim = CamTraceSimulator({"default": site})
    sim.close_connections = connections == "close"
    async with sim:
        config = app_config(database_url, tmp_path, [camtrace_site("c1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="cursor")
            site.add_alarm(camera=2, description="MOTION Alarm starts now, with 5s pre-alarm")
            site.add_alarm(camera=1, description="porte1 Alarm", recording=False)
            site.add_alarm(camera=3, description="SOMETHING NEW Alarm", snapshot=False)
            await eventually(lambda: count_at_least(db, 3), what="3 alarms")
            rows = await db.fetch("SELECT * FROM alarms ORDER BY source_id::bigint")
            assert [r["source_id"] for r in rows] == ["4", "5", "6"]
            # Custom trigger types are `input` with no configuration (contract, section 4a).
            assert [r["event_type"] for r in rows] == ["motion", "input", "input"]
            assert [r["vendor_event"] for r in rows] == ["MOTION", "PORTE1", "SOMETHING NEW"]
            assert rows[0]["camera_id"] == "2" and rows[0]["camera_name"]
            assert rows[0]["vendor"] == "camtrace" and rows[0]["priority"] == 5

            async def settled() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM alarm_media WHERE state = 'pending'"
                )

            await eventually(settled, timeout=20, what="media settled")
            media = {
                (r["source_id"], r["kind"]): r
                for r in await db.fetch(
                    "SELECT a.source_id, m.* FROM alarm_media m JOIN alarms a ON a.id = m.alarm_id"
                )
            }
            snapshot = media[("4", "snapshot")]
            assert snapshot["state"] == "ready" and snapshot["content_type"] == "image/jpeg"
            assert snapshot["attempts"] >= 2  # it was late: 404 first, then the JPEG
            video = media[("4", "video")]
            assert video["state"] == "ready", video["last_error"]
            assert (
                video["path"].endswith("-video.mkv") and video["content_type"] == "video/x-matroska"
            )
            assert (tmp_path / "media" / video["path"]).read_bytes()[:4] == b"\x1a\x45\xdf\xa3"
            assert (
                media[("5", "video")]["state"] == "unavailable"
            )  # no recordTime: no alarm recording
            assert media[("4", "thumbnail")]["state"] == "ready"
            # No snapshot announced: nothing to fetch, so `unavailable`, never `failed`.
            assert media[("6", "snapshot")]["state"] == "unavailable"
            assert media[("6", "thumbnail")]["state"] == "unavailable"


async def test_a_reset_server_keeps_every_alarm_of_both_lives(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """10 alarms stored, the server is factory-reset (ids start again at 1), 10 more: 20 of 20
    stored, the old rows untouched, `device_reset_detected` logged once."""
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [camtrace_site("c1", sim.url())])
        with capture_logs() as logs:
            async with running_daemon(config):
                await eventually(lambda: has_cursor(db), what="cursor")
                site.add_alarms(10, camera=1, recording=False)
                await eventually(lambda: count_at_least(db, 10), what="first life")
                before = await db.fetch("SELECT id, source_id, occurred_at FROM alarms")
                site.reset()
                site.add_alarms(10, camera=2, recording=False)
                await eventually(lambda: count_at_least(db, 20), what="second life")
                rows = await db.fetch("SELECT id, source_id, occurred_at, camera_id FROM alarms")
    assert len(rows) == 20
    assert {tuple(r) for r in before} <= {(r["id"], r["source_id"], r["occurred_at"]) for r in rows}
    later = sorted(r["source_id"] for r in rows if r["camera_id"] == "2")
    assert len({key.split("@")[1] for key in later}) == 1  # one new life
    assert sorted(int(key.split("@")[0]) for key in later) == list(range(1, 11))
    assert len([e for e in logs if e["event"] == "device_reset_detected"]) == 1


async def test_camera_connections_logged_while_the_daemon_was_down_arrive(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        options = {"connection_log_interval_s": 0.2}
        config = app_config(
            database_url, tmp_path, [camtrace_site("c1", sim.url(), options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="cursor")
        down = site.now().replace(microsecond=0)
        site.camera_connection(3, False, time=down)  # while no daemon runs
        site.camera_connection(3, True, time=down + timedelta(seconds=2))
        async with running_daemon(config):
            await eventually(lambda: count_at_least(db, 2), what="offline and online")
        rows = await db.fetch("SELECT * FROM alarms ORDER BY occurred_at")
    assert [r["event_type"] for r in rows] == ["camera_offline", "camera_online"]
    assert [r["occurred_at"] for r in rows] == [down, down + timedelta(seconds=2)]
    assert rows[0]["camera_id"] == "3" and rows[0]["camera_name"] == "Loading bay"


async def test_paging_shift_under_a_burst_loses_and_duplicates_nothing(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(
            database_url, tmp_path, [camtrace_site("c1", sim.url(), options={"page_size": 20})]
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="cursor")
            site.inject_on_page_request(1, 30)  # 30 more arrive while the daemon pages
            site.add_alarms(200, recording=False)  # a burst: ten pages of 20
            await eventually(lambda: count_at_least(db, 230), timeout=30, what="230 alarms")
            stored = await ids(db)
            assert stored == list(range(1, 231))  # lost 0, none the device never raised


async def test_catch_up_after_downtime(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    site.add_alarms(2, recording=False)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [camtrace_site("c1", sim.url())])
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="cursor")
        site.add_alarms(450, recording=False)  # while the daemon is down
        async with running_daemon(config):
            await eventually(lambda: count_at_least(db, 450), timeout=30, what="450 alarms")
            assert await ids(db) == list(range(3, 453))


async def test_clock_skew_of_30_s_and_stale_digests(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0, clock_offset_s=30.0)  # the server runs 30 s ahead
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [camtrace_site("c1", sim.url())])
        async with running_daemon(config) as daemon:
            await eventually(lambda: has_cursor(db), what="cursor despite 30 s skew")
            site.add_alarm(recording=False)
            await eventually(lambda: count_at_least(db, 1), what="alarm 1")
            labels = {"site_id": "c1", "vendor": "camtrace"}
            skew = daemon.metrics.registry.get_sample_value("cms_ingest_clock_skew_seconds", labels)
            assert skew is not None and 28 <= skew <= 32
            site.clock_offset_s = -30.0  # the server's clock jumps: our digests are now stale
            site.add_alarm(recording=False)
            await eventually(lambda: count_at_least(db, 2), what="alarm 2 after the jump")
            site.expire_all_digests()
            site.add_alarm(recording=False)
            await eventually(lambda: count_at_least(db, 3), what="alarm 3 after expiry")
            assert daemon.sites is not None
            assert daemon.sites.by_id["c1"].health.up is True  # re-measured and retried: never down
            assert site.auth_failures >= 2


async def test_every_camtrace_action(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(database_url, tmp_path, [camtrace_site("c1", sim.url())])
        async with running_daemon(config):

            async def act(kind: str, target: str, params: str = "{}") -> asyncpg.Record:
                action_id = await db.fetchval(
                    "INSERT INTO actions (site_id, kind, target, params) VALUES ('c1', $1, $2, $3::jsonb) RETURNING id",
                    kind,
                    target,
                    params,
                )
                return await final(db, int(action_id))

            assert (await act("alarm_trigger", "1,3", '{"type": "porte1"}'))["state"] == "succeeded"
            assert (await act("alarm_ack", "1,3"))["state"] == "succeeded"
            assert (await act("command", "7"))["state"] == "succeeded"
            assert (await act("scenario", "1"))["state"] == "succeeded"
            ignored = await act("scenario", "2")
            assert ignored["state"] == "failed" and "ignored" in ignored["error"]
            missing = await act("command", "99")
            assert missing["state"] == "failed" and "404" in missing["error"]
            bad = await act("alarm_trigger", "front door")
            assert bad["state"] == "failed" and "camera ids" in bad["error"]
            kinds = [kind for kind, _ in site.triggers]
            assert kinds == ["alarm_trigger", "alarm_untrigger", "exturl", "scenario"]
            assert site.triggers[0][1]["type"] == "porte1"
            # The triggered alarms come back through the poll like any other.
            await eventually(lambda: count_at_least(db, 2), what="triggered alarms ingested")


async def test_health_errors_are_reported_once_and_in_metrics(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        config = app_config(
            database_url,
            tmp_path,
            [camtrace_site("c1", sim.url(), options={"health_interval_s": 0.2})],
        )
        async with running_daemon(config) as daemon:

            def health(component: str) -> float | None:
                labels = {"component": component, "site_id": "c1", "vendor": "camtrace"}
                return daemon.metrics.registry.get_sample_value("cms_ingest_device_health", labels)

            await eventually(lambda: health("cameras") == 1.0, what="cameras healthy")
            site.set_camera_error(1, "No image")
            await eventually(lambda: health("cameras") == 0.0, what="camera error seen")
            assert health("recorder") == 1.0
            site.clear_errors()
            await eventually(lambda: health("cameras") == 1.0, what="camera recovered")


async def test_http_basic_when_configured(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        options = {"auth": "basic", "allow_basic_over_http": True}
        config = app_config(
            database_url, tmp_path, [camtrace_site("c1", sim.url(), options=options)]
        )
        async with running_daemon(config):
            await eventually(lambda: has_cursor(db), what="cursor")
            site.add_alarm(recording=False)
            await eventually(lambda: count_at_least(db, 1), what="alarm over Basic")
            assert site.requests["GET /api/v1.2/users/cms/auth"] == 0  # no WSSE salt needed
