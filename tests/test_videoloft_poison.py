"""Videoloft: poison answers (issue 15), each with its minimal answer, against real HTTP.

A device answer that once hung a poll, grew a buffer without bound, failed every poll until a
restart, or escaped as a KeyError is reported as bad input and skipped; nothing else is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cms_ingest.domain import MediaKind
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from cms_ingest.vendors.base import AuthenticationFailed, VendorError
from cms_ingest.vendors.common import MAX_PAGES_PER_POLL
from cms_ingest.vendors.videoloft import StreamDecoder
from tests.conftest import eventually
from tests.test_vendor_parsing import Problems, action, client


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def started(videoloft: Any, account: VideoloftAccount) -> dict[str, Any]:
    """The first poll's cursor, once every logger's long-poll is open and caught up."""
    cursor = (await videoloft.poll(None)).cursor
    await eventually(lambda: account.open_live >= 2, what="a long-poll per logger")
    return dict((await videoloft.poll(cursor)).cursor)


class Polls:
    """Polls in a row, each with the cursor the one before returned (as committed)."""

    def __init__(self, videoloft: Any, cursor: dict[str, Any]) -> None:
        self.videoloft = videoloft
        self.cursor = cursor
        self.batches: list[list[str]] = []

    async def once(self) -> list[str]:
        result = await asyncio.wait_for(self.videoloft.poll(self.cursor), timeout=10)
        self.cursor = dict(result.cursor)
        if result.alarms:
            self.batches.append([alarm.source_id for alarm in result.alarms])
        return [alarm.source_id for alarm in result.alarms]

    async def until(self, count: int, limit: int = 200) -> list[str]:
        """Poll until `count` alarms arrived in all (at most `limit` polls)."""
        for _ in range(limit):
            if len(self.seen) >= count:
                break
            await self.once()
            await asyncio.sleep(0.02)
        return self.seen

    @property
    def seen(self) -> list[str]:
        return [source_id for batch in self.batches for source_id in batch]


async def test_a_device_that_ignores_offset_does_not_hang_the_poll(
    session: aiohttp.ClientSession,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0, ignore_alert_offset=True)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        videoloft._options = videoloft._options.model_copy(update={"page_size": 5})
        try:
            polls = Polls(videoloft, await started(videoloft, account))
            account.drop_live_connections()  # a gap: /alert must be read back
            for _ in range(12):
                account.add_alert("12345.1")
            seen = await polls.until(5)
        finally:
            await videoloft.close()
    assert "alert_paging" in problems.reported
    assert len(seen) == 5  # the one page the device gives: reported, not looped on


async def test_a_long_gap_is_read_over_several_polls_without_loss(
    session: aiohttp.ClientSession,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        videoloft = client("videoloft", sim.url, session, Problems())
        # No second read of the gap after the connection settled: the batches are exact.
        only = {"page_size": 1, "live_settle_s": 0}
        videoloft._options = videoloft._options.model_copy(update=only)
        try:
            polls = Polls(videoloft, await started(videoloft, account))
            account.drop_live_connections()
            added = [account.add_alert("12345.1") for _ in range(MAX_PAGES_PER_POLL + 5)]
            await polls.until(len(added))
            cursor = polls.cursor
        finally:
            await videoloft.close()
    assert [len(batch) for batch in polls.batches] == [MAX_PAGES_PER_POLL, 5]
    assert sorted(polls.seen) == sorted(f"12345.1:{a.id}" for a in added)
    assert "gaps" not in cursor  # read back to its floor: closed
    assert cursor["last_ids"]["12345.1"] == added[-1].id


async def test_pages_read_before_a_failing_page_are_delivered(
    session: aiohttp.ClientSession,
) -> None:
    """The gap's offset moves past each page read: those alerts come with this poll even
    when a later page fails, and the rest once /alert answers again."""
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        # One device (the /alert counts are its), no second read of the gap after it settled.
        only = {"page_size": 1, "devices": ["12345.1"], "live_settle_s": 0}
        videoloft._options = videoloft._options.model_copy(update=only)
        try:
            cursor = (await videoloft.poll(None)).cursor
            await eventually(lambda: account.open_live >= 1, what="its long-poll")
            polls = Polls(videoloft, dict((await videoloft.poll(cursor)).cursor))
            account.drop_live_connections()
            added = [account.add_alert("12345.1") for _ in range(6)]
            account.refuse_after["/alert"] = 3  # three pages, then refused
            await polls.until(3)
            assert polls.seen == [f"12345.1:{a.id}" for a in added[3:]]  # newest first
            assert "catch_up" in problems.reported
            account.refused_paths.clear()
            await polls.until(6)
        finally:
            await videoloft.close()
    assert sorted(polls.seen) == sorted(f"12345.1:{a.id}" for a in added)
    assert "gaps" not in polls.cursor


def test_a_record_without_an_end_is_bounded_and_linear() -> None:
    decoder = StreamDecoder()
    body = '{"type": "alert", "data": {"x": "' + "a" * (48 * 1024 * 1024)
    started_at = time.process_time()
    garbage: list[str] = []
    for start in range(0, len(body), 65536):
        garbage += decoder.feed(body[start : start + 65536])[1]
    records, _ = decoder.feed('"}}\n{"type": "alert", "data": {}}\n')
    spent = time.process_time() - started_at
    assert spent < 2.0, f"{spent:.1f} s of CPU for 48 MB"  # was 6 s, quadratic in the size
    assert len(garbage) == 1 and garbage[0].startswith('{"type": "alert"')
    assert records == [{"type": "alert", "data": {}}]  # the next record reads normally


async def test_a_poison_live_record_is_reported_once_and_skipped(
    session: aiohttp.ClientSession,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            cursor = await started(videoloft, account)
            poison = {"uid": "12345.1", "id": 1_700_000_000, "startt": -1e306}
            account._push("12345.1", {"type": "alert", "data": poison})
            good = account.add_alert("12345.1")
            seen: list[str] = []

            async def the_good_alert_arrived() -> bool:
                nonlocal cursor
                result = await videoloft.poll(cursor)  # never raises on the poison
                cursor = dict(result.cursor)
                seen.extend(alarm.source_id for alarm in result.alarms)
                return f"12345.1:{good.id}" in seen

            await eventually(the_good_alert_arrived, what="the alert after the poison")
            assert (await videoloft.poll(cursor)).alarms == []  # not queued again
        finally:
            await videoloft.close()
    # -1e306 s is no time: the start comes from the id, as for any unusable start.
    assert seen == ["12345.1:1700000000", f"12345.1:{good.id}"]


async def test_a_camera_status_the_manual_does_not_name_is_reported(
    session: aiohttp.ClientSession,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            polls = Polls(videoloft, await started(videoloft, account))
            record = {"uidd": "12345.1", "status": "sleeping"}
            account._push("12345.1", {"type": "liveSession", "data": record})
            await eventually(lambda: _reported(polls, problems, "camera_status_value"))
        finally:
            await videoloft.close()
    assert polls.seen == []  # taken as up (it was up): no alarm, but not silently


async def _reported(polls: Any, problems: Problems, what: str) -> bool:
    await polls.once()
    return what in problems.reported


async def test_times_outside_the_sane_window_never_move_the_cursor(
    session: aiohttp.ClientSession,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            cursor = await started(videoloft, account)
            before = cursor["last_ids"]["12345.1"]
            far = 4_102_444_800  # 2100-01-01, as id and start
            account._push(
                "12345.1",
                {"type": "alert", "data": {"uid": "12345.1", "id": far, "startt": far * 1000}},
            )
            result = await eventually(lambda: _poll_with_alarms(videoloft, cursor))
            assert [alarm.source_id for alarm in result.alarms] == [f"12345.1:{far}"]
            assert result.cursor["last_ids"]["12345.1"] == before
            # A gap later: the alert of the gap is not hidden behind the year 2100.
            polls = Polls(videoloft, dict(result.cursor))
            account.drop_live_connections()
            during = account.add_alert("12345.1")
            await polls.until(1)
        finally:
            await videoloft.close()
    assert polls.seen == [f"12345.1:{during.id}"]
    assert "implausible_time" in problems.reported


async def _poll_with_alarms(videoloft: Any, cursor: Any) -> Any:
    result = await videoloft.poll(cursor)
    return result if result.alarms else None


# ---------------------------------------------------------------- login answers


@pytest.mark.parametrize("answer", [{}, {"result": 1.0}, {"result": {"authToken": 7}}])
async def test_a_login_answer_without_a_token_is_an_authentication_failure(
    answer: dict[str, Any], session: aiohttp.ClientSession
) -> None:
    app = web.Application()

    async def login(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app.router.add_route("*", "/login", login)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    videoloft = client("videoloft", url, session, Problems())
    try:
        with pytest.raises(AuthenticationFailed):
            await videoloft.poll(None)
        with pytest.raises(VendorError):
            await videoloft.media_status(MediaKind.THUMBNAIL, {"uidd": "1.2", "alert_id": 5})
        with pytest.raises(VendorError):
            await videoloft.perform(action("snapshot_request", "1.2"))
    finally:
        await videoloft.close()
        await runner.cleanup()


async def test_a_storage_plan_past_any_number_is_ignored(session: aiohttp.ClientSession) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0, max_age_days=1e306)  # type: ignore[arg-type]
    async with VideoloftSimulator(account) as sim:
        problems = Problems()
        videoloft = client("videoloft", sim.url, session, problems)
        try:
            await started(videoloft, account)
        finally:
            await videoloft.close()
    assert "max_age" in problems.reported
