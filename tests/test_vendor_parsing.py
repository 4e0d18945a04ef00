"""Device input every vendor reads alike (`vendors.common`), and the crashes it prevents:
an odd id, time or answer is reported as bad input, never an exception out of a poll."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest

from cms_ingest.domain import Action
from cms_ingest.simulators.base import static_answer
from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from cms_ingest.sitehttp import SiteHttp
from cms_ingest.vendors import build_client
from cms_ingest.vendors.base import BadDeviceResponse, InvalidAction, VendorClient, VendorContext
from cms_ingest.vendors.camstreamer import QueryBudget
from cms_ingest.vendors.common import (
    MAX_JSON_BYTES,
    UnreadableJson,
    _load_json_slowly,
    as_id,
    json_deeper_than,
    load_json,
    parse_time,
)
from tests.conftest import eventually
from tests.support import CREDENTIALS, free_port


class Problems:
    """A SiteReporter that keeps what it is told."""

    def __init__(self) -> None:
        self.reported: list[str] = []

    def bad_input(self, what: str, detail: str) -> None:
        self.reported.append(what)

    def clock_skew(self, seconds: float) -> None:
        pass

    def device_reset(self, detail: str) -> None:
        self.reported.append("device_reset")

    def device_health(self, component: str, healthy: bool) -> None:
        pass

    def api_budget(self, remaining: float) -> None:
        pass


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def client(vendor: str, url: str, session: aiohttp.ClientSession, problems: Problems) -> Any:
    credentials = CREDENTIALS[vendor]
    context = VendorContext(
        site_id="s1",
        http=SiteHttp(session, url, timeout_s=2.0),
        problems=problems,
        username=credentials.get("username", ""),
        password=credentials["password"].get_secret_value() if "password" in credentials else "",
    )
    return build_client(vendor, context, {})


def action(kind: str, target: str) -> Action:
    return Action(
        id=1, site_id="s1", kind=kind, target=target, params={}, attempts=0, not_after=None
    )


# ---------------------------------------------------------------------- ids and times


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        (0, 0),
        ("42", 42),
        (" 42 ", 42),  # blanks around it, as operators type targets
        ("9" * 18, int("9" * 18)),
        ("9" * 19, None),  # past a signed 64-bit integer
        ("9" * 5000, None),  # int() refuses over 4300 digits
        ("²", None),  # "²".isdigit() is true, int("²") fails
        ("٣", None),  # Arabic-Indic three: int() takes it, an id never is one
        (-5, None),
        ("-5", None),
        ("+5", None),
        (3.0, None),
        ("3.0", None),
        (True, None),
        (None, None),
        ("", None),
        ([1], None),
    ],
)
def test_as_id(value: Any, expected: int | None) -> None:
    assert as_id(value) == expected


PLUS_ONE = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    ("value", "default_tz", "expected"),
    [
        ("2024-05-01T10:00:00+02:00", UTC, datetime(2024, 5, 1, 8, tzinfo=UTC)),
        ("2024-05-01T10:00:00Z", PLUS_ONE, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00", PLUS_ONE, datetime(2024, 5, 1, 9, tzinfo=UTC)),  # device local
        ("2024-05-01T10:00:00", UTC, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("0001-01-01T00:00:00+01:00", UTC, None),  # year 0 once in UTC: OverflowError
        ("0001-01-01T00:00:00", PLUS_ONE, None),  # the same through the default zone
        ("9999-12-31T23:59:59-01:00", UTC, None),  # year 10000
        ("0001-01-01T00:00:00Z", UTC, datetime(1, 1, 1, tzinfo=UTC)),  # the edge itself holds
        ("yesterday", UTC, None),
        ("", UTC, None),
        ("2024-05-01T10:00:00\x00x", UTC, None),
        (None, UTC, None),  # TypeError
        (1714557600, UTC, None),
        (["2024-05-01"], UTC, None),
    ],
)
def test_parse_time(value: Any, default_tz: timezone, expected: datetime | None) -> None:
    parsed = parse_time(value, default_tz)
    assert parsed == expected
    if parsed is not None:
        assert parsed.utcoffset() == timedelta(0)


def nested_lists(levels: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(levels - 1):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.mark.parametrize(
    ("value", "limit", "deeper"),
    [
        (5, 0, False),  # a scalar nests nothing
        ({}, 0, True),
        ({}, 1, False),
        ({"a": {"b": 1}}, 1, True),
        ({"a": {"b": 1}}, 2, False),
        ({"a": [1, "x", None], "b": {"c": [{}]}}, 3, True),  # the deepest branch counts
        ({"a": [1, "x", None], "b": {"c": [{}]}}, 4, False),
        (nested_lists(40), 39, True),
        (nested_lists(40), 40, False),
        (nested_lists(100_000), 64, True),  # iterative: no recursion limit to hit
    ],
)
def test_json_deeper_than(value: Any, limit: int, deeper: bool) -> None:
    assert json_deeper_than(value, limit) is deeper


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize(
    "body",
    [
        b'[{"id": 1, "started": "2026-12-05 17:05:03", "x": 1.5, "ok": true, "n": null}]',
        b"9223372036854775807",  # the widest 64-bit integers orjson keeps as integers
        b"-9223372036854775808",
        b"18446744073709551615",
        b'{"id": 18446744073709551616}',  # one past 64 bits: orjson makes it a float
        b"[-9223372036854775809, 2]",
        b'{"id": 123456789012345678901234567890}',
        b'{"f": 1e19, "g": -1e300, "h": 5e-324}',  # true floats: wide, tiny
        b'{"inf": 1e999, "ninf": -1e400}',  # orjson refuses; the standard library's None
        b"[NaN, Infinity, -Infinity]",
        b"\xef\xbb\xbf[1]",  # byte-order mark
        '[1, "\u00fc"]'.encode("utf-16"),
        b'"\\ud800"',  # a lone surrogate escape
        b'{"a": 1, "a": 2}',
        b"-0",
        b" [1.0, 2] ",
        b"[1,]",
        b"\xff\xfe\x00",
        b"",
        nested_json(64),
        nested_json(65),
        nested_json(1100),  # orjson's own limit is 1,024
        nested_json(100_000),
        b"[[[[" + b"1e400" + b"]]]]",
    ],
)
def test_load_json_reads_every_answer_as_the_standard_library_does(body: bytes) -> None:
    """orjson reads answers first (speed); whatever it reads differently, or refuses, must
    end exactly as the standard library's reading: the same values of the same types, or
    the same refusal."""

    def outcome(read: Any) -> str:
        try:
            return repr(read(body))
        except UnreadableJson as exc:
            return f"UnreadableJson: {exc}"

    assert outcome(load_json) == outcome(_load_json_slowly)


# ---------------------------------------------------------------------- exacq


def events_answer(*events: dict[str, Any]) -> Any:
    body = json.dumps({"success": True, "events": list(events)})
    return static_answer(200, body, {"Content-Type": "application/json"})


async def test_exacq_event_in_year_one_is_bad_input_not_a_crash(
    session: aiohttp.ClientSession,
) -> None:
    async with ExacqSimulator({"default": ExacqSite()}) as sim:
        problems = Problems()
        exacq = client("exacq", sim.url(), session, problems)
        event = {"id": "e1", "type": 1, "sourceId": 11, "start": "0001-01-01T00:00:00+01:00"}
        sim.respond("GET", "/v1/events.web", events_answer(event))
        before = datetime.now(UTC)
        result = await exacq.poll(None)  # was: OverflowError, on every poll
        assert [alarm.source_id for alarm in result.alarms] == ["e1"]
        assert result.alarms[0].occurred_at >= before  # "using now"
        assert problems.reported == ["event_start"]
        await exacq.close()


async def test_exacq_unreadable_and_oversized_answers_are_reported(
    session: aiohttp.ClientSession,
) -> None:
    async with ExacqSimulator({"default": ExacqSite()}) as sim:
        problems = Problems()
        exacq = client("exacq", sim.url(), session, problems)
        await exacq.poll(None)
        json_type = {"Content-Type": "application/json"}
        sim.respond("GET", "/v1/events.web", static_answer(200, b"{not json", json_type))
        with pytest.raises(BadDeviceResponse):
            await exacq.poll(None)
        assert problems.reported == ["unreadable_json"]
        too_big = b" " * (MAX_JSON_BYTES + 1)
        sim.respond("GET", "/v1/events.web", static_answer(200, too_big, json_type))
        with pytest.raises(BadDeviceResponse):  # was: ResponseTooLarge, not reported
            await exacq.poll(None)
        assert problems.reported == ["unreadable_json", "oversized_answer"]
        # An error page is not JSON either, but the status says enough: not bad input.
        page = static_answer(500, b"<h1>oops</h1>", {"Content-Type": "text/plain"})
        sim.respond("GET", "/v1/events.web", page)
        with pytest.raises(BadDeviceResponse, match="answered 500"):
            await exacq.poll(None)
        assert problems.reported == ["unreadable_json", "oversized_answer"]
        assert (await exacq.poll(None)).cursor == {"active": []}  # and the site goes on
        await exacq.close()


# ---------------------------------------------------------------------- action targets


@pytest.mark.parametrize(
    ("vendor", "kind", "target"),
    [
        ("camtrace", "command", "²"),  # was: ValueError from int("²")
        ("camtrace", "scenario", "9" * 5000),  # was: ValueError (over 4300 digits)
        ("camtrace", "alarm_trigger", "1,²"),  # was: sent to the server as is
        ("exacq", "soft_trigger", "²"),  # was: sent to the server as is
    ],
)
async def test_non_ascii_digit_targets_are_invalid_actions(
    vendor: str, kind: str, target: str, session: aiohttp.ClientSession
) -> None:
    # Nothing listens there: an action that got as far as a request would fail otherwise.
    device: VendorClient = client(vendor, f"http://127.0.0.1:{free_port()}", session, Problems())
    with pytest.raises(InvalidAction, match="target must be"):
        await device.perform(action(kind, target))


# ---------------------------------------------------------------------- videoloft


async def test_poison_live_records_are_reported_and_skipped(
    session: aiohttp.ClientSession,
) -> None:
    """A live record that once failed every poll (the batch is put back on any exception)."""
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            cursor = (await videoloft.poll(None)).cursor
            await eventually(lambda: account.open_live >= 2, what="a long-poll per logger")
            for data in (
                {"id": "²"},
                {"id": "9" * 5000},
                {"id": 999_999_999_999_999_999},  # no start: id * 1000 ms is past year 9999
                {"id": 1_700_000_000, "startt": float("nan"), "endt": float("inf")},  # NaN
                {"id": 1_700_000_001, "startt": "nan", "endt": "1e999"},
                {"id": 1_700_000_002, "startt": 10**400},  # past any float
            ):
                account._push("12345.1", {"type": "alert", "data": {"uid": "12345.1", **data}})
            good = account.add_alert("12345.1")
            seen: list[str] = []

            async def the_good_alert_arrived() -> bool:
                nonlocal cursor
                result = await videoloft.poll(cursor)
                cursor = result.cursor
                seen.extend(alarm.source_id for alarm in result.alarms)
                # The good alert may come first, read back from /alert after the connection.
                return {f"12345.1:{good.id}", "12345.1:1700000002"} <= set(seen)

            await eventually(the_good_alert_arrived, what="the alert after the poison")
        finally:
            await videoloft.close()
    # An alert read back from /alert may come again live: the database's key keeps it once.
    assert sorted(set(seen)) == [
        "12345.1:1700000000",  # start from the id, no end (NaN and inf are no times)
        "12345.1:1700000001",
        "12345.1:1700000002",
        f"12345.1:{good.id}",
    ]
    assert problems.reported == ["alert_without_id"] * 3


# ---------------------------------------------------------------------- camstreamer


@pytest.fixture
def local_zone() -> Iterator[None]:
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.usefixtures("local_zone")
def test_query_budget_day_is_the_utc_day_whatever_the_local_zone() -> None:
    # At any moment one of UTC+14 and UTC-12 is on another date than UTC.
    for zone in ("Etc/GMT-14", "Etc/GMT+12"):
        os.environ["TZ"] = zone
        time.tzset()
        budget = QueryBudget(rate_per_s=1.0, daily_limit=10)
        assert budget.day == datetime.now(UTC).date().isoformat(), zone
