"""The Davantis client against the simulator in each way the manual leaves open: paging
(answer order, `max_date` inclusive or not, ids not rising with time, floods sharing one start
time, a poll's page cap), installation offsets and media token renewal. Real HTTP, the
client the daemon builds; storage is covered by tests/test_davantis_device_quirks.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cms_ingest.domain import Alarm
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.sites import build_site
from cms_ingest.simulators.base import DeviceAnswer
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.vendors.base import PollResult
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL
from cms_ingest.vendors.davantis import DavantisClient
from tests.support import davantis_site

PAGE = 20  # a small device cap keeps these tests fast; the paging is the same at 300
BASE = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
# What the clients of `client_for` report counts here.
CLIENT_METRICS = Metrics()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def client_for(
    sim: DavantisSimulator, session: aiohttp.ClientSession, **options: Any
) -> DavantisClient:
    config = davantis_site("dp", sim.url(), options={"page_cap": PAGE, **options})
    client = build_site(config, session, metrics=CLIENT_METRICS).client
    assert isinstance(client, DavantisClient)
    return client


async def drain(client: DavantisClient, cursor: dict[str, Any]) -> tuple[list[Alarm], int]:
    """Polls until a poll brings nothing and leaves no backlog: (alarms, polls it took)."""
    alarms: list[Alarm] = []
    for polls in range(1, 50):
        result: PollResult = await asyncio.wait_for(client.poll(cursor), timeout=10)
        alarms.extend(result.alarms)
        cursor = dict(result.cursor)
        if not result.alarms and "backlog" not in cursor:
            return alarms, polls
    raise AssertionError("the backlog never drained")


def ids_of(alarms: list[Alarm]) -> list[int]:
    return sorted(int(alarm.source_id) for alarm in alarms)


def bad_input(what: str) -> float:
    return CLIENT_METRICS.sample("cms_ingest_bad_input_total", source="device:davantis", what=what)


# ------------------------------------------------------------------ paging (item 4)


@pytest.mark.parametrize("order", ["time", "id"])
@pytest.mark.parametrize("exclusive", [False, True], ids=["max_date<=", "max_date<"])
async def test_catch_up_with_ties_in_every_order_and_max_date_reading(
    session: aiohttp.ClientSession, order: str, exclusive: bool
) -> None:
    """Seven alarms per start time: page boundaries fall inside groups of equal times. An
    exclusive max_date used to skip the rest of the group cut by each boundary."""
    site = DavantisSite(page_cap=PAGE, order=order, max_date_exclusive=exclusive)
    for index in range(130):
        site.add_alarm(started=BASE + timedelta(seconds=index // 7))
    async with DavantisSimulator({"default": site}) as sim:
        alarms, _ = await drain(client_for(sim, session), {"last_id": 0})
    assert ids_of(alarms) == list(range(1, 131))


@pytest.mark.parametrize("order", ["time", "id"])
@pytest.mark.parametrize("exclusive", [False, True], ids=["dates-inclusive", "dates-exclusive"])
async def test_catch_up_when_ids_do_not_rise_with_time(
    session: aiohttp.ClientSession, exclusive: bool, order: str
) -> None:
    """Start times shuffled against ids (alarms recorded late, a clock set back), listed
    newest start first (the manual's note) or highest id first (its polling sample)."""
    site = DavantisSite(
        page_cap=PAGE, max_date_exclusive=exclusive, min_date_exclusive=exclusive, order=order
    )
    times = [BASE + timedelta(seconds=n) for n in range(150)]
    random.Random(7).shuffle(times)
    for started in times:
        site.add_alarm(started=started)
    async with DavantisSimulator({"default": site}) as sim:
        alarms, _ = await drain(client_for(sim, session), {"last_id": 0})
    # Every one; a part read on in the next poll may bring some again (stored once).
    assert sorted(set(ids_of(alarms))) == list(range(1, 151))


@pytest.mark.parametrize("no_content", ["min_id", "always"])
async def test_empty_answers_as_204_or_an_empty_list(
    session: aiohttp.ClientSession, no_content: str
) -> None:
    """Whether a device answers 204 or [] to a query that finds nothing (the manual shows
    only the min_id poll's 204): a first start on an empty device, then a catch-up whose
    time halves may be empty (order="id": bisected), read alike."""
    site = DavantisSite(page_cap=PAGE, order="id", no_content=no_content)
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        first = await client.poll(None)
        assert first.cursor["last_id"] == 0 and not first.alarms
        times = [BASE + timedelta(seconds=n) for n in range(3 * PAGE)]
        random.Random(3).shuffle(times)
        for started in times:
            site.add_alarm(started=started)
        alarms, _ = await drain(client, dict(first.cursor))
    assert sorted(set(ids_of(alarms))) == list(range(1, 3 * PAGE + 1))


@pytest.mark.parametrize("exclusive", [False, True], ids=["max_date<=", "max_date<"])
async def test_more_alarms_share_one_start_time_than_a_page_holds(
    session: aiohttp.ClientSession, exclusive: bool
) -> None:
    """A flood stamped with one instant: max_date cannot page through it; the camera filter
    does (and the event filter within a camera)."""
    site = DavantisSite(page_cap=PAGE, cameras=4, max_date_exclusive=exclusive)
    site.add_alarms(5, started=BASE - timedelta(minutes=1))
    for index in range(3 * PAGE):
        site.add_alarm(camera=1 + index % 4, event=(1, 2, 11)[index % 3], started=BASE)
    stuck = bad_input("paging_stuck")
    async with DavantisSimulator({"default": site}) as sim:
        alarms, _ = await drain(client_for(sim, session), {"last_id": 0})
    assert ids_of(alarms) == list(range(1, 3 * PAGE + 6))
    assert bad_input("paging_stuck") == stuck


async def test_media_is_found_when_max_date_is_exclusive(session: aiohttp.ClientSession) -> None:
    from cms_ingest.domain import MediaKind

    site = DavantisSite(page_cap=PAGE, max_date_exclusive=True, media_delay=0)
    site.add_alarm(started=BASE)
    site.add_alarms(PAGE + 5)  # newer ones: a min_id query alone does not reach alarm 1
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        await client.poll({"last_id": 0})
        locator = {"alarm_id": 1, "started": site.alarms[0].to_json()["started"]}
        probe = await client.media_status(MediaKind.SNAPSHOT, locator)
    assert probe.state == "ready", probe


# ------------------------------------------------------------------ page cap (issue 15)


async def test_a_device_answering_full_pages_for_ever_costs_one_capped_poll(
    session: aiohttp.ClientSession,
) -> None:
    """A device that ignores max_date and every other filter yet keeps answering full pages
    of new ids: the poll stops after MAX_PAGES_PER_POLL pages instead of never returning."""
    site = DavantisSite(page_cap=PAGE)
    next_id = [10**9]
    requests = [0]

    async def endless(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        requests[0] += 1
        page = []
        for _ in range(PAGE):
            page.append(
                {"id": next_id[0], "idevent": 1, "idcamera": 1, "started": "2026-11-02T08:00:00Z"}
            )
            next_id[0] -= 1
        return web.json_response(page)

    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        sim.respond("GET", "/alarms", endless, times=None)
        result = await asyncio.wait_for(client.poll({"last_id": 5}), timeout=10)
    # The pages, and one look for the cursor's own alarm (not among them: a reset check).
    assert requests[0] <= MAX_PAGES_PER_POLL + 1
    assert len(result.alarms) == MAX_PAGES_PER_POLL * PAGE  # every alarm of its pages kept
    assert "backlog" in result.cursor  # and the rest is asked for next poll


async def test_a_catch_up_longer_than_the_page_cap_arrives_over_the_next_polls(
    session: aiohttp.ClientSession,
) -> None:
    site = DavantisSite(page_cap=PAGE)
    site.add_alarms(3)
    total = MAX_PAGES_PER_POLL * PAGE * 2 + 37  # two and a bit polls' worth
    site.add_alarms(total)
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        first = await client.poll({"last_id": 3})
        assert len(first.alarms) <= MAX_PAGES_PER_POLL * PAGE
        assert first.cursor["backlog"][0]["min_id"] == "3"  # above the stored cursor
        site.add_alarms(4)  # new ones keep arriving during the catch-up
        rest, polls = await drain(client, dict(first.cursor))
    got = ids_of(first.alarms + rest)
    assert sorted(set(got)) == list(range(4, total + 8))  # every one
    # Each page boundary is read again (the overlap); the unique key stores those once.
    assert len(got) - len(set(got)) <= 2 * polls
    assert polls >= 2


# ------------------------------------------------------------------ plausible times and ids


async def test_an_implausible_time_never_becomes_a_paging_bound(
    session: aiohttp.ClientSession,
) -> None:
    """The device lists by id; alarm 8 says 1990. Paging back from 1990 skipped 1 to 7."""
    site = DavantisSite(page_cap=5, order="id")
    for index in range(1, 13):
        started = (
            datetime(1990, 1, 1, tzinfo=UTC) if index == 8 else BASE + timedelta(seconds=index)
        )
        site.add_alarm(started=started)
    reported = bad_input("implausible_time")
    async with DavantisSimulator({"default": site}) as sim:
        config = davantis_site("dp", sim.url(), options={"page_cap": 5})
        client = build_site(config, session, metrics=CLIENT_METRICS).client
        assert isinstance(client, DavantisClient)
        alarms, _ = await drain(client, {"last_id": 0})
    assert ids_of(alarms) == list(range(1, 13))
    assert bad_input("implausible_time") > reported


async def test_a_lone_huge_id_does_not_hide_the_alarms_after_it(
    session: aiohttp.ClientSession,
) -> None:
    site = DavantisSite()
    site.add_alarms(10)
    site.add_alarm(overrides={"id": 10**15})  # the device's 11th alarm, with a bogus id
    reported = bad_input("implausible_alarm_id")
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session, page_cap=300)
        first = await client.poll({"last_id": 10})
        assert [a.source_id for a in first.alarms] == [str(10**15)]  # stored, not lost
        assert first.cursor["last_id"] == 10
        site.add_alarms(2)  # 12 and 13: below the bogus id
        second = await client.poll(dict(first.cursor))
    assert {a.source_id for a in second.alarms} >= {"12", "13"}
    assert second.cursor["last_id"] == 13
    assert bad_input("implausible_alarm_id") == reported + 1  # once, not every poll


# ------------------------------------------------------------------ offsets (item 1)

WINTER = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)  # Madrid +01:00
SUMMER = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)  # Madrid +02:00


