"""The exacqVision simulator, exercised over real HTTP as the daemon will use it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from cms_ingest.simulators.davantis import snapshot_jpeg
from cms_ingest.simulators.exacq import EVENT_TYPES, ExacqSimulator, ExacqSite

Params = Sequence[tuple[str, str]]


# ---------------------------------------------------------------- a small client
def decode(content_type: str, raw: bytes) -> Any:
    if content_type == "application/json":
        return json.loads(raw)
    if content_type.startswith("text/"):
        return raw.decode()
    return raw


async def get(
    http: aiohttp.ClientSession, url: str, params: Params = ()
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.get(url, params=list(params), allow_redirects=False) as resp:
        return resp.status, decode(resp.content_type, await resp.read()), resp.headers


async def post(
    http: aiohttp.ClientSession, url: str, form: dict[str, str], params: Params = ()
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.post(url, data=form, params=list(params), allow_redirects=False) as resp:
        return resp.status, decode(resp.content_type, await resp.read()), resp.headers


async def login(
    http: aiohttp.ClientSession, base: str, user: str = "cms", password: str = "secret"
) -> str:
    """What a client does: log in, then take the session id under either spelling."""
    form = {"u": user, "p": password, "responseVersion": "2", "s": "0"}
    status, body, _ = await post(http, f"{base}/v1/login.web", form)
    assert status == 200
    assert body["success"] is True
    return str(body.get("sessionId") or body["sessionID"])


async def events(
    http: aiohttp.ClientSession, base: str, sid: str, *types: int
) -> list[dict[str, Any]]:
    params = [("s", sid), *(("filter", str(t)) for t in types)]
    status, body, _ = await get(http, f"{base}/v1/events.web", params)
    assert status == 200
    assert body["success"] is True
    return list(body["events"])


async def set_trigger(
    http: aiohttp.ClientSession, base: str, sid: str, tid: int | str, state: str
) -> tuple[int, Any]:
    form = {"s": sid, "tid": str(tid), "state": state}
    status, body, _ = await post(http, f"{base}/v1/softtriggers.web", form)
    return status, body


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[ExacqSimulator]:
    async with ExacqSimulator() as simulator:
        yield simulator


# ------------------------------------------------------------------- sessions
@pytest.mark.parametrize("key", ["sessionId", "sessionID"])
async def test_login_with_either_session_key_then_logout(
    http: aiohttp.ClientSession, key: str
) -> None:
    site = ExacqSite(session_key=key)
    async with ExacqSimulator({"default": site}) as sim:
        base = sim.url()
        form = {"u": "cms", "p": "secret", "responseVersion": "2", "s": "0"}
        status, body, _ = await post(http, f"{base}/v1/login.web", form)
        assert status == 200
        assert body["success"] is True
        assert set(body) & {"sessionId", "sessionID"} == {key}
        assert (body["name"], body["id"]) == ("Server 1", "0")
        sid = body[key]
        status, body, _ = await get(http, f"{base}/v1/config.web", [("s", sid), ("output", "json")])
        assert status == 200
        assert body["success"] is True
        assert body["Cameras"] == [
            {"id": 11, "name": "Gate cam", "formats": [0, 5, 6]},
            {"id": 12, "name": "Yard cam", "formats": [0, 5, 6]},
            {"id": 13, "name": "Dock cam", "formats": [0, 5, 6]},
        ]
        assert body["Triggers"] == [{"id": 3, "name": "Siren"}, {"id": 4, "name": "Floodlight"}]

        status, body, headers = await post(http, f"{base}/v1/logout.web", {}, [("s", sid)])
        assert (status, body) == (200, "login.web")
        assert headers["Content-Type"].startswith("text/html")
        status, _, _ = await get(http, f"{base}/v1/config.web", [("s", sid)])
        assert status == 401
        assert (site.logins, site.logouts) == (1, 1)
        assert site.requests["POST /v1/login.web"] == 1
        assert site.requests["GET /v1/config.web"] == 2


async def test_bad_credentials_and_bad_login_forms(
    sim: ExacqSimulator, http: aiohttp.ClientSession
) -> None:
    url = f"{sim.url()}/v1/login.web"
    form = {"u": "cms", "p": "wrong", "responseVersion": "2", "s": "0"}
    status, body, _ = await post(http, url, form)
    assert (status, body) == (200, {"success": False, "error": "Invalid username or password"})
    status, body, _ = await post(http, url, {"u": "cms", "p": "secret"})
    assert (status, body) == (400, "Invalid Request")
    assert sim.site().logins == 0


@pytest.mark.parametrize("mode", ["401", "403", "302", "html", "success_false"])
async def test_each_expiry_mode(http: aiohttp.ClientSession, mode: str) -> None:
    sites = {"default": ExacqSite(expiry_mode=mode), "x": ExacqSite(expiry_mode=mode)}
    async with ExacqSimulator(sites) as sim:
        for tenant in sites:
            base = sim.url(tenant)
            sid = await login(http, base)
            assert await events(http, base, sid) == []
            sim.site(tenant).expire_sessions()
            status, body, headers = await get(http, f"{base}/v1/events.web", [("s", sid)])
            if mode in ("401", "403"):
                assert status == int(mode)
            elif mode == "302":
                assert (status, body) == (302, b"")
                prefix = "" if tenant == "default" else "/t/x"
                assert headers["Location"] == f"{prefix}/v1/login.web"
                # A client that follows the redirect lands on the HTML login page.
                async with http.get(f"{base}/v1/events.web", params={"s": sid}) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "text/html"
            elif mode == "html":
                assert status == 200
                assert headers["Content-Type"].startswith("text/html")
                assert "login.web" in body
            else:
                assert (status, body) == (200, {"success": False, "error": "Session expired"})
            # A new login works; a missing session shows the same way as an expired one.
            assert await events(http, base, await login(http, base)) == []
            missing = await get(http, f"{base}/v1/events.web")
            assert missing[0] == status


async def test_session_ttl_and_expiry_mode_set_later(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(session_ttl_s=0.15)
    async with ExacqSimulator({"default": site}) as sim:
        sid = await login(http, sim.url())
        assert await events(http, sim.url(), sid) == []
        await asyncio.sleep(0.2)
        assert (await get(http, f"{sim.url()}/v1/events.web", [("s", sid)]))[0] == 401
        site.expiry_mode = "success_false"
        _, body, _ = await get(http, f"{sim.url()}/v1/events.web", [("s", sid)])
        assert body == {"success": False, "error": "Session expired"}
        with pytest.raises(ValueError, match="expiry_mode"):
            site.expiry_mode = "teapot"


# --------------------------------------------------------------------- events
async def test_active_events_are_listed_filtered_and_drop_out_when_ended(
    sim: ExacqSimulator, http: aiohttp.ClientSession
) -> None:
    site, base = sim.site(), sim.url()
    sid = await login(http, base)
    motion = site.activate_event(1, 11, start=datetime(2026, 11, 21, 10, 0, tzinfo=UTC))
    trigger = site.activate_event(3, 12)
    analytic = site.activate_event(24, 13)
    listed = await events(http, base, sid)
    assert [item["id"] for item in listed] == [motion.id, trigger.id, analytic.id]
    assert listed[0] == {
        "id": motion.id,
        "type": 1,
        "name": "Video motion",
        "sourceId": 11,
        "sourceName": "Gate cam",
        "start": "2026-11-21T05:00:00-05:00",
        "active": True,
    }
    assert (listed[1]["name"], listed[1]["sourceName"]) == ("Input trigger active", "Yard cam")
    assert listed[2]["name"] == "Analytic rule triggered"
    assert datetime.fromisoformat(listed[1]["start"]) == trigger.start
    assert abs(trigger.start - datetime.now(UTC)) < timedelta(seconds=2)
    assert [item["type"] for item in await events(http, base, sid, 1, 3)] == [1, 3]
    assert [item["type"] for item in await events(http, base, sid, 24)] == [24]
    assert await events(http, base, sid, 2) == []

    site.end_event(trigger)
    assert trigger.end is not None
    assert [item["id"] for item in await events(http, base, sid)] == [motion.id, analytic.id]
    assert site.events == [motion, trigger, analytic]  # ended events stay, inactive
    assert len(EVENT_TYPES) == 29
    with pytest.raises(ValueError, match="1-29"):
        site.activate_event(30)


async def test_events_without_ids(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(event_ids=False, utc_offset="+05:30")
    async with ExacqSimulator({"default": site}) as sim:
        sid = await login(http, sim.url())
        event = site.activate_event(2, 13, start=datetime(2026, 11, 21, 10, 0, tzinfo=UTC))
        assert event.id is None
        [item] = await events(http, sim.url(), sid)
        assert "id" not in item
        assert (item["type"], item["sourceId"], item["start"]) == (
            2,
            13,
            "2026-11-21T15:30:00+05:30",
        )


# --------------------------------------------------------------- soft triggers
async def test_soft_trigger_drops_by_itself_and_a_held_trigger_changes_twice(
    sim: ExacqSimulator, http: aiohttp.ClientSession
) -> None:
    """Trigger 3: one `on`, then nothing. Trigger 4: `on` every second for 3 s (at 0, 1, 2 s),
    then `off` at 3 s.
    Run side by side so the test takes one hold (3 s), not two."""
    site, base = sim.site(), sim.url()
    sid = await login(http, base)

    async def once() -> float:
        sent = time.monotonic()
        assert await set_trigger(http, base, sid, 3, "on") == (200, {"success": True})
        await asyncio.sleep(3.3)
        return sent

    async def held() -> None:
        for _ in range(3):
            assert (await set_trigger(http, base, sid, 4, "on"))[0] == 200
            assert site.trigger_state(4) == "on"
            await asyncio.sleep(1.0)
        assert (await set_trigger(http, base, sid, 4, "off"))[0] == 200
        assert site.trigger_state(4) == "off"

    async def watch() -> None:
        await asyncio.sleep(1.5)
        _, body, _ = await get(http, f"{base}/v1/softtriggers.web", [("s", sid)])
        assert body == {
            "Triggers": [
                {"id": 3, "name": "Siren", "state": "on"},
                {"id": 4, "name": "Floodlight", "state": "on"},
            ]
        }

    t0, _, _ = await asyncio.gather(once(), held(), watch())
    [(on_at, on), (off_at, off)] = site.trigger_transitions[3]
    assert (on, off) == ("on", "off")
    assert t0 <= on_at < t0 + 0.1
    assert 2.98 <= off_at - on_at < 3.1
    assert site.trigger_state(3) == "off"
    assert [state for _, state in site.trigger_transitions[4]] == ["on", "off"]
    assert 2.9 < site.trigger_transitions[4][1][0] - site.trigger_transitions[4][0][0] < 3.2
    assert [(tid, state) for tid, state, _ in site.trigger_sets] == [
        (3, "on"),
        (4, "on"),
        (4, "on"),
        (4, "on"),
        (4, "off"),
    ]
    _, body, _ = await get(http, f"{base}/v1/softtriggers.web", [("s", sid)])
    assert {item["state"] for item in body["Triggers"]} == {"off"}


async def test_soft_trigger_refusals(sim: ExacqSimulator, http: aiohttp.ClientSession) -> None:
    site, base = sim.site(), sim.url()
    sid = await login(http, base)
    assert await set_trigger(http, base, sid, 99, "on") == (404, "Invalid Request")
    assert await set_trigger(http, base, sid, 3, "maybe") == (400, "Invalid Request")
    assert await set_trigger(http, base, sid, "x", "on") == (400, "Invalid Request")
    assert site.trigger_transitions == {3: [], 4: []}
    # Off while off changes nothing; the session may come in the query of a POST too.
    status, body, _ = await post(
        http, f"{base}/v1/softtriggers.web", {"tid": "3", "state": "off"}, [("s", sid)]
    )
    assert (status, body) == (200, {"success": True})
    assert site.trigger_transitions[3] == []
    assert (await set_trigger(http, base, "stale", 3, "on"))[0] == 401
    assert len(site.trigger_sets) == 3  # the unknown tid, the bad state, and the off


# ---------------------------------------------------------------------- media
async def test_recorded_and_live_frames(http: aiohttp.ClientSession) -> None:
    sites = {"default": ExacqSite(), "bare": ExacqSite(recorded=False)}
    async with ExacqSimulator(sites) as sim:
        base = sim.url()
        sid = await login(http, base)
        when = "2026-11-21T05:00:00-05:00"
        frame = [("s", sid), ("camera", "12"), ("time", when), ("format", "6")]
        status, body, headers = await get(http, f"{base}/v1/frame.web", frame)
        assert (status, headers["Content-Type"]) == (200, "image/jpeg")
        assert body == snapshot_jpeg(12)
        unknown = [("s", sid), ("camera", "99"), ("time", when), ("format", "6")]
        assert (await get(http, f"{base}/v1/frame.web", unknown))[0] == 404
        assert (await get(http, f"{base}/v1/frame.web", [("s", sid), ("camera", "12")]))[0] == 400

        live = [("s", sid), ("camera", "11"), ("format", "6")]
        status, body, headers = await get(http, f"{base}/v1/video.web", live)
        assert (status, headers["Content-Type"]) == (200, "image/jpeg")
        assert body.startswith(b"\xff\xd8")
        missing = [("s", sid), ("camera", "99"), ("format", "6")]
        assert (await get(http, f"{base}/v1/video.web", missing))[0] == 404

        bare = sim.url("bare")
        sid = await login(http, bare)
        frame = [("s", sid), ("camera", "12"), ("time", when), ("format", "6")]
        assert (await get(http, f"{bare}/v1/frame.web", frame))[0] == 404
        live = [("s", sid), ("camera", "12"), ("format", "6")]
        assert (await get(http, f"{bare}/v1/video.web", live))[0] == 200


async def test_export_lifecycle(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(export_seconds=0.25)
    async with ExacqSimulator({"default": site}) as sim:
        url = f"{sim.url()}/v1/export.web"
        sid = await login(http, sim.url())
        assert (await get(http, url, [("s", sid)]))[:2] == (
            200,
            {"success": True, "formats": ["ps_zip", "mp4", "avi"]},
        )
        now = datetime.now(UTC)
        start, end = site.now() - timedelta(seconds=40), site.now() - timedelta(seconds=10)
        window = [("start", start.isoformat()), ("end", end.isoformat())]
        assert "-05:00" in window[0][1]

        assert (await get(http, url, [("s", sid), ("camera", "11")]))[0] == 400
        future = [("end", (now + timedelta(seconds=30)).isoformat()), ("start", start.isoformat())]
        status, body, _ = await get(http, url, [("s", sid), ("camera", "11"), *future])
        assert (status, body) == (400, {"success": False, "error": "end time is in the future"})

        created = []
        for _ in range(2):
            params = [("s", sid), ("camera", "11"), *window, ("format", "mp4")]
            status, body, _ = await get(http, url, params)
            assert status == 200
            assert body["success"] is True
            created.append(body["export"])
        odd, even = created
        assert site.exports[odd]["camera"] == 11
        assert (site.exports[odd]["start"], site.exports[odd]["end"]) == (start, end)
        assert site.exports[odd]["format"] == "mp4"

        _, body, _ = await get(http, url, [("s", sid), ("export", odd)])
        assert isinstance(body["progress"], str)
        assert int(body["progress"]) < 100
        assert body["status"] == "in progress"
        _, body, _ = await get(http, url, [("s", sid), ("export", even)])
        assert isinstance(body["progress"], int)
        download = [("s", sid), ("export", odd), ("action", "download")]
        status, body, _ = await get(http, url, download)
        assert (status, body) == (400, {"success": False, "error": "export not complete"})
        assert site.exports[odd]["downloaded"] is False

        await asyncio.sleep(0.3)
        _, body, _ = await get(http, url, [("s", sid), ("export", odd)])
        assert body == {"success": True, "progress": "100", "status": "completed"}
        _, body, _ = await get(http, url, [("s", sid), ("export", even)])
        assert body == {"success": True, "progress": 100, "status": "completed"}
        status, body, headers = await get(http, url, download)
        assert (status, headers["Content-Type"]) == (200, "video/mp4")
        assert len(body) == 8192
        assert body[4:8] == b"ftyp"
        assert site.exports[odd]["downloaded"] is True

        finish = [("s", sid), ("export", odd), ("action", "finish")]
        assert (await get(http, url, finish))[:2] == (200, {"success": True})
        assert site.exports[odd]["finished"] is True
        assert (await get(http, url, [("s", sid), ("export", odd)]))[0] == 404
        assert (await get(http, url, [("s", sid), ("export", "nope")]))[0] == 404


# ------------------------------------------------------------- test hooks
async def test_http_control_surface(http: aiohttp.ClientSession) -> None:
    async with ExacqSimulator({"x": ExacqSite()}) as sim:
        site, control = sim.site("x"), f"{sim.url('x')}/_sim"
        async with http.post(f"{control}/events", json={"type": 21, "source_id": 12}) as resp:
            event = await resp.json()
        assert (event["name"], event["source_name"], event["active"]) == (
            "Device disconnected",
            "Yard cam",
            True,
        )
        assert event["start"].endswith("-05:00")
        async with http.post(f"{control}/events", json={"end": event["id"]}) as resp:
            assert (await resp.json())["active"] is False
        async with http.post(f"{control}/events", json={"end": "nope"}) as resp:
            assert resp.status == 400
        async with http.post(f"{control}/alarms", json={"count": 2, "type": 1}) as resp:
            assert await resp.json() == [2, 3]
        assert [e.type for e in site.events] == [21, 1, 1]

        sid = await login(http, sim.url("x"))
        faults = {"expire_sessions": True, "expiry_mode": "302"}
        async with http.post(f"{control}/faults", json=faults) as resp:
            state = await resp.json()
        assert (state["expiry_mode"], state["sessions"]) == ("302", 0)
        status, _, headers = await get(http, f"{sim.url('x')}/v1/events.web", [("s", sid)])
        assert (status, headers["Location"]) == (302, "/t/x/v1/login.web")
        async with http.post(f"{control}/faults", json={"expiry_mode": "teapot"}) as resp:
            assert resp.status == 400
        async with http.get(f"{control}/state") as resp:
            state = await resp.json()
        assert state["events"] == 3
        assert len(state["active_events"]) == 2
        assert state["triggers"] == {"3": "off", "4": "off"}
        assert state["requests"] == {"POST /v1/login.web": 1, "GET /v1/events.web": 1}


async def test_generator_activates_events_that_end_by_themselves() -> None:
    sites = {"a": ExacqSite(), "b": ExacqSite()}
    sim = ExacqSimulator(sites)
    async with sim:
        sim.start_generator(40.0, types=(1, 24), seed=3)
        await asyncio.sleep(0.25)
        await sim.stop_generator()
        for site in sites.values():
            assert site.events
            assert {e.type for e in site.events} <= {1, 24}
            assert all(e.end is None for e in site.events)
            assert len(site._endings) == len(site.events)
    for site in sites.values():
        assert not site._endings  # stopping the server cancels the scheduled ends
    with pytest.raises(ValueError, match="1-29"):
        ExacqSimulator().start_generator(1.0, types=(0,))


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.exacq",
        "--port",
        "0",
        "--sites",
        "2",
        "--session-key",
        "sessionID",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines = [
            (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip() for _ in range(3)
        ]
        assert lines[0].endswith("/t/s0000")
        assert lines[1].endswith("/t/s0001")
        assert lines[2] == "READY"
        async with aiohttp.ClientSession() as http:
            form = {"u": "cms", "p": "secret", "responseVersion": "2"}
            _, body, _ = await post(http, f"{lines[1]}/v1/login.web", form)
            assert "sessionID" in body
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# ------------------------------------------------------- switches added for issue 13
async def test_event_id_styles_and_a_device_reset(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(event_id_style="counter")
    async with ExacqSimulator({"default": site}) as sim:
        base = sim.url()
        site.activate_event(1, 11)
        site.activate_event(1, 11)
        sid = await login(http, base)
        assert [e["id"] for e in await events(http, base, sid)] == ["1", "2"]
        site.reset_device()  # sessions, events and the counter are gone
        status, _, _ = await get(http, f"{base}/v1/events.web", [("s", sid)])
        assert status == 401
        site.activate_event(2, 12)
        sid = await login(http, base)
        assert [e["id"] for e in await events(http, base, sid)] == ["1"]
        site.event_id_style = "definition"
        first, second = site.activate_event(3, 13), site.activate_event(3, 13)
        other = site.activate_event(3, 12)
        assert first.id == second.id != other.id
    with pytest.raises(ValueError, match="event_id_style"):
        ExacqSite(event_id_style="serial")


async def test_event_monitoring_profiles_and_triggered_links(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(monitoring_profiles=("CMS", "Guard desk"))
    async with ExacqSimulator({"default": site}) as sim:
        base = sim.url()
        sid = await login(http, base)
        status, body, _ = await get(http, f"{base}/v1/eventmonitoring.web", [("s", sid)])
        assert status == 200 and [p["name"] for p in body["profiles"]] == ["CMS", "Guard desk"]
        event = site.activate_event(1, 11)
        site.end_event(event)  # gone from the active list, still a triggered link
        assert await events(http, base, sid) == []
        url = f"{base}/v1/eventmonitoring.web/Guard%20desk/triggered"
        status, body, _ = await get(http, url, [("s", sid), ("duration", "60")])
        assert status == 200 and body["success"] is True
        (link,) = body["triggeredEvents"]
        assert (link["eventSourceType"], link["eventSourceId"], link["eventType"]) == (5, 11, 1)
        assert link["eventId"] == event.id and link["time"] == event.to_json(site.tz, True)["start"]
        site.triggered[0] = (site.triggered[0][0] - 10, event)  # triggered 10 s ago
        status, body, _ = await get(http, url, [("s", sid)])  # the manual's default: 5 s
        assert body["triggeredEvents"] == []
        for duration in ("61", "-1", "x"):
            status, body, _ = await get(http, url, [("s", sid), ("duration", duration)])
            assert (status, body) == (400, "Invalid Request")
        status, _, _ = await get(
            http, f"{base}/v1/eventmonitoring.web/Nope/triggered", [("s", sid)]
        )
        assert status == 404
        site.event_monitoring = False
        status, _, _ = await get(http, f"{base}/v1/eventmonitoring.web", [("s", sid)])
        assert status == 404


async def test_times_without_offset_and_the_configured_timezone(
    http: aiohttp.ClientSession,
) -> None:
    site = ExacqSite(utc_offset="-05:00", naive_times=True)
    async with ExacqSimulator({"default": site}) as sim:
        base = sim.url()
        site.activate_event(1, 11, start=datetime(2026, 11, 21, 10, 0, tzinfo=UTC))
        sid = await login(http, base)
        (event,) = await events(http, base, sid)
        assert event["start"] == "2026-11-21T05:00:00"
        _, body, _ = await get(http, f"{base}/v1/config.web", [("s", sid), ("output", "json")])
        assert body["timezone"] == -5


async def test_export_formats_completion_lag_and_failure_status(
    http: aiohttp.ClientSession,
) -> None:
    site = ExacqSite(
        export_formats=("ps_zip", "avi"), export_seconds=0, finalize_seconds=30, failure_status=200
    )
    async with ExacqSimulator({"default": site}) as sim:
        base = sim.url()
        sid = await login(http, base)
        url = f"{base}/v1/export.web"
        _, body, _ = await get(http, url, [("s", sid)])
        assert body["formats"] == ["ps_zip", "avi"]
        start = (datetime.now(UTC) - timedelta(seconds=20)).isoformat(timespec="seconds")
        end = (datetime.now(UTC) - timedelta(seconds=10)).isoformat(timespec="seconds")
        window = [("s", sid), ("camera", "11"), ("start", start), ("end", end)]
        status, body, _ = await get(http, url, [*window, ("format", "mp4")])
        assert (status, body) == (200, {"success": False, "error": "unknown export format 'mp4'"})
        status, body, _ = await get(http, url, [*window, ("format", "avi")])
        export_id = body["export"]
        _, body, _ = await get(http, url, [("s", sid), ("export", export_id)])
        assert (body["progress"], body["status"]) == ("100", "in progress")  # 100 %, not done
        status, body, _ = await get(
            http, url, [("s", sid), ("export", export_id), ("action", "download")]
        )
        assert (status, body) == (200, {"success": False, "error": "export not complete"})
        site.finalize_seconds = 0
        _, body, _ = await get(http, url, [("s", sid), ("export", export_id)])
        assert body["status"] == "completed"


async def test_a_refusal_status_of_200(http: aiohttp.ClientSession) -> None:
    site = ExacqSite(refusal_status=200)
    async with ExacqSimulator({"default": site}) as sim:
        sid = await login(http, sim.url())
        status, body = await set_trigger(http, sim.url(), sid, 99, "on")
        assert (status, body) == (200, "Invalid Request")
