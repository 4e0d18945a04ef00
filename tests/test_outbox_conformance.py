"""The forwarding outbox's contract (`storage_ports.Outbox`), on both adapters: PostgreSQL
(`db.store.Store` with routes + `db.outbox.OutboxStore`) and in memory (`db.memory`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from cms_ingest.db.engine import create_engine, plain_url
from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.db.outbox import OutboxStore
from cms_ingest.db.store import Store
from cms_ingest.domain import (
    Alarm,
    CommitTerms,
    EventType,
    PollCommit,
    RouteFilter,
    SiteLease,
)
from cms_ingest.storage_ports import Outbox, PollCommits
from tests.conftest import scratch_database

ROUTES = (
    RouteFilter("cms", frozenset({"s1"}), None),
    RouteFilter("intrusions", None, frozenset({EventType.INTRUSION})),
)


@dataclass
class Harness:
    commits: PollCommits
    outbox: Outbox
    expire_forwarders: Callable[[], Any]
    rows: Callable[[str], Any]  # the forwarder's delivery rows: (alarm_id, state, seq)
    set_next_seq: Callable[[str, int], Any]


@pytest.fixture(scope="module")
async def outbox_db(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    """One database for the module's PostgreSQL runs, emptied before each."""
    async with scratch_database(pg_server_url, "cms_o", template_db) as url:
        yield url


@pytest.fixture(params=["postgres", "memory"])
async def h(request: pytest.FixtureRequest, outbox_db: str) -> AsyncIterator[Harness]:
    database_url = outbox_db
    if request.param == "memory":
        clock = ManualClock(datetime.now(UTC))
        memory = MemoryStorage(clock=clock, routes=ROUTES)

        async def expire() -> None:
            clock.advance(3600)

        async def rows(name: str) -> list[tuple[int, str, int | None]]:
            return [
                (r.alarm_id, r.state, r.seq)
                for r in sorted(memory.deliveries.values(), key=lambda r: r.id)
                if r.forwarder == name
            ]

        async def set_next_seq(name: str, seq: int) -> None:
            memory.forwarder_leases[name].next_seq = seq

        yield Harness(memory, memory, expire, rows, set_next_seq)
        return
    engine = create_engine(database_url, pool_size=2)
    connection = await asyncpg.connect(plain_url(database_url))
    await connection.execute(
        "TRUNCATE alarms, deliveries, forwarder_leases, site_leases RESTART IDENTITY CASCADE"
    )

    async def expire_pg() -> None:
        await connection.execute("UPDATE forwarder_leases SET expires_at = now() - interval '1 s'")

    async def rows_pg(name: str) -> list[tuple[int, str, int | None]]:
        found = await connection.fetch(
            "SELECT alarm_id, state, seq FROM deliveries WHERE forwarder = $1 ORDER BY id", name
        )
        return [(r["alarm_id"], r["state"], r["seq"]) for r in found]

    async def set_next_seq_pg(name: str, seq: int) -> None:
        await connection.execute(
            "UPDATE forwarder_leases SET next_seq = $2 WHERE forwarder = $1", name, seq
        )

    try:
        yield Harness(
            Store(engine, routes=ROUTES), OutboxStore(engine), expire_pg, rows_pg, set_next_seq_pg
        )
    finally:
        await connection.close()
        await engine.dispose()


def _alarm(site_id: str, source_id: str, kind: EventType = EventType.INTRUSION) -> Alarm:
    return Alarm(
        site_id=site_id,
        vendor="davantis",
        source_id=source_id,
        event_type=kind,
        vendor_event="x",
        description="d",
        occurred_at=datetime.now(UTC),
        camera_id="1",
    )


async def _commit(h: Harness, *alarms: Alarm, lease: SiteLease | None = None) -> list[int]:
    sites = sorted({a.site_id for a in alarms})
    commits = [
        PollCommit(s, "davantis", [a for a in alarms if a.site_id == s], None) for s in sites
    ]
    result = await h.commits.commit_polls(
        commits, {s: CommitTerms(media_deadline_s=60, lease=lease) for s in sites}
    )
    return [row.id for row in result.inserted]


