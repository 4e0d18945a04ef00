"""The CamStreamer cloud simulator, exercised over real HTTP (real GraphQL documents) as the
daemon will use it."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from graphql import build_schema, lexicographic_sort_schema, print_schema

from cms_ingest.simulators.camstreamer import (
    EXTENDED_SCHEMA,
    EXTENDED_SCHEMA_SDL,
    SCHEMA,
    SCHEMA_SDL,
    CamStreamerAccount,
    CamStreamerSimulator,
)
from tests.conftest import eventually

FAST = math.inf  # no rate limit, for the tests that are not about it
CAMERA_FIELDS = "name serial_number is_connected connection { source_ip }"
# The manual's fields only: cameraList for the node ids, camera(node_id) (one alias each, up
# to five cameras) for the rest, all in one query.
CAMERAS_QUERY = (
    "query Cameras { cameraList { node_id name } "
    + " ".join(
        f"c{node}: camera(node_id: {node}) {{ {CAMERA_FIELDS} }}" for node in range(140094, 140099)
    )
    + " }"
)
# What the driver asked before: undocumented fields on cameraList.
UNDOCUMENTED_QUERY = (
    "query { cameraList { node_id name serial_number external_id is_connected "
    "connection { source_ip } } }"
)
RECORDINGS_QUERY = """
query Recordings($node: Int!, $from: Int!, $to: Int!) {
  camera(node_id: $node) {
    recordings(from: $from, to: $to) { recording_id duration progress download_url outputs { height } }
  }
}
"""
PREPARE = (
    "mutation Prepare($id: String!, $h: Int!) { recordingPrepare(recording_id: $id, height: $h) }"
)
PROGRESS = "query($id: String!) { recording(recording_id: $id) { progress download_url } }"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def gql(
    http: aiohttp.ClientSession,
    base: str,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = "api-token",
) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    payload: dict[str, Any] = {"query": query}
    if variables is not None:
        payload["variables"] = variables
    async with http.post(f"{base}/api/graphql.php", json=payload, headers=headers) as resp:
        return resp.status, await resp.json()


async def oauth(
    http: aiohttp.ClientSession, base: str, path: str, **params: str
) -> tuple[int, Any]:
    async with http.post(f"{base}/oauth2/{path}", params=params) as resp:
        return resp.status, await resp.json()


def error(body: Any) -> tuple[str, str]:
    assert "data" not in body
    (item,) = body["errors"]
    return item["category"], item["message"]


async def cameras(http: aiohttp.ClientSession, base: str, token: str = "api-token") -> Any:
    status, body = await gql(http, base, CAMERAS_QUERY, token=token)
    assert status == 200, body
    assert "errors" not in body, body
    data = body["data"]
    return [{**item, **data[f"c{item['node_id']}"]} for item in data["cameraList"]]


def test_schema_matches_its_definition() -> None:
    for schema, sdl in ((SCHEMA, SCHEMA_SDL), (EXTENDED_SCHEMA, EXTENDED_SCHEMA_SDL)):
        served = print_schema(lexicographic_sort_schema(schema))
        assert served == print_schema(lexicographic_sort_schema(build_schema(sdl)))


async def test_undocumented_fields_are_refused_like_a_validating_server(
    http: aiohttp.ClientSession,
) -> None:
    manual = CamStreamerAccount(rate_per_s=FAST)
    extended = CamStreamerAccount(rate_per_s=FAST, schema="extended")
    async with CamStreamerSimulator({"default": manual, "x": extended}) as sim:
        status, body = await gql(http, sim.url(), UNDOCUMENTED_QUERY)
        assert status == 200
        assert "data" not in body  # the whole query, not just the unknown fields
        messages = [item["message"] for item in body["errors"]]
        assert {item["category"] for item in body["errors"]} == {"graphql"}
        assert "Cannot query field 'serial_number' on type 'CameraListItem'." in messages
        _, body = await gql(http, sim.url(), "{ camera(node_id: 140094) { external_id } }")
        assert error(body)[0] == "graphql"  # external_id is documented on nodeList only
        # A portal with more than the manual documents answers both forms.
        _, body = await gql(http, sim.url("x"), UNDOCUMENTED_QUERY)
        assert body["data"]["cameraList"][0]["serial_number"] == "ACCC8EE8A9CA"
        assert len(await cameras(http, sim.url("x"))) == 3
    with pytest.raises(ValueError, match="schema"):
        CamStreamerAccount(schema="graphql-all")


# ------------------------------------------------------------------ queries
async def test_camera_list_and_node_list(http: aiohttp.ClientSession) -> None:
    sites = {
        "default": CamStreamerAccount(rate_per_s=FAST),
        "x": CamStreamerAccount(rate_per_s=FAST),
    }
    async with CamStreamerSimulator(sites) as sim:
        for tenant in sites:
            listed = await cameras(http, sim.url(tenant))
            assert listed == [
                {
                    "node_id": 140094 + index,
                    "name": name,
                    "serial_number": serial,
                    "is_connected": True,
                    "connection": {"source_ip": f"203.0.113.{10 + index}"},
                }
                for index, (serial, name) in enumerate(
                    [("ACCC8EE8A9CA", "Gate"), ("ACCC8EE8A9CB", "Yard"), ("ACCC8EE8A9CC", "Dock")]
                )
            ]
        base = sim.url("x")
        fields = "{ node_id parent_node_id type name external_id }"
        # The manual's bare enum word, a string and a variable all filter.
        for query, variables in [
            (f"{{ nodeList(type: camera) {fields} }}", None),
            (f'{{ nodeList(type: "camera") {fields} }}', None),
            (f"query($t: NodeType) {{ nodeList(type: $t) {fields} }}", {"t": "camera"}),
        ]:
            status, body = await gql(http, base, query, variables)
            assert status == 200
            nodes = body["data"]["nodeList"]
            assert [node["type"] for node in nodes] == ["camera"] * 3
            assert nodes[0] == {
                "node_id": 140094,
                "parent_node_id": 138170,
                "type": "camera",
                "name": "Gate",
                "external_id": "camera1",
            }
        _, body = await gql(http, base, "{ nodeList { node_id parent_node_id type } }")
        everything = body["data"]["nodeList"]
        assert everything[0] == {"node_id": 138170, "parent_node_id": None, "type": "folder"}
        assert sorted({node["type"] for node in everything}) == ["camera", "folder", "input"]
        _, body = await gql(http, base, "{ camera(node_id: 140095) { name serial_number } }")
        assert body == {"data": {"camera": {"name": "Yard", "serial_number": "ACCC8EE8A9CB"}}}
        _, body = await gql(http, base, "{ camera(node_id: 1) { name } }")
        assert body == {"data": {"camera": None}}
        # GraphQL errors in the vendor's shape, HTTP 200.
        status, body = await gql(http, base, "{ nodeList(type: cam) { name } }")
        assert status == 200
        assert error(body)[0] == "graphql"
        status, body = await gql(http, base, "{ cameraList { nope } }")
        assert (status, error(body)[0]) == (200, "graphql")
        async with http.post(
            f"{base}/api/graphql.php", data=b"{", headers={"Authorization": "Bearer api-token"}
        ) as resp:
            assert resp.status == 400
            assert error(await resp.json())[0] == "request"
        assert sites["x"].requests["POST /api/graphql.php"] == len(sites["x"].queries) == 10
        assert sites["x"].daily_used == 10


async def test_missing_unknown_and_expired_tokens_answer_200_errors(
    http: aiohttp.ClientSession,
) -> None:
    site = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": site}) as sim:
        base = sim.url()
        for token in (None, ""):
            status, body = await gql(http, base, CAMERAS_QUERY, token=token)
            assert status == 200
            assert error(body) == ("authError", "Invalid or empty access token.")
        # The manual: a token that is there but not valid is category `client`.
        status, body = await gql(http, base, CAMERAS_QUERY, token="nope")
        assert (status, error(body)) == (
            200,
            ("client", "Request to an unknown or unavailable platform."),
        )
        assert site.auth_refusals == {"authError": 2, "client": 1}
        site.expire_tokens()
        status, body = await gql(http, base, CAMERAS_QUERY)
        assert (status, error(body)) == (200, ("expired", "Access token expired."))
        site.reset_static_token()
        assert len(await cameras(http, base)) == 3
        # The same over the control surface.
        async with http.post(f"{base}/_sim/faults", json={"expire_tokens": True}) as resp:
            assert resp.status == 200
            assert (await resp.json())["static_token"] == "expired"
        _, body = await gql(http, base, CAMERAS_QUERY)
        assert error(body)[0] == "expired"


async def test_rate_limit_refuses_the_second_query_in_a_second(
    http: aiohttp.ClientSession,
) -> None:
    site = CamStreamerAccount()  # the manual's 1 query/s
    async with CamStreamerSimulator({"default": site}) as sim:
        base = sim.url()
        assert len(await cameras(http, base)) == 3
        status, body = await gql(http, base, CAMERAS_QUERY)
        assert (status, error(body)) == (429, ("rateLimit", "API rate limit exceeded"))
        # Refused before the token is read: a bad token is refused for rate too.
        status, body = await gql(http, base, CAMERAS_QUERY, token="nope")
        assert (status, error(body)[0]) == (429, "rateLimit")
        assert (site.rate_limited, site.daily_used, len(site.queries)) == (2, 1, 3)
        assert site.max_queries_in_window(1.0) == 3
        assert site.max_queries_in_window(1e-9) == 1
        # Refused queries do not hold the window: one second after the accepted one, fine.
        await asyncio.sleep(max(0.0, site.queries[0] + 1.02 - time.monotonic()))
        assert len(await cameras(http, base)) == 3
        assert site.daily_used == 2


@pytest.mark.parametrize("limit_status", [429, 200])
async def test_daily_limit(http: aiohttp.ClientSession, limit_status: int) -> None:
    site = CamStreamerAccount(rate_per_s=FAST, daily_limit=3, limit_status=limit_status)
    async with CamStreamerSimulator({"default": site}) as sim:
        for _ in range(3):
            await cameras(http, sim.url())
        status, body = await gql(http, sim.url(), CAMERAS_QUERY)
        assert (status, error(body)) == (limit_status, ("dailyLimit", "Daily API limit exceeded"))
        assert (site.daily_used, site.daily_refused, len(site.queries)) == (3, 1, 4)


# -------------------------------------------------------------------- oauth
async def test_oauth_refresh_rotates_the_refresh_token(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": site, "x": CamStreamerAccount()}) as sim:
        base = sim.url()
        client = {"client_id": "cms-client", "client_secret": "cms-secret"}
        status, first = await oauth(
            http, base, "token", grant_type="refresh_token", refresh_token="refresh-1", **client
        )
        assert status == 200
        assert first["expires_in"] == 3600
        assert first["refresh_token"] != "refresh-1"
        assert len(await cameras(http, base, first["access_token"])) == 3
        # The old refresh token no longer works; the new one does, once.
        status, body = await oauth(
            http, base, "token", grant_type="refresh_token", refresh_token="refresh-1", **client
        )
        assert status == 400
        assert set(body) == {"error"}
        status, second = await oauth(
            http,
            base,
            "token",
            grant_type="refresh_token",
            refresh_token=first["refresh_token"],
            **client,
        )
        assert status == 200
        assert second["refresh_token"] not in ("refresh-1", first["refresh_token"])
        assert site.oauth_refreshes == 2
        # A form body works as well as the query.
        form = {**client, "grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
        async with http.post(f"{base}/oauth2/token", data=form) as resp:
            assert resp.status == 200
            third = await resp.json()
        # Expiry: every access token answers expired until a refresh.
        site.expire_tokens()
        _, body = await gql(http, base, CAMERAS_QUERY, token=third["access_token"])
        assert error(body)[0] == "expired"
        _, fourth = await oauth(
            http,
            base,
            "token",
            grant_type="refresh_token",
            refresh_token=third["refresh_token"],
            **client,
        )
        assert len(await cameras(http, base, fourth["access_token"])) == 3
        # Revocation.
        status, body = await oauth(http, base, "revoke", access_token=fourth["access_token"])
        assert (status, body["success"]) == (200, True)
        _, body = await gql(http, base, CAMERAS_QUERY, token=fourth["access_token"])
        assert error(body)[0] == "client"  # present but no longer valid
        status, _ = await oauth(
            http,
            base,
            "token",
            grant_type="refresh_token",
            refresh_token=fourth["refresh_token"],
            **client,
        )
        assert status == 400
        # Authorization codes, both spellings; no secret: no refresh token.
        for grant in ("authorization_code", "auth_code"):
            status, body = await oauth(
                http, base, "token", grant_type=grant, code="code-1", **client
            )
            assert status == 200
            assert {"access_token", "expires_in", "refresh_token"} <= set(body)
        status, body = await oauth(
            http, base, "token", grant_type="auth_code", code="code-1", client_id="cms-client"
        )
        assert status == 200
        assert "refresh_token" not in body
        # Refusals.
        bad = {"client_id": "cms-client", "client_secret": "wrong"}
        status, body = await oauth(
            http, base, "token", grant_type="refresh_token", refresh_token="refresh-9", **bad
        )
        assert status == 400
        assert "error" in body
        status, _ = await oauth(http, base, "token", grant_type="password", **client)
        assert status == 400
        assert site.oauth_refreshes == 4
        assert site.queries and not sim.site("x").queries  # OAuth is not GraphQL


# --------------------------------------------------------------- recordings
async def test_recordings_prepare_progress_download(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount(rate_per_s=FAST, prepare_seconds=0.3)
    async with CamStreamerSimulator({"default": CamStreamerAccount(), "x": site}) as sim:
        base = sim.url("x")
        window = {"node": 140094, "from": 1_700_000_000, "to": 1_700_000_030}
        status, body = await gql(http, base, RECORDINGS_QUERY, window)
        assert status == 200
        (recording,) = body["data"]["camera"]["recordings"]
        rid = recording["recording_id"]
        assert recording == {
            "recording_id": rid,
            "duration": 30,
            "progress": 0,
            "download_url": None,
            "outputs": [{"height": 480}, {"height": 720}, {"height": 1080}],
        }
        _, again = await gql(http, base, RECORDINGS_QUERY, window)
        assert again["data"]["camera"]["recordings"][0]["recording_id"] != rid

        _, body = await gql(http, base, PREPARE, {"id": "unknown", "h": 720})
        assert body == {"data": {"recordingPrepare": False}}
        _, body = await gql(http, base, PREPARE, {"id": rid, "h": 720})
        assert body == {"data": {"recordingPrepare": True}}
        assert site.recordings_prepared == [(rid, 720)]

        seen: list[int] = []
        deadline = time.monotonic() + 3
        while True:
            _, body = await gql(http, base, PROGRESS, {"id": rid})
            state = body["data"]["recording"]
            seen.append(state["progress"])
            if state["progress"] >= 100:
                break
            assert state["download_url"] is None
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert seen == sorted(seen)
        assert seen[0] < 100
        url = state["download_url"]
        assert url.startswith(f"{sim.url('x')}/api/download.php?auth_key=")

        async with http.get(url) as resp:  # no bearer token
            assert resp.status == 200
            assert resp.content_type == "video/mp4"
            data = await resp.read()
        assert len(data) == 8192
        assert data[4:8] == b"ftyp"
        assert site.downloads == 1
        async with http.get(f"{base}/api/download.php", params={"auth_key": "nope"}) as resp:
            assert resp.status == 404
        # A download key belongs to its account.
        key = url.rsplit("=", 1)[1]
        async with http.get(f"{sim.url()}/api/download.php", params={"auth_key": key}) as resp:
            assert resp.status == 404
        _, body = await gql(http, base, PROGRESS, {"id": "unknown"})
        assert body == {"data": {"recording": None}}


async def test_nothing_recorded_gives_no_recordings(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount(rate_per_s=FAST, recorded=False)
    async with CamStreamerSimulator({"default": site}) as sim:
        window = {"node": 140095, "from": 1_700_000_000, "to": 1_700_000_030}
        _, body = await gql(http, sim.url(), RECORDINGS_QUERY, window)
        assert body == {"data": {"camera": {"recordings": []}}}
        site.recorded = True
        _, body = await gql(http, sim.url(), RECORDINGS_QUERY, window)
        assert len(body["data"]["camera"]["recordings"]) == 1


# ------------------------------------------------------------------- device
async def test_vapix_port_on_and_off_with_the_token_last(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount()
    async with CamStreamerSimulator({"default": CamStreamerAccount(), "x": site}) as sim:
        template = sim.device_url_template("x")
        assert template == f"{sim.url('x')}/device/{{serial}}"
        url = template.format(serial="ACCC8EE8A9CB") + "/axis-cgi/io/port.cgi"
        token = ("DEVICE_ACCESS_TOKEN", "device-token")

        async def call(*params: tuple[str, str], target: str = url) -> tuple[int, str]:
            async with http.get(target, params=list(params)) as resp:
                return resp.status, await resp.text()

        assert await call(("action", "1:/"), token) == (200, "OK")
        assert site.port_state == {("ACCC8EE8A9CB", 1): True}
        assert await call(("action", "1:\\"), token) == (200, "OK")  # sent as %5C
        assert site.port_state == {("ACCC8EE8A9CB", 1): False}
        assert [(serial, action) for serial, action, _ in site.vapix_calls] == [
            ("ACCC8EE8A9CB", "1:/"),
            ("ACCC8EE8A9CB", "1:\\"),
        ]
        # Refused: the token not last, wrong or missing; unknown serial; bad action.
        assert (await call(token, ("action", "1:/")))[0] == 401
        assert (await call(("action", "1:/"), ("DEVICE_ACCESS_TOKEN", "nope")))[0] == 401
        assert (await call(("action", "1:/")))[0] == 401
        other = template.format(serial="000000000000") + "/axis-cgi/io/port.cgi"
        assert (await call(("action", "1:/"), token, target=other))[0] == 404
        assert (await call(("action", "on"), token))[0] == 400
        # A disconnected camera cannot be reached.
        site.disconnect("ACCC8EE8A9CB")
        assert (await call(("action", "1:/"), token))[0] == 503
        assert site.port_state == {("ACCC8EE8A9CB", 1): False}
        assert not site.queries  # device access is not GraphQL
        assert not sim.site().vapix_calls


async def test_device_access_takes_the_api_token_pulses_and_checkactive(
    http: aiohttp.ClientSession,
) -> None:
    site = CamStreamerAccount()
    lacking = CamStreamerAccount(token_configuration=False, pulse_supported=False)
    async with CamStreamerSimulator({"default": site, "x": lacking}) as sim:

        async def call(tenant: str, *params: tuple[str, str]) -> tuple[int, str]:
            url = sim.device_url_template(tenant).format(serial="ACCC8EE8A9CA")
            async with http.get(f"{url}/axis-cgi/io/port.cgi", params=list(params)) as resp:
                return resp.status, await resp.text()

        api_token = ("DEVICE_ACCESS_TOKEN", "api-token")
        # The manual: an API token with the Configuration permission is the device token.
        assert await call("default", ("checkactive", "1"), api_token) == (200, "port1=inactive")
        assert await call("default", ("action", "1:/200\\"), api_token) == (200, "OK")
        assert await call("default", ("checkactive", "1"), api_token) == (200, "port1=active")
        await eventually(lambda: site.port_state[("ACCC8EE8A9CA", 1)] is False, what="pulse end")
        site.expire_tokens()  # an expired API token opens nothing
        assert (await call("default", ("checkactive", "1"), api_token))[0] == 401
        # Without the permission, or without pulse support:
        assert (await call("x", ("checkactive", "1"), api_token))[0] == 401
        device = ("DEVICE_ACCESS_TOKEN", "device-token")
        assert (await call("x", ("action", "1:/200\\"), device))[0] == 400
        # An answer lost after the camera acted.
        lacking.vapix_answer_errors = 1
        assert (await call("x", ("action", "1:/"), device))[0] == 500
        assert lacking.port_state[("ACCC8EE8A9CA", 1)] is True
        assert await call("x", ("action", "1:\\"), device) == (200, "OK")


async def test_download_host_switch(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount(rate_per_s=FAST, prepare_seconds=0, download_host="localhost:{port}")
    async with CamStreamerSimulator({"default": site}) as sim:
        base = sim.url()
        port = base.rsplit(":", 1)[1]
        window = {"node": 140094, "from": 1_700_000_000, "to": 1_700_000_030}
        _, body = await gql(http, base, RECORDINGS_QUERY, window)
        rid = body["data"]["camera"]["recordings"][0]["recording_id"]
        await gql(http, base, PREPARE, {"id": rid, "h": 720})
        _, body = await gql(http, base, PROGRESS, {"id": rid})
        url = body["data"]["recording"]["download_url"]
        assert url.startswith(f"http://localhost:{port}/api/download.php?auth_key=")
        async with http.get(url) as resp:
            assert resp.status == 200 and resp.content_type == "video/mp4"


async def test_forgotten_access_tokens_answer_client_and_refresh_still_works(
    http: aiohttp.ClientSession,
) -> None:
    site = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": site}) as sim:
        base = sim.url()
        client = {"client_id": "cms-client", "client_secret": "cms-secret"}
        _, first = await oauth(
            http, base, "token", grant_type="refresh_token", refresh_token="refresh-1", **client
        )
        async with http.post(f"{base}/_sim/faults", json={"forget_access_tokens": True}) as resp:
            assert resp.status == 200
        _, body = await gql(http, base, CAMERAS_QUERY, token=first["access_token"])
        assert error(body)[0] == "client"
        _, second = await oauth(
            http,
            base,
            "token",
            grant_type="refresh_token",
            refresh_token=first["refresh_token"],
            **client,
        )
        assert len(await cameras(http, base, second["access_token"])) == 3


# ------------------------------------------------------------ control surface
async def test_disconnect_and_connect_show_in_camera_list(http: aiohttp.ClientSession) -> None:
    site = CamStreamerAccount(rate_per_s=FAST)
    async with CamStreamerSimulator({"default": site}) as sim:
        base = sim.url()

        async def connected() -> dict[str, bool]:
            listed = await cameras(http, base)
            return {cam["serial_number"]: cam["is_connected"] for cam in listed}

        site.disconnect("ACCC8EE8A9CA")
        assert await connected() == {
            "ACCC8EE8A9CA": False,
            "ACCC8EE8A9CB": True,
            "ACCC8EE8A9CC": True,
        }
        assert (await cameras(http, base))[0]["connection"] is None
        async with http.post(f"{base}/_sim/faults", json={"disconnect": "ACCC8EE8A9CC"}) as resp:
            assert resp.status == 200
        async with http.post(f"{base}/_sim/faults", json={"connect": "ACCC8EE8A9CA"}) as resp:
            assert resp.status == 200
        assert await connected() == {
            "ACCC8EE8A9CA": True,
            "ACCC8EE8A9CB": True,
            "ACCC8EE8A9CC": False,
        }
        assert [(serial, up) for serial, up, _ in site.connection_changes] == [
            ("ACCC8EE8A9CA", False),
            ("ACCC8EE8A9CC", False),
            ("ACCC8EE8A9CA", True),
        ]
        async with http.post(f"{base}/_sim/faults", json={"disconnect": "nope"}) as resp:
            assert resp.status == 400
        async with http.post(f"{base}/_sim/alarms", json={"serial": "ACCC8EE8A9CB"}) as resp:
            assert resp.status == 200
            assert await resp.json() == [1]
        async with http.get(f"{base}/_sim/state") as resp:
            state = await resp.json()
        assert [cam["is_connected"] for cam in state["cameras"]] == [True, False, False]
        assert state["queries"] == 3
        assert state["requests"] == {"POST /api/graphql.php": 3}
        with pytest.raises(KeyError):
            site.connect("nope")


async def test_generator_disconnects_cameras_that_come_back() -> None:
    sites = {"a": CamStreamerAccount(), "b": CamStreamerAccount()}
    sim = CamStreamerSimulator(sites)
    async with sim:
        sim.start_generator(40.0, seed=3, offline_s=(0.05, 0.1))
        await asyncio.sleep(0.3)
        await sim.stop_generator()
        for site in sites.values():
            assert any(not up for _, up, _ in site.connection_changes)
        await asyncio.sleep(0.15)
        for site in sites.values():
            assert all(cam.is_connected for cam in site.cameras.values())
            assert any(up for _, up, _ in site.connection_changes)
        sim.start_generator(40.0, seed=4)  # long outages, cancelled by stop()
        await asyncio.sleep(0.2)
    for site in sites.values():
        assert not site._timers


async def test_command_line(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.camstreamer",
        "--port",
        "0",
        "--sites",
        "2",
        "--token",
        "cli-token",
        "--cameras",
        "5",
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
        listed = await cameras(http, lines[1], token="cli-token")
        assert [cam["name"] for cam in listed] == ["Gate", "Yard", "Dock", "Camera 4", "Camera 5"]
        assert listed[4]["serial_number"] == "ACCC8EE8A9CE"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