@pytest.mark.parametrize(
    ("offset", "zone"),
    [
        ("+01:00", "Etc/GMT-1"),
        ("+0100", "Etc/GMT-1"),
        ("+1", "Etc/GMT-1"),
        ("1", "Etc/GMT-1"),
        (1, "Etc/GMT-1"),
        (60, "Etc/GMT-1"),
        ("-300", "Etc/GMT+5"),
        ("UTC+05:30", "Asia/Kolkata"),
        ("Asia/Kolkata", "Asia/Kolkata"),
    ],
)
async def test_every_form_of_current_utc_offset(
    session: aiohttp.ClientSession, offset: Any, zone: str
) -> None:
    site = DavantisSite(utc_offset=offset, time_zone=zone, local_times=True)
    site.add_alarm(started=WINTER)
    async with DavantisSimulator({"default": site}) as sim:
        result = await client_for(sim, session).poll({"last_id": 0})
    assert "+" not in str(site.alarms[0].to_json(local=site.zone)["started"])  # naive
    assert [alarm.occurred_at for alarm in result.alarms] == [WINTER]


@pytest.mark.parametrize(
    ("offset", "options"),
    [("Europe/Madrid", {}), ("+02:00", {"time_zone": "Europe/Madrid"})],
    ids=["zone-name-from-device", "fixed-offset-and-site-time-zone"],
)
async def test_alarms_from_before_a_dst_change_keep_their_hour(
    session: aiohttp.ClientSession, offset: str, options: dict[str, Any]
) -> None:
    site = DavantisSite(utc_offset=offset, time_zone="Europe/Madrid", local_times=True)
    site.add_alarm(started=WINTER)
    site.add_alarm(started=SUMMER)
    async with DavantisSimulator({"default": site}) as sim:
        result = await client_for(sim, session, **options).poll({"last_id": 0})
    assert [alarm.occurred_at for alarm in result.alarms] == [WINTER, SUMMER]


