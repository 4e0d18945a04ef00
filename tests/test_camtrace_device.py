"""The CamTrace client against the simulator in each mode the manual leaves open (issue 13),
and against poison answers (issue 15). Real HTTP; the client is driven poll by poll with the
cursor it returns, as the poller would (storage is covered in test_camtrace.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from cms_ingest.domain import Alarm, EventType, MediaKind
from cms_ingest.probe import run_probe
from cms_ingest.simulators.base import DeviceAnswer, static_answer
from cms_ingest.simulators.camtrace import (
    SLICE_BYTES,
    CamTraceSimulator,
    CamTraceSite,
    iso_z,
    parse_alarm_query,
)
from cms_ingest.sitehttp import SiteHttp
from cms_ingest.vendors.base import AuthenticationFailed, BadDeviceResponse, Cursor, VendorContext
from cms_ingest.vendors.camtrace import CamTraceClient, CamTraceOptions, alarm_type
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL
from tests.conftest import eventually
from tests.support import camtrace_site

ALARMS = "/api/v1.2/cameras/alarms"


class Problems:
    """A SiteReporter that keeps what it is told."""

    def __init__(self) -> None:
        self.reported: list[tuple[str, str]] = []
        self.resets: list[str] = []

    def bad_input(self, what: str, detail: str) -> None:
        self.reported.append((what, detail))

    def clock_skew(self, seconds: float) -> None:
        pass

    def device_reset(self, detail: str) -> None:
        self.resets.append(detail)

    def device_health(self, component: str, healthy: bool) -> None:
        pass

    def api_budget(self, remaining: float) -> None:
        pass

    def kinds(self) -> set[str]:
        return {what for what, _ in self.reported}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


class Driver:
    """A client and its cursor, polled the way the poller does (cursor of each poll kept)."""

    def __init__(self, client: CamTraceClient, problems: Problems) -> None:
        self.client, self.problems = client, problems
        self.cursor: Cursor | None = None
        self.stored: dict[str, Alarm] = {}

    async def poll(self) -> list[Alarm]:
        result = await self.client.poll(self.cursor)
        self.cursor = json.loads(json.dumps(result.cursor))  # as stored: JSON
        for alarm in result.alarms:
            assert alarm.source_id not in self.stored, f"{alarm.source_id} returned twice"
            self.stored[alarm.source_id] = alarm
        return result.alarms

    def ids(self) -> list[str]:
        return sorted(self.stored, key=lambda key: (len(key), key))


def driver(session: aiohttp.ClientSession, url: str, **options: Any) -> Driver:
    problems = Problems()
    context = VendorContext(
        site_id="c1",
        http=SiteHttp(session, url, timeout_s=5.0),
        problems=problems,
        username="cms",
        password="secret",
    )
    defaults: dict[str, Any] = {"connection_log_interval_s": 1e-9}  # every poll
    return Driver(CamTraceClient(context, CamTraceOptions(**(defaults | options))), problems)


def source_ids(alarms: list[Alarm]) -> list[str]:
    return [alarm.source_id for alarm in alarms]


# ------------------------------------------------------------------ a reset server


@pytest.mark.parametrize("order", ["id", "time"])
async def test_a_server_whose_ids_start_again_is_a_new_life(
    session: aiohttp.ClientSession, order: str
) -> None:
    site = CamTraceSite(media_delay=0, order=order)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)  # the new life spans pages
        await device.poll()
        site.add_alarms(10, camera=1, recording=False)
        assert len(await device.poll()) == 10
        site.reset()  # factory reset: ids start again at 1, other times and cameras
        site.add_alarms(10, camera=2, recording=False)
        after = await device.poll()
        assert len(after) == 10 and len(device.problems.resets) == 1
        assert all("@" in key and key.split("@")[0].isdigit() for key in source_ids(after))
        assert len(device.stored) == 20  # 20 of 20, none stored twice
        site.add_alarm(camera=3, recording=False)
        assert [key.split("@")[0] for key in source_ids(await device.poll())] == ["11"]
        assert len(device.problems.resets) == 1  # once, not on every poll of the new life


@pytest.mark.parametrize("precision", ["ms", "s"])
async def test_alarm_times_to_the_millisecond_or_the_second(
    session: aiohttp.ClientSession, precision: str
) -> None:
    """The manual writes alarm times to the second: many alarms then share one `time`.
    Paged, none is lost or returned twice, none passes for a reset; a real reset is seen."""
    site = CamTraceSite(media_delay=0, time_precision=precision)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        site.add_alarms(23, camera=1, recording=False)
        assert len(await device.poll()) == 23
        if precision == "s":
            assert "." not in device.stored["23"].raw["time"]
        site.add_alarms(4, camera=1, recording=False)
        assert source_ids(await device.poll()) == [str(n) for n in range(24, 28)]
        assert device.problems.resets == []
        site.reset()
        site.add_alarms(3, camera=2, recording=False)
        assert len(await device.poll()) == 3 and len(device.problems.resets) == 1
    assert len(device.stored) == 30


async def test_a_reset_seen_by_its_newest_id_below_the_cursor(
    session: aiohttp.ClientSession,
) -> None:
    """The new server's ids do not overlap the alarms the cursor remembers."""
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarms(100, recording=False)
        await device.poll()
        site.reset()
        site.add_alarms(5, recording=False)
        assert len(await device.poll()) == 5
        assert device.problems.resets and "below the cursor" in device.problems.resets[0]


