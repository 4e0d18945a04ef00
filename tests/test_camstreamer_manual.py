"""CamStreamer cloud read literally (issue 14): the client against a simulator that answers as
the manual says (its schema, its error categories, its download host), over real HTTP.

Most tests drive the real client (built as the daemon builds it) directly, for speed; those
about what lands in the database run the daemon."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from cms_ingest.domain import Action, EventType, MediaKind
from cms_ingest.metrics import Metrics
from cms_ingest.probe import run_probe
from cms_ingest.runtime.sites import build_site
from cms_ingest.simulators.base import DeviceAnswer, static_answer
from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.sitehttp import new_client_session
from cms_ingest.vendors.base import (
    AuthenticationFailed,
    BadDeviceResponse,
    DeviceRefused,
    InvalidAction,
)
from cms_ingest.vendors.camstreamer import NODES_QUERY, CamStreamerClient, OutputIncomplete
from tests.conftest import eventually
from tests.support import app_config, camstreamer_site, final, running_daemon

GATE, YARD = "ACCC8EE8A9CA", "ACCC8EE8A9CB"
FAST = math.inf
SCHEMAS = ("manual", "extended")
OAUTH = {"client_id": "cms-client", "client_secret": "cms-secret", "refresh_token": "refresh-1"}
# What the clients of `client_for` report counts here (read with `bad_inputs`).
CLIENT_METRICS = Metrics()


def fast_options(**extra: Any) -> dict[str, Any]:
    """No budget waits (the simulator below has no rate limit either), no grace."""
    return {"rate_per_s": 1000.0, "daily_limit": 10**12, "offline_grace_s": 0, **extra}


@asynccontextmanager
async def client_for(
    sim: CamStreamerSimulator, tenant: str = "default", **overrides: Any
) -> AsyncIterator[CamStreamerClient]:
    """The real client for one account, built as the daemon builds it."""
    overrides.setdefault("options", fast_options())
    async with new_client_session() as session:
        config = camstreamer_site("cs", sim.url(tenant), **overrides)
        site = build_site(config, session, metrics=CLIENT_METRICS)
        assert isinstance(site.client, CamStreamerClient)
        yield site.client
        await site.client.close()


def output(params: dict[str, Any], *, not_after: datetime | None = None) -> Action:
    return Action(
        id=1,
        site_id="cs",
        kind="output",
        target=GATE,
        params=params,
        attempts=1,
        not_after=not_after,
    )


def bad_inputs(what: str) -> float:
    """Bad input the clients of `client_for` reported, so far."""
    return CLIENT_METRICS.sample(
        "cms_ingest_bad_input_total", source="device:camstreamer", what=what
    )


# ------------------------------------------------------------------ 5: the manual's fields


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_cameras_are_read_with_documented_fields_in_one_query(schema: str) -> None:
    cameras = {f"{0xACCC8EE8A9CA + i:012X}": f"Cam {i}" for i in range(130)}
    account = CamStreamerAccount(rate_per_s=FAST, schema=schema, cameras=cameras)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        first = await client.poll(None)
        assert len(first.cursor["cameras"]) == 130
        # The node list, then 130 cameras in 2 aliased queries (100 per query).
        assert account.requests["POST /api/graphql.php"] == 3
        account.disconnect(GATE)
        second = await client.poll(first.cursor)
        assert account.requests["POST /api/graphql.php"] == 5  # no node list again
        third = await client.poll(second.cursor)
        (alarm,) = third.alarms
        assert alarm.event_type is EventType.CAMERA_OFFLINE and alarm.camera_id == GATE
        assert alarm.raw["external_id"] == "camera1" and alarm.raw["node_id"] == 140094
        assert alarm.camera_name == "Cam 0"


async def test_status_cadence_counts_every_query_of_a_big_account() -> None:
    cameras = {f"{0xACCC8EE8A9CA + i:012X}": f"Cam {i}" for i in range(130)}
    account = CamStreamerAccount(rate_per_s=FAST, cameras=cameras)
    async with CamStreamerSimulator({"default": account}) as sim:
        # The budget alone would allow a status query every 1 s; a poll takes 2 of them.
        options = fast_options(daily_limit=paced_daily_limit(1.0))
        async with client_for(sim, options=options) as client:
            cursor = (await client.poll(None)).cursor
            started, queries = time.monotonic(), account.daily_used
            await eventually(lambda: time.monotonic() - started >= 1.2, what="1.2 s")
            await client.poll(cursor)
            assert account.daily_used == queries  # held back: 2 s are not over
            await eventually(lambda: time.monotonic() - started >= 2.1, what="2.1 s")
            await client.poll(cursor)
            assert account.daily_used == queries + 2


async def test_a_portal_refusing_every_query_raises_comm_lost(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # The account's real budget paces status queries ~3 s apart: polls in between must not
    # report "all is well" while every query fails.
    account = CamStreamerAccount()
    account.revoke("api-token")
    async with CamStreamerSimulator({"default": account}) as sim:
        site = camstreamer_site(
            "cs",
            sim.url(),
            supervision_timeout=2.0,
            options={"daily_limit": paced_daily_limit(3.0)},
        )
        async with running_daemon(app_config(database_url, tmp_path, [site])):
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM alarms WHERE event_type = 'comm_lost'"),
                timeout=12,
                what="comm_lost",
            )
        reason = await db.fetchval("SELECT description FROM alarms")
        assert "authentication" in reason


def paced_daily_limit(interval_s: float) -> int:
    """A daily limit whose status share paces status polls about `interval_s` apart now."""
    now = datetime.now(UTC)
    left = 86_400 - (now.hour * 3600 + now.minute * 60 + now.second)
    return max(10, int(left / (0.8 * interval_s)))


# ------------------------------------------------------------------ 3: a failed first poll


async def test_a_failed_first_poll_does_not_raise_cameras_already_offline(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # The extended schema answers the documented fields too (and the driver before the fix).
    account = CamStreamerAccount(schema="extended")
    account.disconnect(GATE)  # down long before the daemon looks
    account.expire_tokens()  # the first poll fails
    async with CamStreamerSimulator({"default": account}) as sim:
        site = camstreamer_site(
            "cs",
            sim.url(),
            options={"offline_grace_s": 0.5, "daily_limit": paced_daily_limit(2.0)},
        )
        async with running_daemon(app_config(database_url, tmp_path, [site])):
            await eventually(
                lambda: account.auth_refusals["expired"] >= 1, what="the failed first poll"
            )
            account.reset_static_token()
            answered = account.daily_used
            await eventually(
                lambda: account.daily_used >= answered + 4, timeout=20, what="4 good queries"
            )
            assert (
                await db.fetchval("SELECT count(*) FROM alarms WHERE vendor = $1", "camstreamer")
                == 0
            )


# ------------------------------------------------------------------ 4: the clip's anchor


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_offline_clip_ends_when_the_camera_was_last_seen_connected(schema: str) -> None:
    account = CamStreamerAccount(rate_per_s=FAST, schema=schema)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        first = await client.poll(None)
        last_seen = time.time()
        await eventually(lambda: time.time() >= last_seen + 1.5, what="time to pass")
        account.disconnect(GATE)
        noticed = time.time()
        second = await client.poll(first.cursor)
        (alarm,) = (await client.poll(second.cursor)).alarms
        assert alarm.occurred_at.timestamp() <= last_seen < noticed
        assert alarm.raw["occurred_at_is"] == "last_seen_connected"
        assert alarm.raw["noticed_at"] >= datetime.fromtimestamp(int(noticed), UTC).isoformat()
        (media,) = alarm.media
        assert media.locator["to"] == int(alarm.occurred_at.timestamp()) <= last_seen
        assert media.locator["to"] - media.locator["from"] == 30


# ------------------------------------------------------------------ 6: authentication


async def test_client_category_renews_an_oauth_token_and_fails_a_static_one() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)
    other = CamStreamerAccount(rate_per_s=FAST, invalid_token_error="authError")
    async with CamStreamerSimulator({"default": account, "x": other}) as sim:
        for tenant, site in (("default", account), ("x", other)):
            async with client_for(sim, tenant, token=None, options=fast_options(**OAUTH)) as c:
                cursor = (await c.poll(None)).cursor
                site.forget_access_tokens()  # present, no longer valid
                await c.poll(cursor)
                assert site.oauth_refreshes == 2, tenant
        assert account.auth_refusals["client"] == 1
        assert other.auth_refusals["authError"] == 1
        async with client_for(sim, token="not-a-token") as static:
            with pytest.raises(AuthenticationFailed, match="client"):
                await static.poll(None)


async def test_an_http_401_without_errors_is_a_refusal_too() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": account}) as sim:
        sim.respond("POST", "/api/graphql.php", static_answer(401, "Unauthorized"), times=None)
        async with client_for(sim) as static:
            with pytest.raises(AuthenticationFailed, match="HTTP 401"):
                await static.poll(None)
        sim.respond("POST", "/api/graphql.php", static_answer(403), times=1)
        async with client_for(sim, token=None, options=fast_options(**OAUTH)) as oauth:
            await oauth.poll(None)  # renewed once, then answered
        assert account.oauth_refreshes == 2


async def test_oauth_token_is_renewed_before_it_expires() -> None:
    account = CamStreamerAccount(rate_per_s=FAST, access_ttl_s=2.0)
    async with CamStreamerSimulator({"default": account}) as sim:
        # The budget paces the polls (5 queries/s) over three seconds.
        paced = fast_options(rate_per_s=5.0, **OAUTH)
        async with client_for(sim, token=None, options=paced) as client:
            cursor = (await client.poll(None)).cursor
            started = time.monotonic()
            while time.monotonic() - started < 3.0:
                cursor = (await client.poll(cursor)).cursor
        assert account.oauth_refreshes >= 2  # renewed in time...
        assert account.auth_refusals == {}  # ...so never refused


@pytest.mark.parametrize("limit_status", [429, 200])
async def test_a_query_over_the_accounts_limit_backs_off_in_either_form(
    limit_status: int,
) -> None:
    """The manual states the limits, not how a query over them is answered: with 429 or with
    200 and category `dailyLimit`, it is a rate-limit refusal that backs the budget off."""
    account = CamStreamerAccount(rate_per_s=FAST, daily_limit=1, limit_status=limit_status)
    async with CamStreamerSimulator({"default": account}) as sim:
        async with client_for(sim) as client:
            await client.graphql(NODES_QUERY)  # the account's one query of the day
            with pytest.raises(BadDeviceResponse, match="rate limited"):
                await client.graphql(NODES_QUERY)
            with pytest.raises(TimeoutError):  # backed off: no query slot for a while
                await asyncio.wait_for(client.budget.acquire(daily=False), 1.0)
        assert account.daily_refused == 1 and account.daily_used == 1


# ------------------------------------------------------------------ 7: download hosts


async def test_recording_downloads_only_from_the_portal_or_configured_hosts() -> None:
    account = CamStreamerAccount(
        rate_per_s=FAST, prepare_seconds=0, download_host="localhost:{port}"
    )
    async with CamStreamerSimulator({"default": account}) as sim:
        port = int(sim.url().rsplit(":", 1)[1])
        locator = {"node_id": 140094, "from": 1_700_000_000, "to": 1_700_000_030}
        before = bad_inputs("download_host")
        async with client_for(sim) as client:
            probe = await eventually(
                lambda: ready_or_final(client, locator), what="the recording settled"
            )
            assert probe.state == "unavailable" and "localhost" in probe.detail
            assert bad_inputs("download_host") == before + 1
        options = fast_options(download_hosts=[f"localhost:{port}"])
        async with client_for(sim, options=options) as client:
            probe = await eventually(lambda: ready_or_final(client, locator), what="ready")
            assert probe.state == "ready" and probe.path.startswith(f"http://localhost:{port}/")
            async with client.download(probe.path) as download:
                body = b"".join([chunk async for chunk in download.chunks])
            assert download.content_type == "video/mp4" and len(body) == 8192
        assert account.downloads == 1


async def ready_or_final(client: CamStreamerClient, locator: dict[str, Any]) -> Any:
    probe = await client.media_status(MediaKind.VIDEO, locator)
    return probe if probe.state != "pending" else None


# ------------------------------------------------------------------ 2: device access token


async def test_output_uses_the_sites_api_token_for_device_access() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)
    lacking = CamStreamerAccount(rate_per_s=FAST, token_configuration=False)
    async with CamStreamerSimulator({"default": account, "x": lacking}) as sim:
        options = fast_options(device_url_template=sim.device_url_template())
        async with client_for(sim, options=options) as client:
            result = await client.perform(output({"port": 1, "duration_s": 0}))
            assert (result.result["on"], result.result["off"]) == ("ok", "ok")
        assert [a for _, a, _ in account.vapix_calls] == ["1:/", "1:\\"]
        # The token lacks the Configuration permission: refused, saying why.
        options_x = fast_options(device_url_template=sim.device_url_template("x"))
        async with client_for(sim, "x", options=options_x) as client:
            with pytest.raises(OutputIncomplete, match="Configuration permission"):
                await client.perform(output({"duration_s": 0}))
        # ... unless options.device_access_token names one that has it.
        override = {**options_x, "device_access_token": "device-token"}
        async with client_for(sim, "x", options=override) as client:
            await client.perform(output({"duration_s": 0}))
        assert lacking.port_state[(GATE, 1)] is False and len(lacking.vapix_calls) == 2
        # An OAuth2 account has no API token of its own: the option is needed, and said so.
        async with client_for(sim, token=None, options={**options, **OAUTH}) as client:
            with pytest.raises(InvalidAction, match="device_access_token"):
                await client.perform(output({"duration_s": 0}))


# ------------------------------------------------------------------ 1: never left on


async def test_output_is_switched_off_when_the_on_call_fails(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    account = CamStreamerAccount()
    account.vapix_answer_errors = 1  # "on" carried out, answered 500
    async with CamStreamerSimulator({"default": account}) as sim:
        # (device_access_token set, though no longer needed: the old driver required it)
        options = {
            "device_url_template": sim.device_url_template(),
            "device_access_token": "device-token",
        }
        site = camstreamer_site("cs", sim.url(), options=options)
        async with running_daemon(app_config(database_url, tmp_path, [site])):
            action_id = await db.fetchval(
                "INSERT INTO actions (site_id, kind, target, params) "
                "VALUES ('cs', 'output', $1, '{\"port\": 2, \"duration_s\": 5}') RETURNING id",
                GATE,
            )
            row = await final(db, int(action_id))
        assert [a for _, a, _ in account.vapix_calls] == ["2:/", "2:\\"]
        assert account.port_state[(GATE, 2)] is False
        assert row["state"] == "failed"
        assert "BadDeviceResponse" in row["error"] and "switched off" in row["error"]
        result = row["result"]
        assert '"off": "ok"' in result and '"on": "failed: BadDeviceResponse' in result


async def test_output_is_switched_off_when_the_on_call_times_out() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)

    async def act_then_hang(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        answer = await device()  # the camera switches the output on...
        await asyncio.sleep(2.0)  # ...and its answer never arrives in time
        return answer

    async with CamStreamerSimulator({"default": account}) as sim:
        sim.respond("GET", f"/device/{GATE}/axis-cgi/io/port.cgi", act_then_hang)
        options = fast_options(
            device_url_template=sim.device_url_template(), device_access_token="device-token"
        )
        async with client_for(sim, options=options, request_timeout_s=0.5) as client:
            with pytest.raises(OutputIncomplete, match="DeviceTimeout") as raised:
                await client.perform(output({"port": 1, "duration_s": 5}))
        assert [a for _, a, _ in account.vapix_calls] == ["1:/", "1:\\"]
        assert account.port_state[(GATE, 1)] is False
        assert raised.value.answer["off"] == "ok"


async def test_a_failed_off_is_retried_until_it_succeeds() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": account}) as sim:
        options = fast_options(
            device_url_template=sim.device_url_template(), device_access_token="device-token"
        )
        async with client_for(sim, options=options) as client:
            # The camera drops off the cloud during the hold (device access answers 503)
            # and is back 2 s later.
            started = time.monotonic()
            task = asyncio.create_task(client.perform(output({"port": 1, "duration_s": 0.5})))
            await eventually(lambda: account.vapix_calls, what="the on")
            account.disconnect(GATE)
            account.connect_later(GATE, 2.5)
            result = (await task).result
        assert time.monotonic() - started >= 2.5
        assert result["on"] == "ok" and result["off"] == "ok" and result["off_attempts"] >= 2
        assert account.port_state[(GATE, 1)] is False


async def test_a_failed_off_gives_up_at_not_after_and_says_the_output_may_be_on() -> None:
    account = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": account}) as sim:
        options = fast_options(
            device_url_template=sim.device_url_template(), device_access_token="device-token"
        )
        async with client_for(sim, options=options) as client:
            not_after = datetime.now(UTC) + timedelta(seconds=2)
            task = asyncio.create_task(
                client.perform(output({"duration_s": 0.5}, not_after=not_after))
            )
            await eventually(lambda: account.vapix_calls, what="the on")
            account.disconnect(GATE)  # and never back
            with pytest.raises(OutputIncomplete, match="may still be ON") as raised:
                await task
        assert datetime.now(UTC) >= not_after - timedelta(seconds=1)
        answer = raised.value.answer
        assert answer["on"] == "ok" and answer["off"].startswith("failed: BadDeviceResponse")
        assert answer["off_attempts"] >= 2


@pytest.mark.parametrize("pulse_supported", [True, False])
async def test_camera_side_pulse(pulse_supported: bool) -> None:
    account = CamStreamerAccount(rate_per_s=FAST, pulse_supported=pulse_supported)
    async with CamStreamerSimulator({"default": account}) as sim:
        options = fast_options(device_url_template=sim.device_url_template(), output_pulse=True)
        async with client_for(sim, options=options) as client:
            if pulse_supported:
                result = (await client.perform(output({"port": 1, "duration_s": 0.3}))).result
                assert result["pulse"] is True and result["off"] == "ok"
            else:
                with pytest.raises(DeviceRefused, match="400"):
                    await client.perform(output({"port": 1, "duration_s": 0.3}))
        # The camera ends the pulse itself; the "off" is sent all the same.
        assert [a for _, a, _ in account.vapix_calls] == ["1:/300\\", "1:\\"]
        assert account.port_state.get((GATE, 1), False) is False


# ------------------------------------------------------------------ probe


async def test_probe_shows_device_access_and_downloads_a_video(tmp_path: Path) -> None:
    account = CamStreamerAccount(rate_per_s=FAST, prepare_seconds=0.5)
    async with CamStreamerSimulator({"default": account}) as sim:
        options = fast_options(device_url_template=sim.device_url_template())
        site = camstreamer_site("cs", sim.url(), options=options)
        out = StringIO()
        assert await run_probe(site, out=out) == 0, out.getvalue()
    report = out.getvalue()
    assert "[PASS] device access (VAPIX through the cloud)" in report
    assert f"camera {GATE} (Gate) answered 'port1=inactive' with the site's API token" in report
    assert "[PASS] one snapshot" in report and "8192 bytes (video/mp4)" in report
    assert account.downloads == 1