@pytest.mark.parametrize(
    "offset",
    ["local time", 2**63, int("1" * 415)],
    ids=["text", "huge-number-fuzz", "beyond-any-float-fuzz"],
)
async def test_an_unreadable_offset_is_reported_once_not_taken_silently(
    session: aiohttp.ClientSession, offset: Any
) -> None:
    site = DavantisSite(utc_offset=offset, local_times=False)
    site.add_alarm(started=WINTER)
    reported = bad_input("utc_offset")
    async with DavantisSimulator({"default": site}) as sim:
        result = await client_for(sim, session).poll({"last_id": 0})
    assert bad_input("utc_offset") == reported + 1
    # A time with its own offset needs no installation offset.
    assert [alarm.occurred_at for alarm in result.alarms] == [WINTER]


# ------------------------------------------------------------------ media token (item 3)


@pytest.mark.parametrize("status", [401, 403, 400])
async def test_media_download_renews_a_token_the_device_says_expired(
    session: aiohttp.ClientSession, status: int
) -> None:
    site = DavantisSite(media_delay=0, token_error_status=status)
    site.add_alarm()
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        await client.poll(None)
        site.expire_access_tokens()
        async with client.download("/alarms/1/snapshot") as download:
            body = b"".join([chunk async for chunk in download.chunks])
    assert body[:2] == b"\xff\xd8"
    assert site.refreshes == 1


