"""The CamTrace simulator, exercised over real HTTP as the daemon will use it."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import bcrypt
import pytest
from yarl import URL

from cms_ingest.simulators.camtrace import (
    DEFAULT_SALT,
    CamTraceSimulator,
    CamTraceSite,
    iso_z,
    wsse_digest,
)
from cms_ingest.simulators.davantis import snapshot_jpeg
from tests.conftest import eventually

API = "/api/v1.2"
LINK_RE = re.compile(r'^<(//[^>]+)>; rel="next"$')


# ---------------------------------------------------------------- a small client
@functools.cache
def bcrypt_hash(password: str, salt: str) -> str:
    return bcrypt.hashpw(password.encode(), salt.encode()).decode()


def md5_hex(password: str) -> str:
    return hashlib.md5(password.encode()).hexdigest()


def digest_of(nonce: str, created: str, hashed: str) -> str:
    """The WSSE formula written out again, independently of the simulator's."""
    return base64.b64encode(hashlib.sha1((nonce + created + hashed).encode()).digest()).decode()


def created_at(offset_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def wsse(
    hashed: str,
    *,
    username: str = "cms",
    offset_s: float = 0.0,
    created: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    nonce = nonce or secrets.token_hex(16)
    created = created or created_at(offset_s)
    digest = digest_of(nonce, created, hashed)
    return {
        "Authorization": 'WSSE profile="UsernameToken"',
        "X-WSSE": (
            f'UsernameToken Username="{username}", PasswordDigest="{digest}", '
            f'Nonce="{nonce}", Created="{created}"'
        ),
    }


def basic(username: str = "cms", password: str = "secret") -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    }


async def get(
    http: aiohttp.ClientSession,
    url: str | URL,
    headers: Mapping[str, str] | None = None,
    **params: str,
) -> tuple[int, Any, Mapping[str, str]]:
    async with http.get(url, headers=headers, params=params or None) as resp:
        raw = await resp.read()
        body: Any = json.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, body, resp.headers


async def auth_methods(http: aiohttp.ClientSession, base: str, user: str = "cms") -> list[Any]:
    status, body, _ = await get(http, f"{base}{API}/users/{user}/auth")
    assert status == 200
    return list(body["auth"])


async def hashed_for(http: aiohttp.ClientSession, base: str, password: str = "secret") -> str:
    """What a client does: ask for the salt, then bcrypt (or MD5 without a salt)."""
    for method in await auth_methods(http, base):
        if method["type"] == "wsse" and method.get("salt"):
            return bcrypt_hash(password, method["salt"])
    return md5_hex(password)


async def aget(
    http: aiohttp.ClientSession, base: str, path: str, hashed: str, **params: str
) -> tuple[int, Any, Mapping[str, str]]:
    return await get(http, f"{base}{path}", wsse(hashed), **params)


def ids(body: Any) -> list[int]:
    return [alarm["id"] for alarm in body["alarms"]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[CamTraceSimulator]:
    async with CamTraceSimulator() as simulator:
        yield simulator


# ------------------------------------------------------------------ the digest
def test_wsse_digest_public_vector() -> None:
    nonce, created = "d36e316282959a9ed4c89851497a717f", "2003-12-15T14:43:07Z"
    assert wsse_digest(nonce, created, "taadtaadpstcsm") == "quR/EWLAV4xLf9Zqyw4pDmfV9OY="
    hashed = bcrypt_hash("demo", DEFAULT_SALT)
    assert len(hashed) == 60
    assert hashed.startswith(DEFAULT_SALT)
    assert wsse_digest("n0nce/+=", created, hashed) == digest_of("n0nce/+=", created, hashed)


# ------------------------------------------------------------- authentication
async def test_authentication_methods_list(http: aiohttp.ClientSession) -> None:
    sites = {
        "default": CamTraceSite(),
        "nosalt": CamTraceSite(salt=None, allow_basic=False),
    }
    async with CamTraceSimulator(sites) as sim:
        assert await auth_methods(http, sim.url()) == [
            {"type": "wsse", "salt": DEFAULT_SALT},
            {"type": "wsse"},
            {"type": "basic"},
        ]
        assert await auth_methods(http, sim.url("nosalt")) == [{"type": "wsse"}]
        # An unknown user gets an answer too, which tells nothing about who exists.
        assert await auth_methods(http, sim.url(), "mallory") == [{"type": "wsse"}]
        status, body, _ = await get(http, f"{sim.url()}/ap1/v1.2/users/cms/auth")
        assert status == 200
        assert body["auth"][0]["salt"] == DEFAULT_SALT


async def test_wsse_with_bcrypt_salt_is_accepted(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    hashed = await hashed_for(http, sim.url())
    assert hashed.startswith("$2y$10$")
    assert len(hashed) == 60
    status, body, _ = await aget(http, sim.url(), f"{API}/cameras", hashed)
    assert status == 200
    assert [cam["id"] for cam in body["cameras"]] == [1, 2, 3, 4]
    # A live state (manual: "True if the camera is recording an alarm"): no alarm, no.
    assert all(cam["isRecordingAlarm"] is False and cam["name"] for cam in body["cameras"])
    status, body, _ = await aget(http, sim.url(), f"{API}/cameras/2", hashed)
    assert (status, body["id"], body["status"]) == (200, 2, 2)
    status, body, _ = await aget(http, sim.url(), f"{API}/cameras/9", hashed)
    assert status == 404
    assert "9" in body["error"]
    # A salted account takes the bcrypt hash only, not the MD5 one.
    status, body, headers = await aget(http, sim.url(), f"{API}/cameras", md5_hex("secret"))
    assert status == 401
    assert body["error"] == "Invalid credentials"
    assert headers["WWW-Authenticate"].startswith("WSSE")
    assert sim.site().auth_failures == 1
    assert "PasswordDigest" in sim.site().last_auth_error


async def test_md5_when_the_account_has_no_salt(http: aiohttp.ClientSession) -> None:
    async with CamTraceSimulator({"default": CamTraceSite(salt=None)}) as sim:
        hashed = await hashed_for(http, sim.url())
        assert hashed == md5_hex("secret")
        status, _, _ = await aget(http, sim.url(), f"{API}/cameras", hashed)
        assert status == 200
        # Parsed tolerantly: other order, no spaces after commas, lower-case scheme.
        nonce, created = secrets.token_hex(8), created_at()
        digest = digest_of(nonce, created, hashed)
        token = (
            f'UsernameToken Nonce="{nonce}",Created="{created}",'
            f'  Username="cms",PasswordDigest="{digest}"'
        )
        headers = {"authorization": 'wsse profile="UsernameToken"', "x-wsse": token}
        status, _, _ = await get(http, f"{sim.url()}{API}/cameras", headers)
        assert status == 200


async def test_wsse_and_basic_in_the_url(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    hashed = await hashed_for(http, sim.url())
    nonce, created = "LquMOTwiov5/LoKzy3Ru0bpTWvM=", created_at()
    params = {
        "_username": "cms",
        "_password": digest_of(nonce, created, hashed),
        "_nonce": nonce,
        "_created_at": created,
    }
    status, _, _ = await get(http, f"{sim.url()}{API}/cameras", None, **params)
    assert status == 200
    # A `+` sent without percent-encoding arrives as a space: it is put back.
    nonce, created = "n+1", created_at()
    raw = (
        f"{sim.url()}{API}/cameras?_username=cms&_nonce={nonce}&_created_at={created}"
        f"&_password={quote(digest_of(nonce, created, hashed), safe='')}"
    )
    status, _, _ = await get(http, URL(raw, encoded=True))
    assert status == 200
    status, _, _ = await get(http, f"{sim.url()}{API}/cameras", _username="cms", _password="secret")
    assert status == 200
    status, _, _ = await get(http, f"{sim.url()}{API}/cameras", _username="cms", _password="nope")
    assert status == 401


async def test_stale_created_is_refused_until_the_client_uses_the_server_clock(
    http: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(clock_offset_s=30.0)  # the server runs 30 s ahead of us
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        status, body, headers = await aget(http, sim.url(), f"{API}/cameras", hashed)
        assert status == 401
        assert "time window" in body["error"]
        assert "stale" in site.last_auth_error.lower()
        assert site.auth_failures == 1
        real_now = datetime.now(UTC)
        assert 28 <= (parsedate_to_datetime(headers["Date"]) - real_now).total_seconds() <= 32
        # Measure the server's clock as the manual says, then write Created in it.
        status, body, headers = await get(http, f"{sim.url()}{API}/getservertime")
        assert status == 200
        assert body["serverTime"]["timezone"] == "Europe/Paris"
        offset = body["serverTime"]["timestamp"] - datetime.now(UTC).timestamp()
        assert 28 <= offset <= 32
        assert 28 <= (parsedate_to_datetime(headers["Date"]) - real_now).total_seconds() <= 32
        status, _, _ = await get(http, f"{sim.url()}{API}/cameras", wsse(hashed, offset_s=offset))
        assert status == 200
        # Too far the other way is refused as well.
        created = created_at(offset - 11)
        status, _, _ = await get(http, f"{sim.url()}{API}/cameras", wsse(hashed, created=created))
        assert status == 401
        assert site.auth_failures == 2


async def test_replays_and_bad_tokens_are_refused(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    hashed = await hashed_for(http, sim.url())
    url = f"{sim.url()}{API}/cameras"
    token = wsse(hashed)
    assert (await get(http, url, token))[0] == 200
    status, body, _ = await get(http, url, token)  # the very same token again
    assert status == 401
    assert "replay" in body["error"]
    status, _, _ = await get(http, url, wsse(bcrypt_hash("wrong", DEFAULT_SALT)))
    assert status == 401
    status, _, _ = await get(http, url, wsse(hashed, username="mallory"))
    assert status == 401
    assert "unknown user" in sim.site().last_auth_error
    status, body, _ = await get(http, url, wsse(hashed, created="yesterday"))
    assert status == 401
    assert "Created" in body["error"]
    status, body, headers = await get(http, url)
    assert status == 401
    assert body == {"error": "Authentication required"}
    assert "WWW-Authenticate" in headers
    status, _, _ = await get(http, url, {"Authorization": 'WSSE profile="UsernameToken"'})
    assert status == 401
    assert sim.site().auth_failures == 6


async def test_expire_all_digests_refuses_the_next_request_once(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    hashed = await hashed_for(http, sim.url())
    path = f"{API}/cameras"
    assert (await aget(http, sim.url(), path, hashed))[0] == 200
    sim.site().expire_all_digests()
    status, body, _ = await aget(http, sim.url(), path, hashed)
    assert status == 401
    assert "stale" in body["error"]
    assert (await aget(http, sim.url(), path, hashed))[0] == 200  # a fresh digest: accepted


async def test_basic_authentication(http: aiohttp.ClientSession) -> None:
    sites = {"default": CamTraceSite(), "strict": CamTraceSite(allow_basic=False)}
    async with CamTraceSimulator(sites) as sim:
        assert (await get(http, f"{sim.url()}{API}/cameras", basic()))[0] == 200
        assert (await get(http, f"{sim.url()}{API}/cameras", basic(password="x")))[0] == 401
        assert (await get(http, f"{sim.url()}{API}/cameras", {"Authorization": "Basic %%"}))[
            0
        ] == 401
        status, body, _ = await get(http, f"{sim.url('strict')}{API}/cameras", basic())
        assert status == 401
        assert "not allowed" in body["error"]
        # WSSE still works on that site.
        hashed = await hashed_for(http, sim.url("strict"))
        assert (await aget(http, sim.url("strict"), f"{API}/cameras", hashed))[0] == 200


# ---------------------------------------------------------------------- alarms
async def test_paging_follows_a_protocol_relative_link(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite()
    site.add_alarms(45, recording=False)
    async with CamTraceSimulator({"x": site}) as sim:
        base = sim.url("x")
        hashed = await hashed_for(http, base)
        status, body, headers = await aget(
            http,
            base,
            f"{API}/cameras/alarms",
            hashed,
            limit="20",
            **{"from": "2000-01-01T00:00:00Z"},
        )
        assert status == 200
        assert ids(body) == list(range(45, 25, -1))
        match = LINK_RE.match(headers["Link"])
        assert match, headers["Link"]
        link = match.group(1)
        host = base.removeprefix("http:").removesuffix("/t/x")
        assert link.startswith(f"{host}/t/x{API}/cameras/alarms?limit=20&offset=20&")
        assert "from=2000-01-01T00:00:00Z" in link
        pages = [ids(body)]
        while link:
            status, body, headers = await get(http, "http:" + link, wsse(hashed))
            assert status == 200
            pages.append(ids(body))
            following = LINK_RE.match(headers.get("Link", ""))
            link = following.group(1) if following else ""
        assert pages[1:] == [list(range(25, 5, -1)), list(range(5, 0, -1))]
        # Defaults: 20 newest; limit capped at 500; nothing past the end.
        assert len(ids((await aget(http, base, f"{API}/cameras/alarms", hashed))[1])) == 20
        status, body, headers = await aget(http, base, f"{API}/cameras/alarms", hashed, limit="900")
        assert (len(body["alarms"]), "Link" in headers) == (45, False)
        status, body, _ = await aget(http, base, f"{API}/cameras/alarms", hashed, offset="60")
        assert (status, body) == (200, {"alarms": []})
        status, body, _ = await aget(http, base, f"{API}/cameras/alarms", hashed, limit="0")
        assert status == 400
        assert "limit" in body["error"]
    assert site.requests[f"GET {API}/cameras/alarms"] == 7


async def test_alarms_arriving_while_paging_shift_the_pages(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    site = sim.site()
    site.add_alarms(30, recording=False)
    site.inject_on_page_request(1, 3, camera=2)
    hashed = await hashed_for(http, sim.url())
    path = f"{API}/cameras/alarms"
    _, first, _ = await aget(http, sim.url(), path, hashed, limit="10", offset="0")
    assert ids(first) == list(range(30, 20, -1))
    assert len(site.alarms) == 30
    _, second, _ = await aget(http, sim.url(), path, hashed, limit="10", offset="10")
    assert len(site.alarms) == 33  # added before the second page was answered
    assert ids(second) == list(range(23, 13, -1))  # 23..21 again: shifted by three
    assert site.alarms[-1].camera_id == 2
    _, third, _ = await aget(http, sim.url(), path, hashed, limit="10", offset="20")
    assert ids(third) == list(range(13, 3, -1))  # the injection fired once only


async def test_time_text_and_camera_filters(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite()
    t0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    for minute in range(6):
        site.add_alarm(
            camera=1 + minute % 2,
            time=t0 + timedelta(minutes=minute),
            description="VIDEO LOSS Alarm" if minute == 4 else "MOTION Alarm",
            recording=minute != 3,
        )
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        path = f"{API}/cameras/alarms"
        window = {"from": "2026-11-21T10:01:00Z", "to": "2026-11-21T10:03:00Z"}  # inclusive
        _, body, _ = await aget(http, sim.url(), path, hashed, **window)
        assert ids(body) == [4, 3, 2]
        alarm = body["alarms"][0]
        assert alarm == {
            "id": 4,
            "time": "2026-11-21T10:03:00.000Z",
            "recordTime": None,
            "cameraId": 2,
            "description": "MOTION Alarm",
            "snapshot": f"{API}/cameras/alarms/4.jpg",
            "thumbnail": f"{API}/cameras/alarms/4.jpg?w=50&h=50",
        }
        assert body["alarms"][1]["recordTime"] == "2026-11-21T10:01:55.000Z"  # 5 s pre-alarm
        _, body, _ = await aget(http, sim.url(), path, hashed, q="video loss")
        assert ids(body) == [5]
        _, body, _ = await aget(http, sim.url(), f"{API}/cameras/2/alarms", hashed)
        assert ids(body) == [6, 4, 2]
        _, body, _ = await aget(
            http, sim.url(), f"{API}/cameras/1/alarms", hashed, to="2026-11-21T12:00:00+02:00"
        )
        assert ids(body) == [1]
        status, body, _ = await aget(http, sim.url(), path, hashed, **{"from": "soon"})
        assert status == 400
        assert "from" in body["error"]
        status, _, _ = await aget(http, sim.url(), f"{API}/cameras/7/alarms", hashed)
        assert status == 404


async def test_snapshot_is_late_then_a_jpeg_without_auth(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0.3)
    alarm = site.add_alarm()
    async with CamTraceSimulator({"default": site}) as sim:
        url = f"{sim.url()}{API}/cameras/alarms/{alarm.id}.jpg"
        status, _, _ = await get(http, url)
        assert status == 404
        await asyncio.sleep(0.35)
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/jpeg"
            assert await resp.read() == snapshot_jpeg(alarm.id)
        assert (await get(http, url, w="50", h="50"))[0] == 200  # the thumbnail
        assert (await get(http, f"{sim.url()}{API}/cameras/alarms/99.jpg"))[0] == 404


async def test_alarm_slice_is_open_then_closed_and_downloadable(
    http: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(slice_after_s=0.4)
    alarm = site.add_alarm(camera=2)
    site.add_alarm(camera=2, recording=False)
    assert alarm.record_time == alarm.time - timedelta(seconds=5)
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        query = {
            "cameraId": "1,2",
            "from": iso_z(alarm.time - timedelta(seconds=6)),
            "to": iso_z(alarm.time + timedelta(seconds=1)),
            "type": "a",
        }
        _, body, _ = await aget(http, sim.url(), f"{API}/slices", hashed, **query)
        [recording] = body["slices"]
        assert recording["stop"] is None  # still recording
        assert recording["start"] == iso_z(alarm.time - timedelta(seconds=5))
        assert (recording["cameraId"], recording["type"], recording["protected"]) == (2, "a", False)
        assert "%3A" in recording["downloadUrl"]
        assert recording["downloadUrl"].endswith("/a/download")
        status, body, _ = await aget(http, sim.url(), recording["downloadUrl"], hashed)
        assert status == 404
        assert "recorded" in body["error"]
        await asyncio.sleep(0.45)
        _, body, _ = await aget(http, sim.url(), f"{API}/slices", hashed, **query)
        [closed] = body["slices"]
        assert closed["stop"] == iso_z(alarm.time + timedelta(seconds=0.4))
        assert closed["size"] == 4096
        async with http.get(f"{sim.url()}{closed['downloadUrl']}", headers=wsse(hashed)) as resp:
            assert resp.status == 200
            assert resp.content_type == "video/x-matroska"
            video = await resp.read()
        assert video.startswith(b"\x1a\x45\xdf\xa3")
        assert b"matroska" in video
        assert b"alarm 1" in video
        assert len(video) == closed["size"]
        # Other cameras, regular recordings, other times: nothing.
        for other in (
            {"cameraId": "1"},
            {"type": "r"},
            {"from": "2001-01-01T00:00:00Z", "to": "2001-01-02T00:00:00Z"},
        ):
            _, body, _ = await aget(http, sim.url(), f"{API}/slices", hashed, **{**query, **other})
            assert body == {"slices": []}
        status, _, _ = await aget(
            http, sim.url(), f"{API}/slices/2/2001-01-01T00%3A00%3A00.000Z/a/download", hashed
        )
        assert status == 404


async def test_is_recording_alarm_is_live_and_open_slices_may_show_a_moving_stop(
    http: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(slice_after_s=1.0, open_slice_stop="moving")
    alarm = site.add_alarm(camera=2)
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        _, body, _ = await aget(http, sim.url(), f"{API}/cameras", hashed)
        assert [cam["isRecordingAlarm"] for cam in body["cameras"]] == [False, True, False, False]
        query = {"cameraId": "2", "type": "a"}
        _, body, _ = await aget(http, sim.url(), f"{API}/slices", hashed, **query)
        [recording] = body["slices"]
        stop = datetime.fromisoformat(recording["stop"])
        assert alarm.time <= stop < alarm.time + timedelta(seconds=1)  # the end so far
        async with http.get(f"{sim.url()}{recording['downloadUrl']}", headers=wsse(hashed)) as r:
            assert r.status == 200
            assert len(await r.read()) < 4096  # what a client fetching now gets: truncated

        async def closed() -> bool:
            _, body, _ = await aget(http, sim.url(), f"{API}/cameras/2", hashed)
            return body["isRecordingAlarm"] is False

        await eventually(closed, what="the slice closed")
        async with http.get(f"{sim.url()}{recording['downloadUrl']}", headers=wsse(hashed)) as r:
            assert len(await r.read()) == 4096


async def test_alarms_by_time_a_foreign_link_host_and_a_reset(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite(order="time", link_host="demo.camtrace.com")
    now = datetime.now(UTC)
    site.add_alarm(time=now)
    site.add_alarm(time=now - timedelta(minutes=10))  # the clock stepped back
    site.add_alarm(time=now + timedelta(seconds=1))
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        _, body, headers = await aget(http, sim.url(), f"{API}/cameras/alarms", hashed, limit="2")
        assert ids(body) == [3, 1]
        assert headers["Link"].startswith("<//demo.camtrace.com/api/v1.2/cameras/alarms?")
        _, body, _ = await aget(
            http, sim.url(), f"{API}/cameras/alarms", hashed, limit="2", offset="2"
        )
        assert ids(body) == [2]
        site.reset()
        assert [alarm.id for alarm in site.add_alarms(2)] == [1, 2]
        _, body, _ = await aget(http, sim.url(), f"{API}/cameras/alarms", hashed)
        assert ids(body) == [2, 1]


async def test_alarms_without_snapshot_and_bare_trigger_descriptions(
    http: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0, trigger_description="bare")
    site.add_alarm(snapshot=False)
    site.trigger_alarm([1], "porte1")
    site.trigger_alarm([1])
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        _, body, _ = await aget(http, sim.url(), f"{API}/cameras/alarms", hashed)
        assert [a["description"] for a in body["alarms"]] == ["TRIGGER", "porte1", "MOTION Alarm"]
        assert (body["alarms"][2]["snapshot"], body["alarms"][2]["thumbnail"]) == (None, None)
        status, _, _ = await get(http, f"{sim.url()}{API}/cameras/alarms/1.jpg")
        assert status == 404
        status, _, _ = await get(http, f"{sim.url()}{API}/cameras/alarms/2.jpg?w=50&h=50")
        assert status == 200  # a thumbnail, without authentication


async def test_camera_connection_log(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite(connections_methods=("POST",))
    early = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    site.camera_connection(2, False, time=early)
    site.camera_connection(2, True, time=early + timedelta(minutes=5))
    site.camera_connection(3, False, time=early + timedelta(minutes=5), streams=1)
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        url = f"{sim.url()}{API}/cameras/connections"
        async with http.get(url, headers=wsse(hashed)) as resp:
            assert resp.status == 405  # this server takes POST only
        async with http.post(url, headers=wsse(hashed), params={"limit": "2"}) as resp:
            body = await resp.json()
        assert [e["id"] for e in body["connections"]] == [3, 4]  # newest first, then by id
        assert body["paging"] == {"total": 5, "offset": 2, "limit": 2}
        assert body["connections"][0]["dateTime"] == "2026-01-01T08:05:00Z"
        params = {"from": "2026-01-01T08:01:00Z", "connected": "false", "id_cams": "3"}
        async with http.post(url, headers=wsse(hashed), params=params) as resp:
            assert [e["id"] for e in (await resp.json())["connections"]] == [5]
        async with http.post(f"{sim.url()}{API}/cameras/2/connections", headers=wsse(hashed)) as r:
            assert len((await r.json())["connections"]) == 4
        site.admin = False
        async with http.post(url, headers=wsse(hashed)) as resp:
            assert resp.status == 403  # the manual: "Requires Admin profile"
        async with http.post(f"{sim.url()}/_sim/faults", json={"reset": True}) as resp:
            assert (await resp.json())["alarms"] == 0
        assert site.connections == []


# ------------------------------------------------------------ actions, health
async def test_triggers_commands_and_scenarios(
    sim: CamTraceSimulator, http: aiohttp.ClientSession
) -> None:
    site = sim.site()
    hashed = await hashed_for(http, sim.url())
    path = f"{API}/cameras/alarms/trigger"
    async with http.get(
        f"{sim.url()}{path}", params={"cameraId": "1,3", "type": "porte1"}, headers=wsse(hashed)
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert await resp.read() == b""
    assert [(a.camera_id, a.description) for a in site.alarms] == [
        (1, "porte1 Alarm"),
        (3, "porte1 Alarm"),
    ]
    assert (await aget(http, sim.url(), path, hashed, cameraId="2"))[0] == 200
    assert site.alarms[-1].description == "TRIGGER Alarm"
    status, body, _ = await aget(http, sim.url(), path, hashed, cameraId="9")
    assert status == 404
    assert "9" in body["error"]
    assert (await aget(http, sim.url(), path, hashed))[0] == 400
    assert (await aget(http, sim.url(), path, hashed, cameraId="a,b"))[0] == 400
    untrigger = f"{API}/cameras/alarms/untrigger"
    assert (await aget(http, sim.url(), untrigger, hashed, cameraId="1,3"))[0] == 200

    _, body, _ = await aget(http, sim.url(), f"{API}/exturls", hashed)
    assert [(c["id"], c["href"]) for c in body["exturls"]] == [
        (7, f"{API}/exturls/7"),
        (2, f"{API}/exturls/2"),
        (3, f"{API}/exturls/3"),
    ]
    _, body, _ = await aget(http, sim.url(), f"{API}/exturls/7", hashed)
    assert body["exturls"]["name"] == "Siren"
    status, body, _ = await aget(http, sim.url(), f"{API}/exturls/7/trigger", hashed)
    assert (status, body) == (200, {"triggered": True})
    assert (await aget(http, sim.url(), f"{API}/exturls/99/trigger", hashed))[0] == 404

    _, body, _ = await aget(http, sim.url(), f"{API}/scenarios", hashed)
    assert [(s["scenarioId"], s["ignored"]) for s in body["scenarios"]] == [(1, False), (2, True)]
    status, body, _ = await aget(http, sim.url(), f"{API}/scenarios/1/trigger", hashed)
    assert (status, body) == (200, {"triggered": True})
    status, body, _ = await aget(http, sim.url(), f"{API}/scenarios/2/trigger", hashed)
    assert (status, body) == (409, {"error": "scenario is ignored"})
    assert (await aget(http, sim.url(), f"{API}/scenarios/5/trigger", hashed))[0] == 404

    assert site.triggers == [
        ("alarm_trigger", {"cameraId": [1, 3], "type": "porte1"}),
        ("alarm_trigger", {"cameraId": [2]}),
        ("alarm_untrigger", {"cameraId": [1, 3]}),
        ("exturl", {"id": 7}),
        ("scenario", {"id": 1}),
    ]


async def test_health_on_both_paths(sim: CamTraceSimulator, http: aiohttp.ClientSession) -> None:
    site = sim.site()
    hashed = await hashed_for(http, sim.url())
    for path in (f"{API}/health", "/ap1/v1.2/health"):
        status, body, _ = await aget(http, sim.url(), path, hashed)
        assert status == 200
        assert body["health"] == {
            "recorder": True,
            "cameras": True,
            "hardware": True,
            "errorDetails": {},
        }
    site.set_camera_error(1, "No image")
    site.health["hardware"] = False
    _, body, _ = await aget(http, sim.url(), f"{API}/health", hashed)
    assert (body["health"]["cameras"], body["health"]["hardware"]) == (False, False)
    assert body["health"]["errorDetails"]["cameras"] == [
        {"id": 1, "name": "Entrance", "streamName": "HD stream", "error": "No image"}
    ]
    _, camera, _ = await aget(http, sim.url(), f"{API}/cameras/1", hashed)
    assert camera["status"] == -1
    site.clear_errors()
    _, body, _ = await aget(http, sim.url(), "/ap1/v1.2/health", hashed)
    assert body["health"]["cameras"] is True
    assert body["health"]["errorDetails"] == {}


# ---------------------------------------------------- faults, offline, control
async def test_poll_faults_offline_and_the_date_header(http: aiohttp.ClientSession) -> None:
    site = CamTraceSite(clock_offset_s=-120.0)
    async with CamTraceSimulator({"default": site}) as sim:
        hashed = await hashed_for(http, sim.url())
        site.fail_alarm_polls(2, 502)
        alarms = f"{API}/cameras/alarms"
        assert (await get(http, f"{sim.url()}{alarms}"))[0] == 502  # before authentication
        assert (await aget(http, sim.url(), f"{API}/cameras", hashed))[0] == 401  # stale: -120 s
        assert (await aget(http, sim.url(), f"{API}/cameras/1/alarms", hashed))[0] == 502
        assert (await aget(http, sim.url(), alarms, hashed))[0] == 401
        status, _, _ = await get(http, f"{sim.url()}{alarms}", wsse(hashed, offset_s=-120))
        assert status == 200
        site.offline = True
        for path in (f"{API}/getservertime", f"{API}/users/cms/auth", f"{API}/cameras"):
            status, _, headers = await get(http, f"{sim.url()}{path}")
            assert status == 503
            skew = (parsedate_to_datetime(headers["Date"]) - datetime.now(UTC)).total_seconds()
            assert -122 <= skew <= -118
        site.offline = False
        assert (await get(http, f"{sim.url()}{API}/getservertime"))[0] == 200
    assert site.requests[f"GET {API}/cameras/alarms"] == 3
    assert site.requests[f"GET {API}/cameras/1/alarms"] == 1


async def test_http_control_surface(http: aiohttp.ClientSession) -> None:
    async with CamTraceSimulator({"x": CamTraceSite()}) as sim:
        control = f"{sim.url('x')}/_sim"
        body = {"count": 3, "camera": 2, "description": "VIDEO LOSS Alarm", "recording": False}
        async with http.post(f"{control}/alarms", json=body) as resp:
            assert await resp.json() == [1, 2, 3]
        assert [a.record_time for a in sim.site("x").alarms] == [None, None, None]
        async with http.post(f"{control}/alarms", json={"count": 1, "colour": "red"}) as resp:
            assert resp.status == 400
        faults = {"fail": 1, "clock_offset_s": 30, "expire_digests": True, "offline": True}
        async with http.post(f"{control}/faults", json=faults) as resp:
            state = await resp.json()
        assert state["offline"] is True
        assert state["clock_offset_s"] == 30
        assert state["faults"] == {
            "fail": 1,
            "status": 500,
            "pending_injections": 0,
            "expire_digests": 1,
        }
        error = {"camera_error": {"camera": 3, "error": "No image"}}
        async with http.post(f"{control}/faults", json=error) as resp:
            assert (await resp.json())["health"]["cameras"] is False
        async with http.get(f"{control}/state") as resp:
            state = await resp.json()
        assert (state["alarms"], state["last_id"]) == (3, 3)
        async with http.get(f"{sim.url()}/t/nobody/_sim/state") as resp:
            assert resp.status == 404


async def test_generator_feeds_every_site() -> None:
    sites = {"a": CamTraceSite(), "b": CamTraceSite()}
    async with CamTraceSimulator(sites) as sim:
        sim.start_generator(40.0, descriptions=("MOTION Alarm", "porte1 Alarm"), seed=7)
        await asyncio.sleep(0.5)
        await sim.stop_generator()
    for site in sites.values():
        assert site.alarms
        assert {a.description for a in site.alarms} <= {"MOTION Alarm", "porte1 Alarm"}
        assert [a.id for a in site.alarms] == list(range(1, len(site.alarms) + 1))


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.camtrace",
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
            assert (await auth_methods(http, lines[1]))[0]["salt"] == DEFAULT_SALT
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_max_alarms_keeps_the_newest_and_lookup_still_works() -> None:
    site = CamTraceSite(max_alarms=100)
    site.add_alarms(250, recording=False)
    assert 100 <= len(site.alarms) <= 111
    assert site.alarm(250) is site.alarms[-1]
    assert site.alarm(1) is None