async def test_a_commit_queues_a_delivery_per_forwarder_that_wants_the_alarm(h: Harness) -> None:
    ids = await _commit(
        h, _alarm("s1", "a"), _alarm("s1", "b", EventType.MOTION), _alarm("s2", "c")
    )
    assert [r[0] for r in await h.rows("cms")] == ids[:2]
    assert [r[0] for r in await h.rows("intrusions")] == [ids[0], ids[2]]
    assert all(r[1:] == ("pending", None) for r in await h.rows("cms"))
    await _commit(h, _alarm("s1", "a"))  # a replay: no alarm, no delivery
    assert len(await h.rows("cms")) == 2


async def test_a_fenced_commit_queues_nothing(h: Harness) -> None:
    ids = await _commit(h, _alarm("s1", "a"), lease=SiteLease("nobody", 7))  # not its lease
    assert ids == []
    assert await h.rows("cms") == []


async def test_one_holder_per_forwarder_and_fencing_by_epoch(h: Harness) -> None:
    await _commit(h, _alarm("s1", "a"), _alarm("s1", "b"))
    mine = await h.outbox.acquire_forwarder("cms", "d1", 30)
    assert mine is not None
    assert await h.outbox.acquire_forwarder("cms", "d2", 30) is None
    again = await h.outbox.acquire_forwarder("cms", "d1", 30)
    assert again == mine  # re-taking our own lease keeps its epoch
    assert await h.outbox.renew_forwarder("cms", mine, 30)
    await h.expire_forwarders()
    theirs = await h.outbox.acquire_forwarder("cms", "d2", 30)
    assert theirs is not None
    assert theirs.epoch == mine.epoch + 1
    assert not await h.outbox.renew_forwarder("cms", mine, 30)
    assert await h.outbox.next_deliveries("cms", mine, limit=10) == []  # fenced
    assert len(await h.outbox.next_deliveries("cms", theirs, limit=10)) == 2
    await h.outbox.release_forwarder("cms", theirs)
    assert await h.outbox.acquire_forwarder("cms", "d3", 30) is not None


async def test_sequence_numbers_are_given_once_in_order_and_kept(h: Harness) -> None:
    ids = await _commit(h, *(_alarm("s1", str(i)) for i in range(5)))
    lease = await h.outbox.acquire_forwarder("cms", "d1", 30)
    assert lease is not None
    first = await h.outbox.next_deliveries("cms", lease, limit=2)
    assert [(d.alarm_id, d.seq) for d in first] == [(ids[0], 1), (ids[1], 2)]
    again = await h.outbox.next_deliveries("cms", lease, limit=5)
    assert [(d.alarm_id, d.seq) for d in again] == [(ids[i], i + 1) for i in range(5)]
    assert again[0].site_id == "s1"
    assert again[0].event_type is EventType.INTRUSION
    await h.outbox.delivery_attempted(again[0].id, error="timeout")
    assert await h.outbox.delivery_finished(again[0].id, delivered=True, answer='"ACK"0001')
    assert not await h.outbox.delivery_finished(again[0].id, delivered=True, answer="again")
    assert await h.outbox.delivery_finished(again[1].id, delivered=False, answer="DUH", error="x")
    rest = await h.outbox.next_deliveries("cms", lease, limit=5)
    assert [d.seq for d in rest] == [3, 4, 5]
    assert rest[0].attempts == 0
    stats = await h.outbox.outbox_stats(["cms", "other"])
    assert (stats["cms"].pending, stats["cms"].delivered, stats["cms"].failed) == (3, 1, 1)
    assert stats["cms"].owner == "d1"
    assert stats["other"].pending == 0
    rows = await h.rows("cms")
    assert [r[1] for r in rows] == ["delivered", "failed", "pending", "pending", "pending"]


async def test_sequence_numbers_wrap_from_9999_to_1(h: Harness) -> None:
    await _commit(h, *(_alarm("s1", str(i)) for i in range(3)))
    lease = await h.outbox.acquire_forwarder("cms", "d1", 30)
    assert lease is not None
    await h.set_next_seq("cms", 9998)
    found = await h.outbox.next_deliveries("cms", lease, limit=3)
    assert [d.seq for d in found] == [9998, 9999, 1]
