"""CamStreamer cloud poison answers (issue 15): each with its minimal answer, served over real
HTTP by the simulator with one field altered. The client reports bad input, raises only its
vendor errors, keeps what it knew of a camera, and keeps its cursor small and storable."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from cms_ingest.domain import EventType, MediaKind
from cms_ingest.simulators.base import DeviceAnswer, ScriptedAnswer
from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.vendors.base import BadDeviceResponse
from cms_ingest.vendors.camstreamer import CURSOR_NAME_LIMIT
from cms_ingest.vendors.common import plausible_time
from tests.conftest import eventually
from tests.support import app_config, camstreamer_site, running_daemon
from tests.test_camstreamer_manual import GATE, YARD, bad_inputs, client_for, fast_options

GRAPHQL = "/api/graphql.php"
LOCATOR = {"node_id": 140094, "from": 1_700_000_000, "to": 1_700_000_030}


def altered(change: Callable[[dict[str, Any]], None]) -> ScriptedAnswer:
    """The portal's real answer with `change` applied to its `data`."""

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        body = json.loads(response.body)
        change(body["data"])
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    return answer


def gate_answer(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["c140094"] = value

    return change


def gate_field(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["c140094"][field] = value

    return change


POISON_CAMERAS = [
    gate_field("serial_number", {"a": 1}),  # an object: unhashable, once a TypeError
    gate_field("serial_number", ["ACCC8EE8A9CA"]),
    gate_field("serial_number", None),
    gate_field("serial_number", ""),
    gate_field("is_connected", "false"),
    gate_field("is_connected", 0),
    gate_field("is_connected", math.nan),  # NaN is not JSON: read as null
    gate_field("serial_number", math.nan),
    gate_answer([1, 2]),
    gate_answer("camera"),
]


@pytest.mark.parametrize("poison", POISON_CAMERAS)
async def test_a_poisoned_camera_answer_is_reported_and_its_state_kept(
    poison: Callable[[dict[str, Any]], None],
) -> None:
    account = CamStreamerAccount(rate_per_s=math.inf)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        cursor = (await client.poll(None)).cursor
        account.disconnect(GATE)
        cursor = (await client.poll(cursor)).cursor
        offline = await client.poll(cursor)
        assert [a.event_type for a in offline.alarms] == [EventType.CAMERA_OFFLINE]
        before = bad_inputs("camera")
        sim.respond("POST", GRAPHQL, altered(poison))
        poisoned = await client.poll(offline.cursor)
        assert poisoned.alarms == [] and bad_inputs("camera") == before + 1
        # What we knew of the camera is kept: still offline and alarmed...
        assert poisoned.cursor["cameras"][GATE] == offline.cursor["cameras"][GATE]
        still = await client.poll(poisoned.cursor)
        assert still.alarms == []  # ...so the next good answer raises nothing new
        account.connect(GATE)
        back = await client.poll(still.cursor)
        assert [a.event_type for a in back.alarms] == [EventType.CAMERA_ONLINE]


@pytest.mark.parametrize(
    "node_list",
    [
        [{"node_id": {"x": 1}, "name": "Gate"}],
        [{"node_id": 140095, "name": "Yard"}, "camera", None],
    ],
)
async def test_an_unreadable_camera_list_forgets_no_camera(node_list: Any) -> None:
    account = CamStreamerAccount(rate_per_s=math.inf)
    options = fast_options(camera_list_refresh_s=0.001)  # the list is read at every poll
    async with (
        CamStreamerSimulator({"default": account}) as sim,
        client_for(sim, options=options) as client,
    ):
        cursor = (await client.poll(None)).cursor
        account.disconnect(GATE)
        cursor = (await client.poll(cursor)).cursor
        offline = await client.poll(cursor)
        assert [a.event_type for a in offline.alarms] == [EventType.CAMERA_OFFLINE]
        before = bad_inputs("camera_node")

        def change(data: dict[str, Any]) -> None:
            data["nodeList"] = node_list

        sim.respond("POST", GRAPHQL, altered(change))
        poisoned = await client.poll(offline.cursor)
        assert poisoned.alarms == [] and bad_inputs("camera_node") > before
        assert poisoned.cursor["cameras"][GATE] == offline.cursor["cameras"][GATE]
        still = await client.poll(poisoned.cursor)
        assert still.alarms == []  # not a "new" camera found offline
        account.connect(GATE)
        back = await client.poll(still.cursor)
        assert [a.event_type for a in back.alarms] == [EventType.CAMERA_ONLINE]


@pytest.mark.parametrize(
    "recordings",
    ["abc", 5, [{}], [None], {"recording_id": "x"}, [{"recording_id": 7}], "camera-as-text"],
)
async def test_unreadable_recordings_are_bad_input(recordings: Any) -> None:
    account = CamStreamerAccount(rate_per_s=math.inf)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        before = bad_inputs("recordings")

        def change(data: dict[str, Any]) -> None:
            if recordings == "camera-as-text":
                data["camera"] = "camera"
            else:
                data["camera"]["recordings"] = recordings

        sim.respond("POST", GRAPHQL, altered(change))
        with pytest.raises(BadDeviceResponse, match="recording_id"):
            await client.media_status(MediaKind.VIDEO, LOCATOR)
        assert bad_inputs("recordings") == before + 1
        # The next good answer works.
        assert (await client.media_status(MediaKind.VIDEO, LOCATOR)).state == "pending"


@pytest.mark.parametrize(
    ("progress", "state", "reported"),
    [
        ("50%", "pending", True),
        (True, "pending", True),
        ({"p": 1}, "pending", True),
        (-5, "pending", False),
        (1e300, "ready", False),  # read as 100: the URL decides
        ("100", "ready", False),
        (None, "pending", False),  # the manual: null while preparing
    ],
)
async def test_odd_progress_values(progress: Any, state: str, reported: bool) -> None:
    # Long enough that the first status (after a login, on a loaded CI machine) still finds
    # the clip preparing: at 0.2 s it once found it ready.
    account = CamStreamerAccount(rate_per_s=math.inf, prepare_seconds=1.0)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        assert (await client.media_status(MediaKind.VIDEO, LOCATOR)).state == "pending"
        (recording,) = account.recordings.values()
        await eventually(lambda: account.progress(recording) == 100, what="prepared")
        before = bad_inputs("recording_progress")
        sim.respond("POST", GRAPHQL, altered(gate_progress(progress)))
        probe = await client.media_status(MediaKind.VIDEO, LOCATOR)
        assert probe.state == state
        assert bad_inputs("recording_progress") == before + (1 if reported else 0)


def gate_progress(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["recording"]["progress"] = value

    return change


async def test_cursor_is_bounded_and_built_from_cleaned_values() -> None:
    cameras = {GATE: "Gate\x00\ud800" + "x" * 5000, YARD: "Yard"}
    account = CamStreamerAccount(rate_per_s=math.inf, cameras=cameras)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        cursor = (await client.poll(None)).cursor
        name = cursor["cameras"][GATE]["name"]
        assert "\x00" not in name and "\ud800" not in name and len(name) <= CURSOR_NAME_LIMIT
        json.dumps(cursor, allow_nan=False)  # storable as jsonb
        # A serial with a NUL is kept, cleaned, like any other id.
        sim.respond("POST", GRAPHQL, altered(gate_field("serial_number", "ACCC\x00")))
        cursor = (await client.poll(cursor)).cursor
        assert "ACCC\ufffd" in cursor["cameras"]
        json.dumps(cursor, allow_nan=False)


@pytest.mark.parametrize(
    "stored",
    [
        {"state": "pending", "since": "abc", "seen": None},
        {"state": "pending", "since": math.nan, "seen": math.inf},
        {"state": "pending", "since": 1e300, "seen": -5},
        {"state": "pending", "since": 4e10, "seen": 1.0},  # year 3237; 1970
        {"state": ["x"], "alarmed": "yes"},
    ],
)
async def test_times_outside_a_sane_window_never_become_alarm_times(stored: Any) -> None:
    account = CamStreamerAccount(rate_per_s=math.inf)
    account.disconnect(GATE)
    async with CamStreamerSimulator({"default": account}) as sim, client_for(sim) as client:
        cursor = {
            "cameras": {GATE: {"node_id": 140094, "name": "Gate", **stored}},
            "budget": {"day": "9999-01-01", "used": "9" * 40},
        }
        result = await client.poll(cursor)
        result = await client.poll(result.cursor) if not result.alarms else result
        for alarm in result.alarms:
            assert plausible_time(alarm.occurred_at)
            assert alarm.raw["occurred_at_is"] == "noticed"
        record = result.cursor["cameras"][GATE]
        for key in ("since", "seen"):
            if key in record:
                assert isinstance(record[key], float) and 9e8 < record[key] < 4e9
        assert client.budget.used < 10
        json.dumps(result.cursor, allow_nan=False)


async def test_hostile_camera_names_reach_postgresql_as_data(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # NUL and a lone surrogate: PostgreSQL refuses both in jsonb, so an uncleaned cursor would
    # jam every commit of the site (no alarm would ever land). The extended schema lets the
    # driver before the fix run too.
    cameras = {GATE: "Gate\x00\ud800" + "x" * 5000, YARD: "Yard"}
    account = CamStreamerAccount(cameras=cameras, recorded=False, schema="extended")
    async with CamStreamerSimulator({"default": account}) as sim:
        options = {"offline_grace_s": 0.5, "daily_limit": 1_000_000}
        site = camstreamer_site("cs", sim.url(), options=options)
        async with running_daemon(app_config(database_url, tmp_path, [site])):
            account.disconnect(GATE)
            row = await eventually(
                lambda: db.fetchrow("SELECT * FROM alarms WHERE event_type = 'camera_offline'"),
                timeout=15,
                what="camera_offline stored",
            )
            cursor = json.loads(
                await db.fetchval("SELECT cursor FROM site_state WHERE site_id = 'cs'")
            )
    assert row["camera_name"].startswith("Gate\ufffd\ufffd")
    stored = cursor["cameras"][GATE]["name"]
    assert stored.startswith("Gate\ufffd\ufffd") and len(stored) <= CURSOR_NAME_LIMIT