@pytest.mark.parametrize("auth", ["wsse", "basic"])
async def test_alarms_the_server_still_lists_are_no_reset(
    session: aiohttp.ClientSession, auth: str
) -> None:
    """Nor is a server clock 20 s ahead a clock step (the Date header's second resolution)."""
    site = CamTraceSite(media_delay=0, order="time", clock_offset_s=20.0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), auth=auth, allow_basic_over_http=True)
        with capture_logs() as logs:
            await device.poll()
            for _ in range(5):
                site.add_alarms(3, recording=False)
                await device.poll()
        assert device.problems.resets == [] and len(device.stored) == 15
        assert not [e for e in logs if e["event"] == "server_clock_stepped_back"]


# ------------------------------------------------------------------ paging


async def test_a_link_naming_another_host_never_stalls_the_site(
    session: aiohttp.ClientSession,
) -> None:
    """Behind NAT the server writes its own name in `Link`: we page by offset on the
    configured origin (nothing is sent to demo.camtrace.com)."""
    site = CamTraceSite(media_delay=0, link_host="demo.camtrace.com")
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        site.add_alarms(23, recording=False)
        assert len(await device.poll()) == 23
        site.add_alarms(7, recording=False)
        assert len(await device.poll()) == 7


@pytest.mark.parametrize("order", ["id", "time"])
async def test_a_poll_reads_at_most_the_page_cap_and_the_rest_next_poll(
    session: aiohttp.ClientSession, order: str
) -> None:
    site = CamTraceSite(media_delay=0, order=order)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        site.add_alarms(5 * MAX_PAGES_PER_POLL + 37, recording=False)
        before = site.requests[f"GET {ALARMS}"]
        first = await device.poll()
        assert site.requests[f"GET {ALARMS}"] - before <= MAX_PAGES_PER_POLL
        assert 0 < len(first) <= 5 * MAX_PAGES_PER_POLL
        site.inject_on_page_request(0, 4, recording=False)  # more while catching up
        for _ in range(5):
            await device.poll()
        assert device.ids() == [str(n) for n in range(1, 5 * MAX_PAGES_PER_POLL + 37 + 5)]


async def test_a_backfill_arrives_over_the_next_polls(session: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0)
    site.add_alarms(30, recording=False)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5, backfill=3600)
        assert await device.poll() == []
        for _ in range(3):
            await device.poll()
        assert device.ids() == [str(n) for n in range(1, 31)]


# ------------------------------------------------------------------ the watermark


