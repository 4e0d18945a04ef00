"""The Davantis simulator, exercised over real HTTP as the daemon will use it."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite, snapshot_jpeg


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[DavantisSimulator]:
    async with DavantisSimulator() as simulator:
        yield simulator


async def login(
    http: aiohttp.ClientSession, base: str, username: str = "cms", password: str = "secret"
) -> dict[str, Any]:
    form = f"grant_type=password&username={username}&password={password}"
    async with http.post(f"{base}/oauth/token", data=form) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def token_for(http: aiohttp.ClientSession, base: str) -> str:
    return str((await login(http, base))["access_token"])


async def get_json(
    http: aiohttp.ClientSession, url: str, token: str, **params: str
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(url, headers=headers, params=params) as resp:
        body = await resp.read()
        if resp.content_type != "application/json":
            return resp.status, body.decode() or None
        return resp.status, json.loads(body)


def errorcode(body: Any) -> str:
    return str(body["fault"]["detail"]["errorcode"])


# ------------------------------------------------------------------ oauth
async def test_login_without_content_type_and_with_leading_question_mark(
    sim: DavantisSimulator,
) -> None:
    # A raw socket-level request, exactly like the manual's http.client sample.
    reader, writer = await asyncio.open_connection(*sim.url().removeprefix("http://").split(":"))
    body = b"?grant_type=password&username=cms&password=secret"
    head = f"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, payload = raw.partition(b"\r\n\r\n")
    assert b" 200 " in status_line.split(b"\r\n")[0]
    token = json.loads(payload)
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 3599
    assert len(token["access_token"]) == 16
    assert len(token["refresh_token"]) == 16
    assert sim.site().logins == 1


async def test_wrong_credentials(sim: DavantisSimulator, http: aiohttp.ClientSession) -> None:
    form = "grant_type=password&username=cms&password=nope"
    async with http.post(f"{sim.url()}/oauth/token", data=form) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["fault"]["faultstring"] == "Invalid credentials"
    assert errorcode(body) == "keymanagement.service.invalid_credentials"
    assert sim.site().logins == 0


async def test_refresh_consumes_the_old_refresh_token(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    first = await login(http, sim.url())
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    async with http.post(f"{sim.url()}/oauth/token", data=form) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert set(second) == {"access_token", "expires_in", "refresh_token"}
    assert second["access_token"] != first["access_token"]
    status, _ = await get_json(http, f"{sim.url()}/installation", second["access_token"])
    assert status == 200
    async with http.post(f"{sim.url()}/oauth/token", data=form) as resp:
        assert resp.status == 401
        assert errorcode(await resp.json()) == "keymanagement.service.invalid_refresh_token"
    assert sim.site().refreshes == 1


async def test_access_token_errors(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(access_ttl=0.1)
    async with DavantisSimulator({"default": site}) as sim:
        url = f"{sim.url()}/cameras"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert errorcode(await resp.json()) == "keymanagement.service.invalid_access_token"
        assert (await get_json(http, url, "not-a-token"))[1]["fault"]["faultstring"]
        token = await token_for(http, sim.url())
        assert (await get_json(http, url, token))[0] == 200
        await asyncio.sleep(0.15)
        status, body = await get_json(http, url, token)
        assert status == 401
        assert errorcode(body) == "keymanagement.service.access_token_expired"


async def test_expire_and_revoke(sim: DavantisSimulator, http: aiohttp.ClientSession) -> None:
    site, url = sim.site(), f"{sim.url()}/installation"
    tokens = await login(http, sim.url())
    site.expire_access_tokens()
    status, body = await get_json(http, url, tokens["access_token"])
    assert (status, errorcode(body)) == (401, "keymanagement.service.access_token_expired")
    site.revoke_tokens()
    status, body = await get_json(http, url, tokens["access_token"])
    assert (status, errorcode(body)) == (401, "keymanagement.service.invalid_access_token")
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    async with http.post(f"{sim.url()}/oauth/token", data=form) as resp:
        assert resp.status == 401


# ------------------------------------------------------- device resources
async def test_installation_and_cameras(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    token = await token_for(http, sim.url())
    _, installation = await get_json(http, f"{sim.url()}/installation", token)
    assert installation["current_utc_offset"] == "+00:00"
    _, cameras = await get_json(http, f"{sim.url()}/cameras", token)
    assert [cam["id"] for cam in cameras] == [1, 2, 3, 4]
    assert cameras[0]["alias"] == "North gate"
    assert all(cam["active"] for cam in cameras)
    assert any(cam["thermal"] for cam in cameras)


# ---------------------------------------------------------------- alarms
async def test_page_cap_newest_first_and_alarm_object(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    sim.site().add_alarms(350)
    token = await token_for(http, sim.url())
    status, alarms = await get_json(http, f"{sim.url()}/alarms", token)
    assert status == 200
    assert [a["id"] for a in alarms] == list(range(350, 50, -1))
    newest = alarms[0]
    assert set(newest) >= {
        "id", "idmachine", "idrule", "idevent", "idcamera", "description",
        "description_translation", "started", "ended", "video_status", "video_absolute",
        "ack", "snapshot_status", "snapshot_absolute",
    }  # fmt: skip
    assert "cra" not in newest
    assert newest["idevent"] == 11
    assert newest["description"] == "Intrusion detected"
    assert newest["started"].endswith("+00:00")
    assert newest["snapshot_absolute"].startswith("http://10.20.30.40:8080/")
    assert datetime.fromisoformat(newest["started"]) > datetime.fromisoformat(alarms[1]["started"])


async def test_min_id_polling_and_204(sim: DavantisSimulator, http: aiohttp.ClientSession) -> None:
    site = sim.site()
    site.add_alarms(3)
    token = await token_for(http, sim.url())
    url = f"{sim.url()}/alarms"
    assert await get_json(http, url, token, min_id="3") == (204, None)
    site.add_alarms(2)
    status, alarms = await get_json(http, url, token, min_id="3")
    assert (status, [a["id"] for a in alarms]) == (200, [5, 4])
    assert (await get_json(http, url, token, event_id="0"))[0] == 200  # no min_id: 200 []
    status, body = await get_json(http, url, token, min_id="abc")
    assert (status, errorcode(body)) == (400, "alarms.invalid_filter")


async def test_cra_filter_follows_input_arming(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    site = sim.site()
    token = await token_for(http, sim.url())
    site.add_alarm(camera=1)  # 1: armed
    async with http.patch(
        f"{sim.url()}/inputs/1",
        data=b'{"status": false}',
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] is False
    site.add_alarm(camera=1)  # 3: disarmed (2 is the "Disarmed" event on camera 0)
    site.add_alarm(camera=3)  # 4: armed, input 2 still on
    url = f"{sim.url()}/alarms"
    _, armed = await get_json(http, url, token, cra="yes")
    _, disarmed = await get_json(http, url, token, cra="no")
    _, both = await get_json(http, url, token)
    assert [a["id"] for a in armed] == [4, 2, 1]
    assert [a["id"] for a in disarmed] == [3]
    assert [a["id"] for a in both] == [4, 3, 2, 1]
    arming = both[2]
    assert (arming["idevent"], arming["idcamera"], arming["description"]) == (102, 0, "Disarmed")
    assert arming["snapshot_status"] == arming["video_status"] == "unavailable"
    assert site.input_log == [(1, False)]


async def test_camera_event_and_date_filters(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    site = sim.site()
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    for minute, (event, camera) in enumerate([(1, 1), (2, 2), (3, 3), (11, 1), (0, 0)]):
        site.add_alarm(event=event, camera=camera, started=base + timedelta(minutes=minute))
    token = await token_for(http, sim.url())
    url = f"{sim.url()}/alarms"
    _, found = await get_json(http, url, token, camera_id="0,1")
    assert [a["id"] for a in found] == [5, 4, 1]
    _, found = await get_json(http, url, token, event_id="2,3")
    assert [a["id"] for a in found] == [3, 2]
    _, found = await get_json(
        http, url, token, min_date="2024-05-01T12:01Z", max_date="2024-05-01T12:03:00+00:00"
    )
    assert [a["id"] for a in found] == [4, 3, 2]
    _, found = await get_json(http, url, token, max_date="2024-05-01T12:00:00")  # naive = UTC
    assert [a["id"] for a in found] == [1]


async def test_max_date_paging_reaches_every_alarm(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(page_cap=300)
    async with DavantisSimulator({"default": site}) as sim:
        site.add_alarms(700)
        token = await token_for(http, sim.url())
        seen: set[int] = set()
        params: dict[str, str] = {}
        for _ in range(5):
            _, page = await get_json(http, f"{sim.url()}/alarms", token, **params)
            new = {a["id"] for a in page} - seen
            if not new:
                break
            seen |= new
            params = {"max_date": page[-1]["started"]}
        assert seen == set(range(1, 701))


async def test_media_goes_from_recording_to_ready(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(media_delay=0.2, video_size=5000)
    async with DavantisSimulator({"default": site}) as sim:
        alarm = site.add_alarm()
        system = site.add_alarm(event=0, camera=0)
        token = await token_for(http, sim.url())
        headers = {"Authorization": f"Bearer {token}"}
        _, alarms = await get_json(http, f"{sim.url()}/alarms", token)
        assert alarms[1]["snapshot_status"] == alarms[1]["video_status"] == "recording"
        assert alarms[0]["snapshot_status"] == "unavailable"
        async with http.get(f"{sim.url()}/alarms/{alarm.id}/snapshot", headers=headers) as resp:
            assert resp.status == 404
        await asyncio.sleep(0.25)
        _, alarms = await get_json(http, f"{sim.url()}/alarms", token, min_id="0")
        assert alarms[1]["snapshot_status"] == alarms[1]["video_status"] == "ready"
        async with http.get(f"{sim.url()}/alarms/{alarm.id}/snapshot", headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/jpeg"
            jpeg = await resp.read()
        assert jpeg.startswith(b"\xff\xd8\xff")
        assert jpeg.endswith(b"\xff\xd9")
        assert b"alarm 1" in jpeg
        assert jpeg != snapshot_jpeg(2)
        async with http.get(f"{sim.url()}/alarms/{alarm.id}/video", headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "video/mp4"
            assert resp.content_length == 5000
            video = await resp.read()
        assert len(video) == 5000
        assert video[:12] == b"\x00\x00\x00\x18ftypmp42"
        async with http.get(f"{sim.url()}/alarms/{system.id}/video", headers=headers) as resp:
            assert resp.status == 404
        async with http.get(f"{sim.url()}/alarms/999/video", headers=headers) as resp:
            assert resp.status == 404


def test_snapshot_is_a_well_formed_jpeg() -> None:
    jpeg = snapshot_jpeg(42)
    assert jpeg[:2] == b"\xff\xd8"
    pos, markers = 2, []
    while jpeg[pos + 1] != 0xDA:  # walk the segments up to the scan
        assert jpeg[pos] == 0xFF
        markers.append(jpeg[pos + 1])
        (length,) = struct.unpack(">H", jpeg[pos + 2 : pos + 4])
        pos += 2 + length
    assert markers == [0xFE, 0xDB, 0xC0, 0xC4, 0xC4]
    assert jpeg[pos + 2 : pos + 4] == b"\x00\x08"
    assert jpeg[pos + 10 :] == b"\x3f\xff\xd9"


# ---------------------------------------------------------- relays, inputs
async def test_relays_switch_off_by_themselves(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(relay_on_seconds=0.1)
    async with DavantisSimulator({"default": site}) as sim:
        headers = {"Authorization": f"Bearer {await token_for(http, sim.url())}"}
        url = f"{sim.url()}/relays"
        async with http.patch(f"{url}/2", json={"status": True}, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.json() == {"id": 2, "alias": "light", "status": True}
        assert site.relays[2]["status"] is True
        await asyncio.sleep(0.15)
        async with http.get(url, headers=headers) as resp:
            assert [r["status"] for r in await resp.json()] == [False, False]
        async with http.patch(f"{url}/9", json={"status": True}, headers=headers) as resp:
            assert resp.status == 404
            assert "fault" in await resp.json()
        async with http.patch(f"{url}/1", json={"status": "on"}, headers=headers) as resp:
            assert resp.status == 400
            assert "fault" in await resp.json()
        assert site.relay_log == [(2, True)]


async def test_hardware_input_is_refused(
    sim: DavantisSimulator, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {await token_for(http, sim.url())}"}
    async with http.get(f"{sim.url()}/inputs", headers=headers) as resp:
        inputs = await resp.json()
    assert [(i["id"], i["hardware"], i["cameras"]) for i in inputs] == [
        (1, False, [1, 2]),
        (2, True, [3, 4]),
    ]
    async with http.patch(f"{sim.url()}/inputs/2", json={"status": False}, headers=headers) as resp:
        assert resp.status == 403
        assert await resp.json() == {
            "fault": {
                "faultstring": (
                    "Input 2 is controlled by hardware and cannot be changed through the API"
                ),
                "detail": {"errorcode": "inputs.hardware_controlled"},
            }
        }
    assert sim.site().input_log == []
    assert sim.site().alarms == []


# ------------------------------------------------------- tenants and faults
async def test_tenant_routing(http: aiohttp.ClientSession) -> None:
    sites = {"default": DavantisSite(), "a": DavantisSite(), "b": DavantisSite(password="b")}
    async with DavantisSimulator(sites) as sim:
        assert sim.url("a") == f"{sim.url()}/t/a"
        sites["a"].add_alarms(2)
        sites["b"].add_alarms(5)
        token_a = await token_for(http, sim.url("a"))
        _, alarms = await get_json(http, f"{sim.url('a')}/alarms?min_id=1", token_a)
        assert [a["id"] for a in alarms] == [2]
        status, body = await get_json(http, f"{sim.url('b')}/alarms", token_a)
        assert (status, errorcode(body)) == (401, "keymanagement.service.invalid_access_token")
        async with http.get(f"{sim.url()}/t/nobody/alarms") as resp:
            assert resp.status == 404
        assert sites["a"].requests == {"POST /oauth/token": 1, "GET /alarms": 1}
        assert sites["b"].requests == {"GET /alarms": 1}
        sim.add_site("c", DavantisSite())
        assert (await login(http, sim.url("c")))["access_token"]


async def test_alarm_poll_faults(sim: DavantisSimulator, http: aiohttp.ClientSession) -> None:
    site = sim.site()
    site.add_alarm()
    token = await token_for(http, sim.url())
    url = f"{sim.url()}/alarms"
    site.fail_alarm_polls(2, status=502)
    site.malformed_alarm_polls(1)
    headers = {"Authorization": f"Bearer {token}"}
    statuses = []
    for _ in range(3):
        async with http.get(url, headers=headers) as resp:
            statuses.append(resp.status)
            last_body = await resp.read()
    assert statuses == [502, 502, 200]
    with pytest.raises(json.JSONDecodeError):
        json.loads(last_body)
    assert (await get_json(http, f"{sim.url()}/cameras", token))[0] == 200
    site.slow_alarm_polls(1, 0.2)
    timeout = aiohttp.ClientTimeout(total=0.1)
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(url, headers=headers, timeout=timeout):
            pass
    status, alarms = await get_json(http, url, token)
    assert (status, len(alarms)) == (200, 1)
    site.offline = True
    assert (await get_json(http, f"{sim.url()}/relays", token))[0] == 503
    async with http.post(f"{sim.url()}/oauth/token", data="grant_type=password") as resp:
        assert resp.status == 503
    assert site.requests["GET /alarms"] == 5


async def test_http_control_surface(http: aiohttp.ClientSession) -> None:
    async with DavantisSimulator({"default": DavantisSite(), "x": DavantisSite()}) as sim:
        control = f"{sim.url('x')}/_sim"
        alarm = {"count": 3, "event": 2, "camera": 2, "started": "2024-01-01T00:00:00Z"}
        async with http.post(f"{control}/alarms", json=alarm) as resp:
            assert await resp.json() == [1, 2, 3]
        async with http.post(f"{control}/alarms", json={"colour": "red"}) as resp:
            assert resp.status == 400
        async with http.post(f"{control}/faults", json={"offline": True}) as resp:
            assert resp.status == 200
        async with http.post(f"{sim.url('x')}/oauth/token", data="") as resp:
            assert resp.status == 503
        async with http.post(f"{control}/faults", json={"offline": False, "fail": 1}) as resp:
            assert (await resp.json())["faults"]["fail"] == 1
        token = await token_for(http, sim.url("x"))
        assert (await get_json(http, f"{sim.url('x')}/alarms", token))[0] == 500
        async with http.post(f"{control}/faults", json={"expire_tokens": True}) as resp:
            assert resp.status == 200
        status, body = await get_json(http, f"{sim.url('x')}/alarms", token)
        assert (status, errorcode(body)) == (401, "keymanagement.service.access_token_expired")
        async with http.get(f"{control}/state") as resp:
            state = await resp.json()
        assert (state["alarms"], state["last_id"], state["logins"]) == (3, 3, 1)
        assert state["requests"]["GET /alarms"] == 2
        assert sim.site().alarms == []


async def test_generator_feeds_every_site() -> None:
    sites = {name: DavantisSite() for name in ("default", "a", "b")}
    async with DavantisSimulator(sites) as sim:
        sim.start_generator(100.0, events=(3,), seed=7)
        await asyncio.sleep(0.3)
        await sim.stop_generator()
        counts = [len(site.alarms) for site in sites.values()]
        assert all(5 < count < 80 for count in counts), counts
        assert {alarm.event for site in sites.values() for alarm in site.alarms} == {3}
        for site in sites.values():
            ids = [alarm.id for alarm in site.alarms]
            assert ids == list(range(1, len(ids) + 1))


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.davantis",
        "--port",
        "0",
        "--sites",
        "2",
        "--rate",
        "1",
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
            assert (await login(http, lines[1]))["token_type"] == "bearer"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_max_alarms_keeps_the_newest_and_lookup_still_works() -> None:
    site = DavantisSite(max_alarms=100)
    site.add_alarms(250)
    assert 100 <= len(site.alarms) <= 111
    assert site.alarms[-1].id == 250
    assert site.alarm(250) is site.alarms[-1]
    assert site.alarm(1) is None


# ------------------------------------------------- switches for what the manual leaves open
async def _served(site: DavantisSite, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
    async with DavantisSimulator({"default": site}) as simulator:
        token = await token_for(http, simulator.url())
        return await get_json(http, f"{simulator.url()}{path}", token, **params)


async def test_answer_order_by_time_or_by_id(http: aiohttp.ClientSession) -> None:
    base = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    by_time, by_id = DavantisSite(order="time"), DavantisSite(order="id")
    for site in (by_time, by_id):
        site.add_alarm(started=base + timedelta(seconds=2))
        site.add_alarm(started=base)  # recorded later, started earlier
        site.add_alarm(started=base + timedelta(seconds=1))
    _, alarms = await _served(by_time, http, "/alarms")
    assert [a["id"] for a in alarms] == [1, 3, 2]  # the manual's note: by time
    _, alarms = await _served(by_id, http, "/alarms")
    assert [a["id"] for a in alarms] == [3, 2, 1]  # the polling sample's comment: by id


async def test_max_date_inclusive_exclusive_or_ignored(http: aiohttp.ClientSession) -> None:
    base = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    bound = {"max_date": base.isoformat()}
    for options, expected in (
        ({}, [2, 1]),
        ({"max_date_exclusive": True}, [1]),
        ({"ignore_max_date": True}, [3, 2, 1]),
    ):
        site = DavantisSite(**options)
        for offset in (-1, 0, 1):
            site.add_alarm(started=base + timedelta(seconds=offset))
        _, alarms = await _served(site, http, "/alarms", **bound)
        assert [a["id"] for a in alarms] == expected, options
    low = {"min_date": base.isoformat()}
    for options, expected in (
        ({}, [3, 2]),
        ({"min_date_exclusive": True}, [3]),
        # The switches combine: a device ignoring max_date still reads min_date its way.
        ({"min_date_exclusive": True, "ignore_max_date": True}, [3]),
    ):
        site = DavantisSite(**options)
        for offset in (-1, 0, 1):
            site.add_alarm(started=base + timedelta(seconds=offset))
        _, alarms = await _served(site, http, "/alarms", **low)
        assert [a["id"] for a in alarms] == expected, options


async def test_which_empty_answers_are_no_content(http: aiohttp.ClientSession) -> None:
    """The manual shows 204 for a `min_id` poll with nothing new; other empty answers are
    an empty list, or (no_content="always") 204 too."""
    for no_content, dated in (("min_id", 200), ("always", 204)):
        site = DavantisSite(no_content=no_content)
        status, _ = await _served(site, http, "/alarms", min_id="0")
        assert status == 204, no_content
        status, _ = await _served(site, http, "/alarms", min_date="2026-11-02T08:00:00Z")
        assert status == dated, no_content


async def test_offset_forms_local_times_and_languages(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(
        utc_offset="Europe/Madrid", time_zone="Europe/Madrid", local_times=True, language="de"
    )
    site.add_alarm(started=datetime(2026, 7, 1, 10, 0, tzinfo=UTC))
    site.set_input(1, False)
    _, installation = await _served(site, http, "/installation")
    assert installation["current_utc_offset"] == "Europe/Madrid"
    _, alarms = await _served(site, http, "/alarms")
    assert alarms[1]["started"] == "2026-07-01T12:00:00.000"  # local, no offset
    assert alarms[0]["description"] == "Unscharf"
    # A date filter without an offset is the installation's local time (the manual).
    _, found = await _served(site, http, "/alarms", max_date="2026-07-01T12:00:00")
    assert [a["id"] for a in found] == [1]


async def test_token_error_status_and_input_camera_links(http: aiohttp.ClientSession) -> None:
    site = DavantisSite(token_error_status=403, input_cameras="on_cameras", cameras=4)
    async with DavantisSimulator({"default": site}) as simulator:
        status, body = await get_json(http, f"{simulator.url()}/alarms", "stale-token")
        assert (status, errorcode(body)) == (403, "keymanagement.service.invalid_access_token")
    _, inputs = await _served(site, http, "/inputs")
    assert all("cameras" not in inp for inp in inputs)
    _, cameras = await _served(site, http, "/cameras")
    assert [cam["inputs"] for cam in cameras] == [[1], [1], [2], [2]]
    _, inputs = await _served(DavantisSite(input_cameras="none"), http, "/inputs")
    assert all("cameras" not in inp for inp in inputs)


async def test_factory_reset_starts_ids_again(http: aiohttp.ClientSession) -> None:
    site = DavantisSite()
    site.add_alarms(5)
    async with DavantisSimulator({"default": site}) as simulator:
        async with http.post(
            f"{simulator.url()}/_sim/faults", json={"factory_reset": True}
        ) as resp:
            assert resp.status == 200
        assert site.alarms == []
        assert site.add_alarm().id == 1


def test_switches_are_checked() -> None:
    with pytest.raises(ValueError, match="order"):
        DavantisSite(order="random")
    with pytest.raises(ValueError, match="language"):
        DavantisSite(language="xx")
    with pytest.raises(ValueError, match="input_cameras"):
        DavantisSite(input_cameras="sometimes")


@pytest.mark.parametrize("close", [False, True])
async def test_connections_kept_or_closed_after_each_answer(
    http: aiohttp.ClientSession, close: bool
) -> None:
    simulator = DavantisSimulator()
    simulator.close_connections = close
    async with simulator:
        for _ in range(2):  # and the next request is answered all the same
            async with http.get(f"{simulator.url()}/alarms") as resp:
                assert resp.status == 401  # any answer: the connection's fate is the point
                assert (resp.headers.get("Connection") == "close") is close