def test_the_site_time_zone_option_must_name_a_known_zone() -> None:
    from pydantic import ValidationError

    from cms_ingest.vendors.davantis import DavantisOptions

    assert DavantisOptions(time_zone="Europe/Madrid").time_zone == "Europe/Madrid"
    with pytest.raises(ValidationError, match="unknown time zone"):
        DavantisOptions(time_zone="Mars/Olympus_Mons")


async def test_a_device_ignoring_max_date_is_read_through_its_other_filters(
    session: aiohttp.ClientSession,
) -> None:
    site = DavantisSite(page_cap=PAGE, cameras=4, ignore_max_date=True)
    for index in range(5 * PAGE):  # 4 cameras x 3 events: under a page each
        site.add_alarm(camera=1 + index % 4, event=(1, 2, 11)[index % 3])
    async with DavantisSimulator({"default": site}) as sim:
        alarms, polls = await drain(client_for(sim, session), {"last_id": 0})
    assert sorted(set(ids_of(alarms))) == list(range(1, 5 * PAGE + 1))
    assert polls > 2  # 4 cameras x 9 events is more than one poll's pages: it went on
    # And where not even that narrows it, it says so (once per site), and the poll ends.
    crowded = DavantisSite(page_cap=PAGE, cameras=1, ignore_max_date=True)
    crowded.add_alarms(2 * PAGE, camera=1, event=11)
    stuck = bad_input("paging_stuck")
    async with DavantisSimulator({"default": crowded}) as sim:
        result = await asyncio.wait_for(client_for(sim, session).poll({"last_id": 0}), 10)
    assert len(result.alarms) == PAGE
    assert bad_input("paging_stuck") == stuck + 1


@pytest.mark.parametrize(
    ("offset", "mark", "detail"),
    [
        ("Europe/Madrid", "PASS", "zone Europe/Madrid"),
        ("+01:00", "PASS", "fixed offset UTC+01:00"),
        ("local time", "FAIL", "set the site option time_zone"),
    ],
)
async def test_probe_shows_how_times_will_be_read(offset: str, mark: str, detail: str) -> None:
    import io

    from cms_ingest.probe import run_probe

    site = DavantisSite(media_delay=0, utc_offset=offset)
    site.add_alarm()
    out = io.StringIO()
    async with DavantisSimulator({"default": site}) as sim:
        await run_probe(davantis_site("dp", sim.url()), out=out)
    report = out.getvalue()
    assert f"[{mark}] installation time zone" in report, report
    assert detail in report


async def test_a_reset_is_seen_when_cra_hides_the_id_of_the_cursor(
    session: aiohttp.ClientSession,
) -> None:
    """After the reset the device's new alarm 10 was raised while disarmed: cra=yes does not
    list it, while 11 and 12 are listed. The old alarm 10 is asked for without cra."""
    site = DavantisSite()
    site.add_alarms(10)
    resets = CLIENT_METRICS.sample("cms_ingest_device_resets_total", vendor="davantis")
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        first = await client.poll(None)
        assert first.cursor["last_id"] == 10
        site.factory_reset()
        site.add_alarms(9)
        site.add_alarm(armed=False)
        site.add_alarms(2)
        result = await client.poll(dict(first.cursor))
    life = result.cursor["life"]
    expected = [f"{n}@{life}" for n in (*range(1, 10), 11, 12)]
    assert [alarm.source_id for alarm in result.alarms] == expected
    assert CLIENT_METRICS.sample("cms_ingest_device_resets_total", vendor="davantis") == resets + 1


async def test_a_firmware_writing_times_differently_is_no_reset(
    session: aiohttp.ClientSession,
) -> None:
    """The cursor's alarm was read as local time without an offset; after an update the
    device writes the same instant with its offset. Same alarm: no new device life."""
    site = DavantisSite(utc_offset="Europe/Madrid", time_zone="Europe/Madrid", local_times=True)
    site.add_alarms(3)
    resets = CLIENT_METRICS.sample("cms_ingest_device_resets_total", vendor="davantis")
    async with DavantisSimulator({"default": site}) as sim:
        client = client_for(sim, session)
        first = await client.poll(None)
        assert "+" not in str(first.cursor["last_started"])
        site.local_times = False
        site.add_alarm()
        result = await client.poll(dict(first.cursor))
    assert [alarm.source_id for alarm in result.alarms] == ["4"]
    assert "life" not in result.cursor
    assert CLIENT_METRICS.sample("cms_ingest_device_resets_total", vendor="davantis") == resets