@pytest.mark.parametrize("order", ["id", "time"])
async def test_a_server_clock_stepped_back_loses_no_alarm(
    session: aiohttp.ClientSession, order: str
) -> None:
    """Listed by time, the new alarms sort below more than a page of older ones stamped
    ahead of the stepped-back clock: they are still found."""
    site = CamTraceSite(media_delay=0, order=order)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        site.add_alarms(12, recording=False)
        assert len(await device.poll()) == 12
        site.clock_offset_s = -900.0  # NTP steps the server's clock back 15 minutes
        site.add_alarms(2, recording=False)
        await device.poll()
        site.add_alarm(recording=False)
        await device.poll()
        site.add_alarm(recording=False)
        await device.poll()
        assert device.ids() == [str(n) for n in range(1, 17)]


async def test_a_quiet_poll_after_a_burst_reads_one_page(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        site.add_alarms(60, recording=False)
        assert len(await device.poll()) == 60
        before = site.requests[f"GET {ALARMS}"]
        assert await device.poll() == []
        assert site.requests[f"GET {ALARMS}"] - before == 1  # not the 12 pages of the window


async def test_an_alarm_stamped_9999_hides_nothing(session: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(time=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), recording=False)
        (odd,) = await device.poll()
        assert odd.occurred_at.year < 9999 and "implausible_time" in device.problems.kinds()
        assert device.cursor is not None
        assert not str(device.cursor["watermark"]).startswith("9999")  # never a watermark
        site.add_alarms(2, recording=False)
        assert source_ids(await device.poll()) == ["2", "3"]


@pytest.mark.parametrize("year", [1, 9999])
async def test_a_video_locator_of_an_implausible_time_is_unavailable(
    session: aiohttp.ClientSession, year: int
) -> None:
    """A locator stored with such a time (bench/fuzz.py found one) asks for no slice window:
    one second before year 1 or after 9999 is no datetime (OverflowError, every retry)."""
    async with CamTraceSimulator({"default": CamTraceSite(media_delay=0)}) as sim:
        device = driver(session, sim.url())
        when = datetime(year, 1 if year == 1 else 12, 1, tzinfo=UTC).isoformat()
        locator = {"camera_id": 1, "record_time": when, "time": when}
        probe = await device.client.media_status(MediaKind.VIDEO, locator)
    assert probe.state == "unavailable" and "not plausible" in probe.detail


async def test_a_first_poll_on_an_alarm_stamped_year_1(session: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        sim.respond("GET", ALARMS, _rewrite({1: {"time": "0001-01-01T00:00:00Z"}}), times=None)
        site.add_alarm(recording=False)
        await device.poll()
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["2"]
        assert source_ids(await device.poll()) == []


async def test_an_old_cursor_with_a_poisoned_time_is_read_again(
    session: aiohttp.ClientSession,
) -> None:
    """A cursor an older version stored (last_time 9999) recovers instead of hiding all."""
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        site.add_alarms(2, recording=False)
        device.cursor = {"last_id": 2, "last_time": "9999-12-31T23:59:59Z"}
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["3"]
        assert "cursor_time" in device.problems.kinds()


# ------------------------------------------------------------------ poison answers


def _rewrite(changes: dict[int, dict[str, Any]]) -> Any:
    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        payload = json.loads(response.body)
        payload["alarms"] = [{**a, **changes.get(a["id"], {})} for a in payload["alarms"]]
        rewritten = web.json_response(payload)
        for header in ("Link", "Date"):
            if header in response.headers:
                rewritten.headers[header] = response.headers[header]
        return rewritten

    return answer


def _server_time_of(stamp: str) -> Any:
    """getservertime answering `stamp`; its Date header stays the server's (every answer
    carries one)."""

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        body = '{"serverTime": {"timestamp": ' + stamp + ', "timezone": "Europe/Paris"}}'
        poisoned = web.Response(body=body, content_type="application/json")
        poisoned.headers["Date"] = response.headers["Date"]
        return poisoned

    return answer


@pytest.mark.parametrize("stamp", ["1e20", "1" + "0" * 400, '"soon"', "-1e20"])
async def test_a_poisoned_server_time_is_not_learned(
    session: aiohttp.ClientSession, stamp: str
) -> None:
    site = CamTraceSite(media_delay=0, clock_offset_s=20.0)
    async with CamTraceSimulator({"default": site}) as sim:
        sim.respond("GET", "/api/v1.2/getservertime", _server_time_of(stamp), times=None)
        device = driver(session, sim.url())
        await device.poll()  # the Date header gives the clock instead
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["1"]
        assert "server_time" in device.problems.kinds()


async def test_a_server_time_nothing_confirms_is_measured_again(
    session: aiohttp.ClientSession,
) -> None:
    """No usable clock at all (a poisoned getservertime, no Date): the next good answer is
    learned, not only after a 401."""
    site = CamTraceSite(media_delay=0, clock_offset_s=20.0)
    async with CamTraceSimulator({"default": site}) as sim:
        poison = static_answer(200, '{"serverTime": {"timestamp": 1e20}}')
        sim.respond("GET", "/api/v1.2/getservertime", poison, times=None)
        device = driver(session, sim.url())
        with pytest.raises(AuthenticationFailed):
            await device.poll()
        sim.unscript("GET", "/api/v1.2/getservertime")
        await device.poll()
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["1"]


@pytest.mark.parametrize(
    ("salt", "why"),
    [
        ("x", "is not one"),
        ("$2y$10$short", "is not one"),
        ("$2y$31$" + "a" * 22, "cost 31"),
        ("$2y$99$" + "a" * 22, "cost 99"),
    ],
)
async def test_a_poisoned_salt_is_a_vendor_error(
    session: aiohttp.ClientSession, salt: str, why: str
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        methods = json.dumps({"auth": [{"type": "wsse", "salt": salt}]})
        sim.respond("GET", "/api/v1.2/users/cms/auth", static_answer(200, methods), times=None)
        device = driver(session, sim.url())
        started = time.monotonic()
        with pytest.raises(BadDeviceResponse, match=why.replace("$", r"\$")):
            await device.poll()
        assert time.monotonic() - started < 2.0  # never hours of bcrypt


def test_alarm_type_is_linear_on_hostile_descriptions() -> None:
    started = time.monotonic()
    assert alarm_type(" " * 3000 + "x") == "X"
    assert alarm_type("\t" * 100_000 + "alarmx") == "ALARMX"
    assert time.monotonic() - started < 0.1  # the old pattern: 29 s on the first one


async def test_a_hostile_description_does_not_block_the_poll(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(description=" " * 3000 + "x", recording=False)
        started = time.monotonic()
        (alarm,) = await device.poll()
        assert time.monotonic() - started < 1.0 and alarm.vendor_event == "X"


# ------------------------------------------------------------------ media


async def test_a_video_is_fetched_whatever_the_camera_records_now(
    session: aiohttp.ClientSession,
) -> None:
    """`isRecordingAlarm` is the camera's live state: false once the slice is closed."""
    site = CamTraceSite(media_delay=0, slice_after_s=0.5)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), slice_settle_s=0)
        await device.poll()  # the camera list is read while no camera records
        site.add_alarm(camera=2)
        (alarm,) = await device.poll()
        video = next(m for m in alarm.media if m.kind is MediaKind.VIDEO)
        assert video.available

        async def ready() -> bool:
            probe = await device.client.media_status(MediaKind.VIDEO, video.locator)
            assert probe.state != "unavailable", probe.detail
            return probe.state == "ready"

        await eventually(ready, what="the alarm slice")


@pytest.mark.parametrize("open_stop", ["null", "moving"])
async def test_a_slice_still_recording_is_not_fetched_truncated(
    session: aiohttp.ClientSession, open_stop: str
) -> None:
    site = CamTraceSite(media_delay=0, slice_after_s=2.0, open_slice_stop=open_stop)
    site.add_alarm(camera=1)  # the camera records an alarm while its state is first read
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), slice_settle_s=1.0)
        await device.poll()
        site.add_alarm(camera=1)
        (alarm,) = await device.poll()
        video = next(m for m in alarm.media if m.kind is MediaKind.VIDEO)
        probe = await device.client.media_status(MediaKind.VIDEO, video.locator)
        assert probe.state == "pending", probe  # open: its stop still moves

        async def ready() -> str | None:
            probe = await device.client.media_status(MediaKind.VIDEO, video.locator)
            return probe.path if probe.state == "ready" else None

        path = await eventually(ready, what="the closed slice")
        async with device.client.download(path) as download:
            body = b"".join([chunk async for chunk in download.chunks])
        assert len(body) == SLICE_BYTES  # whole, not the part recorded so far


