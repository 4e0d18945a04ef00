"""The Videoloft simulator, exercised over real HTTP as the daemon will use it."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from yarl import URL

from cms_ingest.simulators.videoloft import (
    END_KEYS,
    FRAMINGS,
    TOKEN_PLACES,
    VideoloftAccount,
    VideoloftSimulator,
)

EMAIL, PASSWORD = "cms@example.com", "secret"
SECONDS_BELOW = 10**11  # a time below this is in seconds, not milliseconds


# ---------------------------------------------------------------- a small client
def make(**kw: Any) -> VideoloftSimulator:
    return VideoloftSimulator(VideoloftAccount(**kw))


def header(token: str) -> dict[str, str]:
    return {"Authorization": f"ManythingToken {token}"}


async def login(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """A password login: the token and the session cookie."""
    async with http.post(f"{base}/login", json={"email": EMAIL, "password": PASSWORD}) as resp:
        assert resp.status == 200
        body = await resp.json()
        return body["result"]["authToken"], resp.cookies["mt_session"].value


def token_fields(token: str) -> list[str]:
    encoded, star, signature = token.partition("*")
    assert star
    assert signature
    return base64.urlsafe_b64decode(encoded).decode().split(":")


async def get_json(
    http: aiohttp.ClientSession, url: str, bearer: str | None = None, **params: Any
) -> tuple[int, Any]:
    """GET with the token `bearer` where the manual puts it for that route."""
    headers = {}
    if bearer and TOKEN_PLACES.get(URL(url).path) == "query":
        params["token"] = bearer
    elif bearer:
        headers = header(bearer)
    async with http.get(url, params=params, headers=headers) as resp:
        return resp.status, await resp.json()


def as_ms(value: int | None) -> int | None:
    if value is None:
        return None
    return value * 1000 if value < SECONDS_BELOW else value


def normalise(item: dict[str, Any]) -> dict[str, Any]:
    """What the ingest client must make of any spelling of an alert item."""
    end_keys = [key for key in END_KEYS if key in item]
    id_keys = [key for key in ("alert", "id") if key in item]
    assert len(end_keys) == 1, item
    assert len(id_keys) == 1, item
    return {
        "id": item[id_keys[0]],
        "uidd": item["uid"],
        "start_ms": as_ms(item["startt"]),
        "end_ms": as_ms(item[end_keys[0]]),
        "seconds": item["startt"] < SECONDS_BELOW,
        "end_key": end_keys[0],
        "id_key": id_keys[0],
    }


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def parse_frames(buffer: bytes, framing: str) -> tuple[list[Any], bytes]:
    """The complete records at the front of ``buffer`` (strictly in ``framing``), and the rest."""
    records: list[Any] = []
    if framing == "sse":
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            assert block.startswith(b"data: "), block
            records.append(json.loads(block[len(b"data: ") :]))
    elif framing == "ndjson":
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            records.append(json.loads(line))
    else:
        decoder = json.JSONDecoder()
        text = buffer.decode()
        while text:
            assert text[0] == "{", text  # back to back, no separator
            try:
                record, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                break
            records.append(record)
            text = text[end:]
        buffer = text.encode()
    return records, buffer


async def read_records(
    resp: aiohttp.ClientResponse, framing: str, count: int
) -> tuple[list[Any], bytes]:
    raw = buffer = b""
    records: list[Any] = []
    while len(records) < count:
        chunk = await asyncio.wait_for(resp.content.readany(), 2)
        assert chunk, "the stream ended early"
        raw += chunk
        found, buffer = parse_frames(buffer + chunk, framing)
        records += found
    return records, raw


async def open_live(
    http: aiohttp.ClientSession, logger: str, token: str, *uidds: str
) -> aiohttp.ClientResponse:
    params = [("uidd", uidd) for uidd in uidds]
    return await http.get(f"{logger}/cameras/realtime/live", params=params, headers=header(token))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ------------------------------------------------------------------ logging in
async def test_login_forms_token_and_the_global_redirect(http: aiohttp.ClientSession) -> None:
    async with make(redirect=True) as sim:
        account = sim.account
        assert sim.url != sim.auth_url
        credentials = {"email": EMAIL.upper(), "password": PASSWORD}
        async with http.post(f"{sim.url}/login", json=credentials) as resp:
            assert resp.status == 200
            assert await resp.json() == {"location": account.auth_host}
        async with http.get(f"{sim.url}/login", params=credentials) as resp:
            assert await resp.json() == {"location": account.auth_host}
        status, body = await get_json(http, f"{sim.url}/login", email="x@y.z", password="p")
        assert (status, body) == (401, {"error": "Invalid email or password"})
        status, _ = await get_json(http, f"{sim.url}/devices")
        assert status == 404
        assert account.logins == 0

        regional = f"http://{account.auth_host}"
        assert regional == sim.auth_url
        before = int(time.time())
        async with http.post(f"{regional}/login", json=credentials) as resp:
            result = (await resp.json())["result"]
            assert resp.cookies["mt_session"].value
        assert result["uid"] == 12345
        assert result["authenticator"] == account.auth_host
        assert result["accountInfo"] == {"maxAge": 7, "type": "paid", "maxDevices": 100}
        assert abs(result["time"] - time.time() * 1000) < 5000
        uid, issued, ttl, zero = token_fields(result["authToken"])
        assert (uid, ttl, zero) == ("12345", "1200", "0")
        assert before <= int(issued) <= time.time()

        async with http.post(f"{regional}/login", data=credentials) as resp:
            assert resp.status == 200
        status, body = await get_json(http, f"{regional}/login", **credentials, caller="website")
        assert status == 200
        assert body["result"]["authToken"] != result["authToken"]
        status, body = await get_json(http, f"{regional}/login", email=EMAIL, password="nope")
        assert (status, body) == (401, {"error": "Invalid email or password"})
        assert account.logins == 3
        assert account.requests["global POST /login"] == 1
        assert account.requests["global GET /login"] == 2
        assert account.requests["auth POST /login"] == 2


async def test_cookie_login_expiry_and_revocation(http: aiohttp.ClientSession) -> None:
    async with make(token_ttl_s=0.4) as sim:
        account, auth = sim.account, sim.auth_url
        token, cookie = await login(http, auth)
        assert token_fields(token)[2] == "0"  # int(0.4)
        assert (await get_json(http, f"{auth}/devices", token))[0] == 200
        # The manual's header route refuses the token in the query.
        assert (await get_json(http, f"{auth}/devices", None, token=token))[0] == 401

        async def cookie_login(value: str | None) -> tuple[int, Any]:
            headers = {"Cookie": f"mt_session={value}"} if value else {}
            params = {"caller": "cookielogin"}
            async with http.get(f"{auth}/login", params=params, headers=headers) as resp:
                return resp.status, await resp.json()

        status, body = await cookie_login(cookie)
        assert status == 200
        fresh = body["result"]["authToken"]
        assert fresh != token
        assert account.cookie_logins == 1
        assert (await cookie_login("forged"))[0] == 401
        assert (await cookie_login(None))[0] == 401

        account.expire_tokens()
        for stale in (token, fresh):
            assert await get_json(http, f"{auth}/devices", stale) == (
                401,
                {"error": "Unauthorized"},
            )
        logger = sim.logger_url(0)
        status, _ = await get_json(http, f"{logger}/alert", None, uid="12345.1", token=fresh)
        assert status == 401
        status, body = await cookie_login(cookie)
        assert status == 200
        renewed = body["result"]["authToken"]
        assert (await get_json(http, f"{auth}/devices", renewed))[0] == 200

        account.revoke_all()
        assert (await get_json(http, f"{auth}/devices", renewed))[0] == 401
        assert (await cookie_login(cookie))[0] == 401
        token, _ = await login(http, auth)
        assert (await get_json(http, f"{auth}/devices", token))[0] == 200
        await asyncio.sleep(0.45)  # the token's own lifetime
        assert (await get_json(http, f"{auth}/devices", token))[0] == 401
        assert account.cookie_logins == 2


# -------------------------------------------------------------------- devices
async def test_devices_and_viewer_info_grouped_by_owner(http: aiohttp.ClientSession) -> None:
    async with VideoloftSimulator() as sim:
        auth = sim.auth_url
        token, _ = await login(http, auth)
        hosts = sim.logger_hosts
        assert len(hosts) == 2
        assert len(set(hosts)) == 2
        assert all(host.startswith("127.0.0.1:") for host in hosts)

        status, body = await get_json(http, f"{auth}/devices", token)
        assert status == 200
        result = body["result"]
        assert set(result) == {"12345", "40012"}
        assert result["12345"]["alias"] == "Customer 1"
        assert result["40012"]["alias"] == "Customer 2"
        assert result["12345"]["devices"]["1"] == {
            "uidd": "12345.1",
            "phonename": "Front door",
            "permissions": ["a"],
        }
        assert result["12345"]["devices"]["2"]["phonename"] == "Yard"
        assert result["40012"]["devices"]["7"]["permissions"] == ["r"]

        url = f"{auth}/devices/viewerInfo?uidd=12345.1&uidd=40012.7&uidd=99.1"
        async with http.get(url, headers=header(token)) as resp:
            body = await resp.json()
        assert body["errors"] == [{"99.1": "Unauthorized"}]
        door = body["result"]["12345"]["devices"]["1"]
        assert set(body["result"]["12345"]["devices"]) == {"1"}
        assert door["logger"] == hosts[0]
        assert door["cloudRecordingEnabled"] == 1
        assert door["streamname"].startswith("12345.1_")
        assert door["wowza"]
        assert body["result"]["40012"]["devices"]["7"]["logger"] == hosts[0]
        status, body = await get_json(http, f"{auth}/devices/viewerInfo", token, uidd="12345.2")
        assert status == 200
        assert body["result"]["12345"]["devices"]["2"]["logger"] == hosts[1]
        assert (await get_json(http, f"{auth}/devices/viewerInfo"))[0] == 401
        assert sim.account.requests["auth GET /devices/viewerInfo"] == 3


# --------------------------------------------------------------------- alerts
async def test_alert_paging_newest_first_with_field_variants(http: aiohttp.ClientSession) -> None:
    async with make(media_delay=0) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        first = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        made = [account.add_alert("12345.1", start=first + timedelta(seconds=i)) for i in range(12)]
        bumped = account.add_alert("12345.1", start=first)  # that second is taken
        ongoing = account.add_alert("12345.1", ended=False, type="audio", smx="03")
        old = account.add_alert("12345.1", start=datetime.now(UTC) - timedelta(days=3))
        assert [a.id for a in made] == [int(first.timestamp()) + i for i in range(12)]
        assert bumped.id == made[-1].id + 1
        assert [a.id for a in account.alerts["12345.1"]] == sorted(
            a.id for a in [*made, bumped, ongoing, old]
        )

        logger = sim.logger_url(0)
        seen: list[dict[str, Any]] = []
        offset = 0
        while True:
            status, body = await get_json(
                http,
                f"{logger}/alert",
                uid="12345.1",
                startt=1,
                offset=offset,
                limit=4,
                maxage=86_400_000,
                token=token,
            )
            assert status == 200
            if not body["result"]:
                break
            assert len(body["result"]) <= 4
            seen += [normalise(item) for item in body["result"]]
            offset += 4
        ids = [item["id"] for item in seen]
        assert ids == sorted((a.id for a in [*made, bumped, ongoing]), reverse=True)
        assert old.id not in ids  # older than maxage
        assert {item["end_key"] for item in seen} == set(END_KEYS)
        assert {item["id_key"] for item in seen} == {"alert", "id"}
        assert {item["seconds"] for item in seen} == {True, False}
        for item in seen:
            alert = account.alert("12345.1", item["id"])
            assert alert is not None
            assert item["uidd"] == "12345.1"
            scale = 1000 if item["seconds"] else 1
            assert item["start_ms"] == alert.start_ms // scale * scale
            if alert is ongoing:
                assert item["end_ms"] is None
            else:
                assert alert.end_ms is not None
                assert item["end_ms"] == alert.end_ms // scale * scale
        raw = ongoing.item()
        assert (raw["type"], raw["aud"], raw["smx"], raw["rom"], raw["deviceid"]) == (
            "audio",
            "03",
            None,
            1,
            1,
        )
        plain = made[0].item(variants=False)
        assert plain["id"] == made[0].id
        assert plain["endt"] == made[0].end_ms

        status, body = await get_json(http, f"{logger}/alert", token, uidd="12345.1", limit=100)
        assert status == 200
        assert len(body["result"]) == 15  # no maxage: everything
        status, body = await get_json(http, f"{logger}/alert", token, uid="12345.2")
        assert (status, body) == (404, {"error": "device not resident"})
        status, _ = await get_json(http, f"{logger}/alert", token, uid="999.1")
        assert status == 403
        assert account.requests["logger0 GET /alert"] == 8  # 4 pages, the empty one, 3 more


async def test_thumbs_are_late_then_jpeg(http: aiohttp.ClientSession) -> None:
    async with make(media_delay=0.3) as sim:
        token, _ = await login(http, sim.auth_url)
        alert = sim.account.add_alert("40012.7")
        thumb = f"{sim.logger_url(0)}/alertthumb/40012.7/{alert.id}"
        async with http.get(f"{thumb}/{token}") as resp:
            assert resp.status == 404
        await asyncio.sleep(max(0.0, alert.thumb_ready_at - time.monotonic()) + 0.02)
        async with http.get(f"{thumb}/{token}") as resp:
            assert resp.status == 200
            assert resp.content_type == "image/jpeg"
            assert (await resp.read()).startswith(b"\xff\xd8")
        async with http.get(f"{thumb}/not-a-token") as resp:
            assert resp.status == 401
        async with http.get(thumb, headers=header(token)) as resp:
            assert resp.status == 401  # the manual puts it in the path, nowhere else
        async with http.get(f"{sim.logger_url(0)}/alertthumb/40012.7/123/{token}") as resp:
            assert resp.status == 404
        async with http.get(f"{sim.logger_url(1)}/alertthumb/40012.7/{alert.id}/{token}") as r:
            assert r.status == 404
        assert sim.account.requests["logger0 GET /alertthumb"] == 5


async def test_mp4_only_after_the_end_and_the_tail(http: aiohttp.ClientSession) -> None:
    async with make(tail_s=0.3) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        alert = account.add_alert("12345.2", ended=False)
        logger = sim.logger_url(1)

        async def video(build: int) -> aiohttp.ClientResponse:
            params: dict[str, str | int] = {
                "uid": "12345.2",
                "startt": alert.start_ms // 1000,
                "endt": (alert.end_ms or alert.start_ms) // 1000,
                "rom": 1,
                "id": alert.id,
                "buildmp4": build,
                "token": token,
            }
            resp = await http.get(f"{logger}/alerturl.m3u8", params=params)
            await resp.read()
            return resp

        resp = await video(1)
        assert (resp.status, await resp.json()) == (404, {"error": "video not ready"})
        playlist = await video(0)
        assert (await playlist.text()).startswith("#EXTM3U")
        assert "#EXT-X-ENDLIST" not in await playlist.text()
        account.end_alert(alert)
        assert alert.end_ms is not None
        assert (await video(1)).status == 404  # the camera is still recording its tail
        await asyncio.sleep(0.35)
        resp = await video(1)
        assert resp.status == 200
        assert resp.content_type == "video/mp4"
        assert (await resp.read())[4:8] == b"ftyp"
        assert "#EXT-X-ENDLIST" in await (await video(0)).text()

        past = account.add_alert("12345.2", start=datetime.now(UTC) - timedelta(minutes=5))
        assert past.mp4_ready()
        assert not account.add_alert("12345.2").mp4_ready()  # ends 5 s from now


# ---------------------------------------------------------------- camera tasks
async def test_triggerevent_creates_extends_and_ends_an_alert(http: aiohttp.ClientSession) -> None:
    async with make(tail_s=0.4) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        logger = sim.logger_url(0)

        async def task(uidd: str, action: str) -> tuple[int, Any]:
            return await get_json(
                http, f"{logger}/sendcameratask", None, uid=uidd, action=action, token=token
            )

        assert await task("12345.1", "triggerevent") == (
            200,
            {"result": "request sent to camera"},
        )
        [alert] = account.alerts["12345.1"]
        assert alert.triggered
        assert alert.end_ms is None
        await asyncio.sleep(0.2)
        await task("12345.1", "triggerevent")
        last_call = time.time()
        await asyncio.sleep(0.25)  # 0.45 s after the first call, 0.25 s after the last
        assert account.alerts["12345.1"] == [alert]
        assert alert.end_ms is None
        await asyncio.sleep(0.3)
        assert alert.end_ms is not None
        assert abs(alert.end_ms / 1000 - last_call) < 0.1
        assert alert.mp4_ready()
        await task("12345.1", "triggerevent")
        assert len(account.alerts["12345.1"]) == 2
        assert account.alerts["12345.1"][-1].end_ms is None

        assert (await task("12345.1", "capturethumb"))[0] == 200
        status, body = await get_json(http, f"{logger}/cameras/status", token, uidd="12345.1")
        assert status == 200
        device = body["result"]["12345"]["devices"]["1"]
        assert device["uid"] == "12345.1"
        assert abs(device["lastthumb"] - time.time()) < 5
        assert device["status"] == "live"
        assert device["lastalert"] == account.alerts["12345.1"][-1].start_ms // 1000
        assert [(uidd, action) for uidd, action, _ in account.tasks] == [
            ("12345.1", "triggerevent"),
            ("12345.1", "triggerevent"),
            ("12345.1", "triggerevent"),
            ("12345.1", "capturethumb"),
        ]
        assert all(abs(at - time.monotonic()) < 5 for _, _, at in account.tasks)
        assert (await task("12345.1", "selfdestruct"))[0] == 400
        assert await task("12345.2", "capturethumb") == (404, {"error": "device not resident"})
        assert len(account.tasks) == 4


# ------------------------------------------------------------------- realtime
@pytest.mark.parametrize("framing", FRAMINGS)
async def test_realtime_delivers_alerts_and_live_sessions(
    http: aiohttp.ClientSession, framing: str
) -> None:
    async with make(framing=framing) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        before = account.add_alert("12345.1")  # history is not replayed
        resp = await open_live(http, sim.logger_url(0), token, "12345.1", "40012.7")
        try:
            assert resp.status == 200
            assert account.open_live == 1
            alert = account.add_alert("12345.1", smx="0a")
            account.add_alert("12345.2")  # another logger's device: not on this stream
            account.set_status("40012.7", "offline")
            records, raw = await read_records(resp, framing, 2)
        finally:
            resp.close()
        assert records[0]["type"] == "alert"
        item = normalise(records[0]["data"])
        assert item["id"] == alert.id != before.id
        assert item["uidd"] == "12345.1"
        assert records[0]["data"]["smx"] == "0a"
        assert records[1]["type"] == "liveSession"
        session = records[1]["data"]
        assert (session["uidd"], session["status"], session["live"]) == (
            "40012.7",
            "offline",
            False,
        )
        assert abs(session["lastactivity"] - time.time() * 1000) < 5000
        if framing == "sse":
            assert raw.startswith(b"data: {")
            assert raw.count(b"\n\n") == 2
        elif framing == "ndjson":
            assert raw.count(b"\n") == 2
            assert raw.endswith(b"}\n")
        else:
            assert b"}{" in raw
            assert b"\n" not in raw
        await wait_until(lambda: account.open_live == 0)
        assert account.live_connections == 1


async def test_realtime_ends_cleanly_after_live_max(http: aiohttp.ClientSession) -> None:
    async with make(live_max_s=0.3) as sim:
        token, _ = await login(http, sim.auth_url)
        started = time.monotonic()
        async with await open_live(http, sim.logger_url(1), token) as resp:  # all resident
            assert resp.status == 200
            assert await asyncio.wait_for(resp.read(), 2) == b""  # a clean end: no error
        assert time.monotonic() - started >= 0.25
        await wait_until(lambda: sim.account.open_live == 0)


async def test_dropped_and_abandoned_streams(http: aiohttp.ClientSession) -> None:
    async with VideoloftSimulator() as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        resp = await open_live(http, sim.logger_url(0), token, "12345.1")
        assert account.open_live == 1
        account.drop_live_connections()
        assert account.open_live == 0
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(resp.read(), 2)
        resp.close()

        resp = await open_live(http, sim.logger_url(0), token, "12345.1")
        async with http.post(f"{sim.auth_url}/_sim/faults", json={"drop_live": True}) as ctl:
            assert (await ctl.json())["open_live"] == 0
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(resp.read(), 2)
        resp.close()

        resp = await open_live(http, sim.logger_url(0), token, "12345.1")
        assert account.open_live == 1
        resp.close()  # the client goes away
        await wait_until(lambda: account.open_live == 0)
        assert account.live_connections == 3
        assert (await open_live(http, sim.logger_url(0), "bad", "12345.1")).status == 401


@pytest.mark.parametrize("param", ["uid", "uidd"])
async def test_camera_status_reads_its_devices_from_one_parameter(
    param: str, http: aiohttp.ClientSession
) -> None:
    """The manual names `uid=`, working clients send `uidd=`: with `status_param` the logger
    reads only one; a device named by the other is not named at all (every resident one)."""
    other = "uidd" if param == "uid" else "uid"
    async with make(status_param=param) as sim:
        token, _ = await login(http, sim.auth_url)
        logger = sim.logger_url(0)
        resident = {u for u, d in sim.account.devices.items() if d.logger == 0}
        assert len(resident) > 1

        def listed(body: Any) -> set[str]:
            owners = body["result"].values()
            return {d["uid"] for owner in owners for d in owner["devices"].values()}

        one = sorted(resident)[0]
        status, body = await get_json(http, f"{logger}/cameras/status", token, **{param: one})
        assert (status, listed(body)) == (200, {one})
        status, body = await get_json(http, f"{logger}/cameras/status", token, **{other: one})
        assert (status, listed(body)) == (200, resident)
    with pytest.raises(ValueError, match="status_param"):
        VideoloftAccount(status_param="uuid")


async def test_move_device_to_another_logger(http: aiohttp.ClientSession) -> None:
    async with make(framing="ndjson") as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        old, new = sim.logger_url(0), sim.logger_url(1)
        resp = await open_live(http, old, token, "12345.1", "40012.7")
        account.move_device("12345.1", 1)

        status, body = await get_json(
            http, f"{sim.auth_url}/devices/viewerInfo", token, uidd="12345.1"
        )
        assert status == 200
        assert body["result"]["12345"]["devices"]["1"]["logger"] == sim.logger_hosts[1]
        status, body = await get_json(http, f"{old}/alert", token, uid="12345.1")
        assert (status, body) == (404, {"error": "device not resident"})
        assert (await get_json(http, f"{new}/alert", token, uid="12345.1"))[0] == 200
        url = f"{old}/cameras/status?uidd=12345.1&uidd=40012.7"
        async with http.get(url, headers=header(token)) as status_resp:
            body = await status_resp.json()
        assert body["errors"] == [{"12345.1": "device not resident"}]
        assert body["result"]["40012"]["devices"]["7"]["uid"] == "40012.7"
        assert "12345" not in body["result"]

        moved_resp = await open_live(http, new, token, "12345.1")
        try:
            moved = account.add_alert("12345.1")
            stayed = account.add_alert("40012.7")
            [record], _ = await read_records(resp, "ndjson", 1)
            assert normalise(record["data"])["id"] == stayed.id  # not the moved device's
            [record], _ = await read_records(moved_resp, "ndjson", 1)
            assert normalise(record["data"])["id"] == moved.id
        finally:
            resp.close()
            moved_resp.close()
        refused = await open_live(http, old, token, "12345.1")
        assert refused.status == 404
        assert (await refused.json())["errors"] == [{"12345.1": "device not resident"}]


# ------------------------------------------------------------ control and CLI
async def test_http_control_surface(http: aiohttp.ClientSession) -> None:
    async with VideoloftSimulator() as sim:
        control = f"{sim.auth_url}/_sim"
        body = {"uidd": "12345.2", "count": 2, "type": "audio", "ended": False}
        async with http.post(f"{control}/alerts", json=body) as resp:
            ids = await resp.json()
        assert ids == [a.id for a in sim.account.alerts["12345.2"]]
        assert len(ids) == 2
        assert {(a.type, a.end_ms) for a in sim.account.alerts["12345.2"]} == {("audio", None)}
        async with http.post(f"{control}/alerts", json={"colour": "red"}) as resp:
            assert resp.status == 400
        faults = {
            "move": {"uidd": "12345.2", "logger": 0},
            "status": {"uidd": "12345.1", "status": "novideo"},
            "framing": "concat",
            "expire_tokens": True,
        }
        async with http.post(f"{control}/faults", json=faults) as resp:
            state = await resp.json()
        assert state["devices"]["12345.2"] == {"logger": 0, "status": "live"}
        assert state["devices"]["12345.1"]["status"] == "novideo"
        assert state["framing"] == "concat"
        for bad in ({"framing": "xml"}, {"move": {"uidd": "12345.2", "logger": 5}}, {"x": 1}):
            async with http.post(f"{control}/faults", json=bad) as resp:
                assert resp.status == 400
        async with http.get(f"{control}/state") as resp:
            state = await resp.json()
        assert state["alerts"]["12345.2"] == 2
        assert state["logger_hosts"] == sim.logger_hosts


async def test_generator_adds_ended_alerts() -> None:
    async with VideoloftSimulator() as sim:
        sim.start_generator(60.0, seed=3)
        await asyncio.sleep(0.3)
        await sim.stop_generator()
    alerts = [a for found in sim.account.alerts.values() for a in found]
    assert len(alerts) >= 3
    assert all(a.end_ms is not None for a in alerts)
    assert {a.type for a in alerts} <= {"motion", "audio"}


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.videoloft",
        "--port",
        "0",
        "--rate",
        "1",
        "--framing",
        "ndjson",
        "--redirect",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines = [
            (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip() for _ in range(2)
        ]
        assert lines[0].startswith("http://127.0.0.1:")
        assert lines[1] == "READY"
        async with aiohttp.ClientSession() as http:
            credentials = {"email": EMAIL, "password": PASSWORD}
            async with http.post(f"{lines[0]}/login", json=credentials) as resp:
                location = (await resp.json())["location"]
            async with http.get(f"http://{location}/_sim/state") as resp:
                state = await resp.json()
        assert state["framing"] == "ndjson"
        assert len(state["logger_hosts"]) == 2
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# ------------------------------------------------------------- the manual's details
PLACES = ("header", "query", "path")


async def fetch_status(http: aiohttp.ClientSession, url: str, token: str, place: str) -> int:
    """The status of a GET of `url` with the token in `place` (a path ends with /TOKEN)."""
    if place == "path":
        url = f"{url}/{token}"
    async with http.get(
        url,
        params={"token": token} if place == "query" else None,
        headers=header(token) if place == "header" else None,
    ) as resp:
        return resp.status


@pytest.mark.parametrize("anywhere", [False, True])
async def test_the_token_is_read_only_where_the_manual_puts_it(
    anywhere: bool, http: aiohttp.ClientSession
) -> None:
    async with make(media_delay=0, tail_s=0, token_anywhere=anywhere) as sim:
        token, _ = await login(http, sim.auth_url)
        alert = sim.account.add_alert("12345.1")
        sim.account.send_task("12345.1", "capturethumb", 0)
        thumb_time = sim.account.devices["12345.1"].last_thumb
        logger, auth = sim.logger_url(0), sim.auth_url
        routes = {
            f"{auth}/devices": "header",
            f"{auth}/devices/viewerInfo?uidd=12345.1": "header",
            f"{logger}/cameras/status?uidd=12345.1": "header",
            f"{logger}/alert?uid=12345.1": "query",
            f"{logger}/sendcameratask?uid=12345.1&action=livecommand": "query",
            f"{logger}/alerturl.m3u8?uid=12345.1&id={alert.id}&buildmp4=0": "query",
            f"{logger}/alertthumb/12345.1/{alert.id}": "path",
            f"{logger}/getthumb/12345.1/{thumb_time}": "path",
        }
        for url, documented in routes.items():
            for place in PLACES:
                if (place == "path") != (documented == "path") and "/getthumb/" in url:
                    continue  # no such route (only /alertthumb has a tokenless form)
                if place == "path" and documented != "path":
                    continue
                status = await fetch_status(http, url, token, place)
                accepted = place == documented or anywhere
                assert (status == 200) == accepted, (url, place, status)
                assert status in (200, 401), (url, place, status)


@pytest.mark.parametrize("answer_first", [False, True])
async def test_a_stream_is_answered_once_registered(
    answer_first: bool, http: aiohttp.ClientSession
) -> None:
    """By default the answer (headers) comes once the logger registered the connection;
    with live_answer_first at once, and nothing from before the registration is sent."""
    delay = (0.4, 0.4)
    async with make(
        live_connect_delay=delay, live_answer_first=answer_first, field_variants=False
    ) as sim:
        token, _ = await login(http, sim.auth_url)
        started = time.monotonic()
        resp = await open_live(http, sim.logger_url(0), token, "12345.1")
        try:
            answered = time.monotonic() - started
            if answer_first:
                assert answered < 0.3 and sim.account.open_live == 0
                sim.account.add_alert("12345.1")  # before the registration: never sent
                await wait_until(lambda: sim.account.open_live == 1)
            else:
                assert answered >= 0.35  # headers only after the registration
            assert sim.account.open_live == 1
            alert = sim.account.add_alert("12345.1")
            records, _ = await read_records(resp, "sse", 1)
            assert records[0]["data"]["id"] == alert.id
        finally:
            resp.close()


async def test_rom_extended_alerts_and_captured_thumbs(http: aiohttp.ClientSession) -> None:
    async with make(media_delay=0, tail_s=0, continuous=["12345.1"], field_variants=False) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        logger = sim.logger_url(0)
        alert = account.add_alert("12345.1", duration_s=1.0)
        first_end = alert.end_ms
        assert first_end is not None
        account.extend_alert(alert, 3.0)
        _, body = await get_json(http, f"{logger}/alert", token, uid="12345.1")
        assert body["result"][0]["rom"] == 0 and body["result"][0]["endt"] == first_end + 3000
        await asyncio.sleep(max(0.0, (alert.mp4_ready_at or 0) - time.monotonic()) + 0.02)
        for rom, expected in (("1", 404), ("0", 200)):
            params = {"uid": "12345.1", "id": str(alert.id), "buildmp4": "1", "rom": rom}
            async with http.get(f"{logger}/alerturl.m3u8", params={**params, "token": token}) as r:
                assert r.status == expected
        assert [r["rom"] for r in account.mp4_requests] == ["1", "0"]
        assert all("token" not in r for r in account.mp4_requests)
        account.send_task("12345.1", "capturethumb", 0)
        taken = account.devices["12345.1"].last_thumb
        async with http.get(f"{logger}/getthumb/12345.1/{taken}/{token}") as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"\xff\xd8")
        async with http.get(f"{logger}/getthumb/12345.1/{(taken or 0) - 1}/{token}") as resp:
            assert resp.status == 404


@pytest.mark.parametrize("mode", ["alert", "status", "fixed"])
async def test_lastactivity_modes(mode: str, http: aiohttp.ClientSession) -> None:
    async with make(lastactivity=mode) as sim:
        account = sim.account
        device = account.devices["12345.2"]
        before = device.last_activity_ms
        await asyncio.sleep(0.01)
        account.set_status("12345.2", "offline")
        after_status = device.last_activity_ms
        account.add_alert("12345.2")
        after_alert = device.last_activity_ms
    if mode == "fixed":
        assert before == after_status == after_alert == 1520250794022  # the manual's sample
    elif mode == "alert":
        assert before == after_status < after_alert
    else:
        assert before < after_status <= after_alert


async def test_hostile_hooks(http: aiohttp.ClientSession) -> None:
    async with make(media_delay=0, ignore_alert_offset=True) as sim:
        account = sim.account
        token, _ = await login(http, sim.auth_url)
        logger = sim.logger_url(0)
        added = [account.add_alert("12345.1") for _ in range(3)]
        pages = [
            (await get_json(http, f"{logger}/alert", token, uid="12345.1", offset=o, limit=2))[1]
            for o in (0, 2)
        ]
        assert pages[0] == pages[1] and len(pages[0]["result"]) == 2  # offset ignored
        account.refused_paths.add("/alert")
        assert (await get_json(http, f"{logger}/alert", token, uid="12345.1"))[0] == 401
        account.unallocate("40012.7")
        _, info = await get_json(http, f"{sim.auth_url}/devices/viewerInfo", token)
        assert info["result"]["40012"]["devices"]["7"]["logger"] is None
        resp = await open_live(http, logger, token, "12345.1")
        try:
            await wait_until(lambda: account.open_live == 1)
            account.push_raw("12345.1", b'{"not closed')
            chunk = await asyncio.wait_for(resp.content.readany(), 2)
            assert chunk == b'{"not closed'
        finally:
            resp.close()
        account.set_logger_hanging(1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await get_json(http, f"{sim.logger_url(1)}/alert", token, uid="12345.2")
        account.set_logger_hanging(1, False)
        assert len(added) == 3
