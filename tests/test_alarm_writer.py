"""The alarm writer against the in-memory storage adapter: direct and fast, no daemon.

The writer makes the commits, so it knows what they are made under: the lease each site is
polled under and the site's media deadline. These tests show that those reach the store with
each commit, that a lost lease or a site no longer held writes nothing, that a value the
database refuses is stored reduced, and that an outage reaches the waiting poller while the
writer goes on. `test_storage_conformance.py` shows the adapter behaves as PostgreSQL does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.domain import (
    Alarm,
    EventType,
    MediaKind,
    MediaRequest,
    PollCommit,
    SiteLease,
)
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.writer import AlarmWriter, LeaseLost


class Reporter:
    def __init__(self) -> None:
        self.reports: list[str] = []

    def bad_input(self, what: str, detail: str) -> None:
        self.reports.append(what)


def _alarm(site_id: str, source_id: str, **fields: Any) -> Alarm:
    values: dict[str, Any] = {
        "site_id": site_id,
        "vendor": "davantis",
        "source_id": source_id,
        "event_type": EventType.INTRUSION,
        "vendor_event": "11",
        "description": "Intrusion detected",
        "occurred_at": datetime.now(UTC),
        "media": (MediaRequest(MediaKind.SNAPSHOT, {"id": source_id}),),
        **fields,
    }
    return Alarm(**values)


def _poll(site_id: str, *ids: str, problems: Reporter | None = None) -> PollCommit:
    alarms = [_alarm(site_id, source_id) for source_id in ids]
    return PollCommit(site_id, "davantis", alarms, {"last_id": ids[-1]}, problems)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def memory(clock: ManualClock) -> MemoryStorage:
    return MemoryStorage(clock=clock)


@pytest.fixture
async def run_writer() -> AsyncIterator[Callable[[AlarmWriter], AlarmWriter]]:
    """Start a writer; it is stopped, and must drain and end, after the test."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(writer: AlarmWriter) -> AlarmWriter:
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(writer.run(stop))))
        return writer

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


def _writer(
    memory: MemoryStorage,
    *,
    lease_of: Callable[[str], SiteLease | None] | None = None,
    deadlines: dict[str, float] | None = None,
    metrics: Metrics | None = None,
) -> AlarmWriter:
    known = deadlines or {}
    return AlarmWriter(
        memory,
        lease_of=lease_of,
        media_deadline_of=lambda site_id: known.get(site_id, 600.0),
        max_wait_s=0.2,  # long enough that commits handed over together share a batch
        metrics=metrics,
    )