async def test_an_alarm_without_snapshot_has_none_to_fetch(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(recording=False, snapshot=False)
        site.add_alarm(recording=False)
        without, with_images = await device.poll()
        kinds = {m.kind: m.available for m in without.media}
        assert kinds == {
            MediaKind.SNAPSHOT: False,
            MediaKind.THUMBNAIL: False,
            MediaKind.VIDEO: False,
        }
        kinds = {m.kind: m.available for m in with_images.media}
        assert kinds[MediaKind.SNAPSHOT] and kinds[MediaKind.THUMBNAIL]
        thumbnail = next(m for m in with_images.media if m.kind is MediaKind.THUMBNAIL)
        assert thumbnail.locator["path"].endswith(".jpg?w=50&h=50")


# ------------------------------------------------------------------ alarm types


@pytest.mark.parametrize("form", ["suffixed", "bare"])
async def test_custom_trigger_types_are_input_without_configuration(
    session: aiohttp.ClientSession, form: str
) -> None:
    site = CamTraceSite(media_delay=0, trigger_description=form)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.trigger_alarm([1], "porte1")
        site.trigger_alarm([2])
        site.add_alarm(description="MOTION Alarm starts at 12/09/2014 at 11:44:07")
        alarms = await device.poll()
        assert [a.event_type for a in alarms] == [
            EventType.INPUT,
            EventType.INPUT,
            EventType.MOTION,
        ]
        assert alarms[0].vendor_event == "PORTE1"


# ------------------------------------------------------------------ camera connection log


async def test_camera_connections_become_offline_and_online_alarms(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        down = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
        site.camera_connection(2, False, time=down)
        (offline,) = await device.poll()
        assert offline.event_type is EventType.CAMERA_OFFLINE
        assert offline.occurred_at == down and offline.camera_id == "2"
        assert offline.camera_name == "Car park" and len(offline.raw["connections"]) == 2
        assert await device.poll() == []
        # Our outage: the camera comes back and goes again while nobody polls.
        site.camera_connection(2, True)
        site.camera_connection(2, False, time=site.now() + timedelta(seconds=1))
        later = await device.poll()
        assert [a.event_type for a in later] == [EventType.CAMERA_ONLINE, EventType.CAMERA_OFFLINE]
        assert len(set(device.stored)) == 3


async def test_a_connection_log_only_answering_post_is_read(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0, connections_methods=("POST",))
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.camera_connection(1, False)
        assert [a.event_type for a in await device.poll()] == [EventType.CAMERA_OFFLINE]


async def test_without_the_admin_profile_alarms_still_arrive(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0, admin=False)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["1"]
        assert "connection_log" in device.problems.kinds()


# ------------------------------------------------------------------ commissioning probe


async def test_probe_reports_the_camtrace_checks() -> None:
    site = CamTraceSite(media_delay=0, link_host="demo.camtrace.com")
    site.add_alarms(3, recording=False)
    async with CamTraceSimulator({"default": site}) as sim:
        out = io.StringIO()
        assert await run_probe(camtrace_site("ct", sim.url()), out=out) == 0, out.getvalue()
        report = out.getvalue()
        assert "[PASS] server time (getservertime)" in report and "Europe/Paris" in report
        assert "[PASS] alarm list paging" in report and "demo.camtrace.com" in report
        assert "[PASS] camera connection log readable" in report
        site.admin = False
        out = io.StringIO()
        assert await run_probe(camtrace_site("ct", sim.url()), out=out) == 1
        assert "[FAIL] camera connection log readable" in out.getvalue()
        assert "Admin profile" in out.getvalue()


async def test_an_inventory_of_odd_shape_is_no_crash(session: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        sim.respond("GET", "/api/v1.2/exturls", static_answer(200, "[1, 2]"), times=None)
        sim.respond("GET", "/api/v1.2/scenarios", static_answer(200, '"none"'), times=None)
        device = driver(session, sim.url())
        inventory = await device.client.describe()  # was: AttributeError on a list
        assert inventory["commands (exturls)"] == [] and inventory["scenarios"] == []


async def test_a_cursor_stored_by_the_previous_version_goes_on(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        site.add_alarms(2, recording=False)
        device.cursor = {"last_id": 2, "last_time": iso_z(site.alarms[-1].time)}
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["3"]
        assert device.problems.kinds() == set() and device.problems.resets == []


async def test_a_connection_log_longer_than_the_page_cap_arrives_over_polls(
    session: aiohttp.ClientSession,
) -> None:
    """After a long outage of ours: the newest pages first, the older part on the next polls
    (an entry at the boundary may come twice; its source id is the same, stored once)."""
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=2)
        await device.poll()
        start = site.now().replace(microsecond=0) - timedelta(seconds=60)
        for camera in range(1, 31):  # 60 lines, over the 40 that 20 pages of 2 hold
            site.camera_connection(camera, False, time=start + timedelta(seconds=camera))
        seen: set[str] = set()
        for _ in range(3):
            result = await device.client.poll(device.cursor)
            device.cursor = json.loads(json.dumps(result.cursor))
            seen |= {alarm.source_id for alarm in result.alarms}
        assert len(seen) == 30
        assert device.cursor is not None and "until" not in device.cursor["connections"]
        site.camera_connection(2, True)
        result = await device.client.poll(device.cursor)
        assert [alarm.event_type for alarm in result.alarms] == [EventType.CAMERA_ONLINE]


async def test_each_custom_type_is_logged_once(session: aiohttp.ClientSession) -> None:
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        with capture_logs() as logs:
            for _ in range(3):
                site.trigger_alarm([1, 2], "porte1")
                await device.poll()
        said = [e for e in logs if e["event"] == "camtrace_custom_alarm_type"]
        assert [e["vendor_event"] for e in said] == ["PORTE1"]


async def test_a_quiet_poll_leaves_the_cursor_as_it_was(session: aiohttp.ClientSession) -> None:
    """Nothing new, no cursor change: the poller then writes nothing to the database."""
    site = CamTraceSite(media_delay=0)
    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(recording=False)
        site.camera_connection(1, False)
        assert len(await device.poll()) == 2
        settled = device.cursor
        for _ in range(3):
            assert await device.poll() == []
            assert device.cursor == settled


async def test_a_server_ignoring_offset_does_not_hold_the_site(
    session: aiohttp.ClientSession,
) -> None:
    site = CamTraceSite(media_delay=0)

    async def first_page_always(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        page, _ = site.find_alarms(parse_alarm_query({**request.query, "offset": "0"}))
        answer = web.json_response({"alarms": [alarm.to_json() for alarm in page]})
        answer.headers["Link"] = '<//demo.camtrace.com/api/v1.2/cameras/alarms>; rel="next"'
        return answer

    async with CamTraceSimulator({"default": site}) as sim:
        device = driver(session, sim.url(), page_size=5)
        await device.poll()
        sim.respond("GET", ALARMS, first_page_always, times=None)
        site.add_alarms(12, recording=False)
        before = site.requests[f"GET {ALARMS}"]
        assert source_ids(await device.poll()) == ["8", "9", "10", "11", "12"]
        assert site.requests[f"GET {ALARMS}"] - before == 2
        assert "paging_ignored" in device.problems.kinds()
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["13"]  # the site goes on


async def test_a_date_header_from_a_reverse_proxy_hides_no_alarm(
    session: aiohttp.ClientSession,
) -> None:
    """Behind a reverse proxy `Date` is the proxy's clock; the server's runs 10 minutes late
    and stamps its alarms with it: the window starts at the earlier of the two clocks (the
    one getservertime gave)."""
    site = CamTraceSite(media_delay=0, clock_offset_s=-600.0)

    async def proxy_date(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        response = await device()
        response.headers["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        return response

    async with CamTraceSimulator({"default": site}) as sim:
        sim.respond("GET", ALARMS, proxy_date, times=None)
        device = driver(session, sim.url())
        await device.poll()
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["1"]
        site.add_alarm(recording=False)
        assert source_ids(await device.poll()) == ["2"]