async def test_sites_share_a_batch_each_with_its_own_media_deadline(
    memory: MemoryStorage, clock: ManualClock, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    metrics = Metrics()
    writer = run_writer(_writer(memory, deadlines={"a": 30.0, "b": 90.0}, metrics=metrics))
    a, b = await asyncio.gather(writer.commit(_poll("a", "1")), writer.commit(_poll("b", "1")))
    assert [row.source_id for row in a] == ["1"] and [row.source_id for row in b] == ["1"]
    assert metrics.sample("cms_ingest_commit_batch_sites_count") == 1, "one batch"
    assert metrics.sample("cms_ingest_commit_batch_sites_sum") == 2, "of both sites"
    deadlines = {row.site_id: row.deadline_at - clock.now for row in memory.media.values()}
    assert deadlines == {"a": timedelta(seconds=30), "b": timedelta(seconds=90)}
    assert await memory.load_cursors(["a", "b"]) == {"a": {"last_id": "1"}, "b": {"last_id": "1"}}


async def test_a_site_no_longer_held_is_refused_before_anything_is_written(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    metrics = Metrics()
    writer = run_writer(_writer(memory, lease_of=lambda _site: None, metrics=metrics))
    with pytest.raises(LeaseLost):
        await writer.commit(_poll("gone", "1"))
    assert metrics.sample("cms_ingest_fencing_refusals_total") == 1
    assert memory.alarms == {} and await memory.load_cursors(["gone"]) == {"gone": None}


async def test_a_commit_under_a_lease_another_daemon_took_is_fenced(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    await memory.ensure_sites(["f"])
    [mine] = await memory.acquire("me", 30, ["f"], 1)
    held = {"f": SiteLease("me", mine.epoch)}
    metrics = Metrics()
    writer = run_writer(_writer(memory, lease_of=held.get, metrics=metrics))
    assert len(await writer.commit(_poll("f", "1"))) == 1

    # Paused past its lease: another daemon takes the site, this one still thinks it holds it.
    await memory.expire_daemons(["me"])
    await memory.acquire("other", 30, ["f"], 1)
    assert metrics.sample("cms_ingest_fencing_refusals_total") == 0
    with pytest.raises(LeaseLost):
        await writer.commit(_poll("f", "2", "3"))
    assert metrics.sample("cms_ingest_fencing_refusals_total") == 1
    assert [row.alarm.source_id for row in memory.alarms.values()] == ["1"]
    assert await memory.load_cursors(["f"]) == {"f": {"last_id": "1"}}


async def test_a_value_the_database_refuses_is_bad_input_and_the_alarms_are_kept(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    writer = run_writer(_writer(memory))
    reporter = Reporter()
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    commit = PollCommit(
        "p",
        "davantis",
        [_alarm("p", "1", occurred_at=year_one, raw={"x": 1}), _alarm("p", "2")],
        {"last_id": 2},
        reporter,
    )
    inserted = await writer.commit(commit)
    assert sorted(row.source_id for row in inserted) == ["1", "2"]
    assert reporter.reports == ["unstorable_value"]
    assert await memory.load_cursors(["p"]) == {"p": {"last_id": 2}}
    stored = {row.alarm.source_id: row.alarm for row in memory.alarms.values()}
    assert stored["1"].occurred_at.year == datetime.now(UTC).year, "the time we received it"
    assert "unstorable" in stored["1"].raw


async def test_an_outage_reaches_the_waiting_poller_and_the_writer_goes_on(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    writer = run_writer(_writer(memory))
    memory.unavailable = True
    with pytest.raises(DatabaseUnavailable):
        await writer.commit(_poll("o", "1"))
    assert memory.alarms == {}
    memory.unavailable = False
    assert [row.source_id for row in await writer.commit(_poll("o", "1"))] == ["1"]


async def test_a_refused_value_in_a_batch_holds_back_no_other_site(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    """The batch is refused as a whole; each site is then committed on its own, so only the
    culprit is reported and stored reduced, and every site's alarms and cursor are kept."""
    writer = run_writer(_writer(memory))
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    reporters = {site: Reporter() for site in ("good1", "bad", "good2")}

    def poll(site: str) -> PollCommit:
        when = {"occurred_at": year_one} if site == "bad" else {}
        alarm = _alarm(site, "1", raw={"site": site}, **when)
        return PollCommit(site, "davantis", [alarm], {"last_id": 1}, reporters[site])

    inserted = await asyncio.gather(*(writer.commit(poll(site)) for site in reporters))
    assert [[row.source_id for row in rows] for rows in inserted] == [["1"], ["1"], ["1"]]
    assert {site: r.reports for site, r in reporters.items()} == {
        "good1": [],
        "bad": ["unstorable_value"],
        "good2": [],
    }
    raw = {row.alarm.site_id: row.alarm.raw for row in memory.alarms.values()}
    assert raw["good1"] == {"site": "good1"} and raw["good2"] == {"site": "good2"}
    assert "unstorable" in raw["bad"]
    cursors = await memory.load_cursors(reporters)
    assert cursors == {site: {"last_id": 1} for site in reporters}


async def test_a_storm_is_committed_in_transactions_of_a_few_thousand_alarms(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    """Six sites answering full pages at once: not one transaction of every alarm, but
    batches closed once they hold `max_batch_alarms`; each site's commit whole in one."""
    sizes: list[list[int]] = []
    commit_polls = memory.commit_polls

    async def recording(commits: Any, terms: Any) -> Any:
        sizes.append([len(commit.alarms) for commit in commits])
        return await commit_polls(commits, terms)

    memory.commit_polls = recording  # type: ignore[method-assign]
    writer = run_writer(
        AlarmWriter(memory, media_deadline_of=lambda _site: 60.0, max_batch_alarms=500)
    )
    polls = [_poll(f"s{n}", *(str(i) for i in range(300))) for n in range(6)]
    results = await asyncio.gather(*(writer.commit(poll) for poll in polls))
    assert [len(inserted) for inserted in results] == [300] * 6
    assert sizes == [[300, 300], [300, 300], [300, 300]], "closed at 500 alarms or more"


async def test_two_transactions_at_once_but_never_two_of_one_site(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    """While PostgreSQL stores one batch the next one is committed beside it (two slots);
    a site's next commit waits for its previous one, and a third batch for a free slot."""
    started: list[list[str]] = []
    gate = asyncio.Event()
    commit_polls = memory.commit_polls

    async def held(commits: Any, terms: Any) -> Any:
        started.append([commit.site_id for commit in commits])
        await gate.wait()
        return await commit_polls(commits, terms)

    memory.commit_polls = held  # type: ignore[method-assign]
    writer = run_writer(
        AlarmWriter(memory, media_deadline_of=lambda _site: 60.0, max_batch=1, max_wait_s=0)
    )
    first_a = asyncio.ensure_future(writer.commit(_poll("a", "1")))
    await asyncio.sleep(0.05)
    second_a = asyncio.ensure_future(writer.commit(_poll("a", "2")))
    b = asyncio.ensure_future(writer.commit(_poll("b", "1")))
    c = asyncio.ensure_future(writer.commit(_poll("c", "1")))
    await asyncio.sleep(0.1)
    assert started == [["a"]], "a's second commit waits for its first, and holds the line"
    gate.set()
    results = await asyncio.gather(first_a, second_a, b, c)
    assert [[row.source_id for row in rows] for rows in results] == [["1"], ["2"], ["1"], ["1"]]
    assert started == [["a"], ["a"], ["b"], ["c"]]
    ids = {(row.site_id, row.source_id): row.id for rows in results for row in rows}
    assert ids[("a", "1")] < ids[("a", "2")], "a site's alarms in its polls' order"


async def test_a_batch_beside_another_in_flight(
    memory: MemoryStorage, run_writer: Callable[[AlarmWriter], AlarmWriter]
) -> None:
    in_flight, most = 0, 0
    gate = asyncio.Event()
    commit_polls = memory.commit_polls

    async def held(commits: Any, terms: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await gate.wait()
        in_flight -= 1
        return await commit_polls(commits, terms)

    memory.commit_polls = held  # type: ignore[method-assign]
    writer = run_writer(
        AlarmWriter(memory, media_deadline_of=lambda _site: 60.0, max_batch=1, max_wait_s=0)
    )
    pending = [asyncio.ensure_future(writer.commit(_poll(f"s{n}", "1"))) for n in range(5)]
    await asyncio.sleep(0.1)
    assert (in_flight, most) == (2, 2), "two transactions at once, never a third"
    gate.set()
    assert all(len(rows) == 1 for rows in await asyncio.gather(*pending))
    assert most == 2


async def test_an_idle_writer_ends_as_soon_as_it_is_stopped_and_a_last_commit_is_kept(
    memory: MemoryStorage,
) -> None:
    """The writer waits for commits 0.5 s at a time; a stop must not wait that out (it was
    up to half a second of every shutdown). A commit handed over as the stop comes is still
    stored: the writer drains before it ends."""
    writer = _writer(memory)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    await asyncio.sleep(0)  # one loop turn: the writer finds no commit and waits for one
    assert not task.done()
    stop.set()
    await asyncio.wait_for(asyncio.shield(task), timeout=0.4)  # before its 0.5 s ran out

    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    await asyncio.sleep(0)
    committed = asyncio.create_task(writer.commit(_poll("s1", "1")))
    stop.set()
    inserted = await asyncio.wait_for(committed, timeout=2)
    await asyncio.wait_for(task, timeout=2)
    assert [row.source_id for row in inserted] == ["1"]
