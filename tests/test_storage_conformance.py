"""One suite, both storage adapters: PostgreSQL (`db.store` + `db.leases`) and in memory
(`db.memory`). Every port method's contract (`cms_ingest.storage_ports`) is checked here, so a
runtime test against the in-memory adapter shows what the daemon does against PostgreSQL.

Time: the in-memory adapter runs on a `ManualClock`; for PostgreSQL, `advance(s)` moves every
stored expiry and due time `s` seconds into the past, which is the same as the clock moving on.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

import asyncpg
import pytest
from sqlalchemy import text

from cms_ingest import storage_ports
from cms_ingest.db.engine import create_engine, plain_url
from cms_ingest.db.errors import DatabaseUnavailable, is_data_error
from cms_ingest.db.leases import LeaseStore
from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.db.store import Store
from cms_ingest.domain import (
    ActionState,
    Alarm,
    CommHistory,
    CommitTerms,
    DaemonIdentity,
    EventType,
    MediaKind,
    MediaRequest,
    MediaState,
    OpenOutage,
    PollCommit,
    SiteHealth,
    SiteLease,
)
from cms_ingest.storage_ports import ActionRequests, SiteLeases, Storage
from tests.conftest import scratch_database


class FullStorage(Storage, ActionRequests, Protocol):
    """What the suite drives: the workers' ports and the operators' one."""


# Every stored time that expiry or a due date is judged by, per table.
_CLOCKED = {
    "alarm_media": ("next_attempt_at", "claimed_until", "deadline_at"),
    "actions": ("not_after", "next_attempt_at", "claimed_until"),
    "site_leases": ("expires_at",),
    "daemons": ("heartbeat_at", "expires_at"),
}


@dataclass
class Harness:
    store: FullStorage
    leases: SiteLeases
    now: Callable[[], datetime]
    advance: Callable[[float], Any]  # awaitable for PostgreSQL, plain for memory
    alarms: Callable[[str], Any]  # the site's stored alarms as dicts, by id
    media_row: Callable[[int], Any]
    site_row: Callable[[str], Any]

    async def later(self, seconds: float) -> None:
        moved = self.advance(seconds)
        if moved is not None:
            await moved


async def _postgres(database_url: str) -> AsyncIterator[Harness]:
    engine = create_engine(database_url, pool_size=2)
    connection = await asyncpg.connect(plain_url(database_url))

    async def advance(seconds: float) -> None:
        async with engine.begin() as db:
            for table, columns in _CLOCKED.items():
                moved = ", ".join(f"{c} = {c} - make_interval(secs => :s)" for c in columns)
                await db.execute(text(f"UPDATE {table} SET {moved}"), {"s": seconds})

    async def alarms(site_id: str) -> list[dict[str, Any]]:
        rows = await connection.fetch(
            "SELECT * FROM alarms WHERE site_id = $1 ORDER BY id", site_id
        )
        return [{**dict(row), "raw": json.loads(row["raw"])} for row in rows]

    async def media_row(media_id: int) -> dict[str, Any]:
        row = await connection.fetchrow("SELECT * FROM alarm_media WHERE id = $1", media_id)
        return {**dict(row), "locator": json.loads(row["locator"])}

    async def site_row(site_id: str) -> dict[str, Any] | None:
        row = await connection.fetchrow("SELECT * FROM site_state WHERE site_id = $1", site_id)
        return None if row is None else dict(row)

    try:
        yield Harness(
            store=Store(engine),
            leases=LeaseStore(engine),
            now=lambda: datetime.now(UTC),
            advance=advance,
            alarms=alarms,
            media_row=media_row,
            site_row=site_row,
        )
    finally:
        await connection.close()
        await engine.dispose()


async def _memory() -> AsyncIterator[Harness]:
    clock = ManualClock()
    memory = MemoryStorage(clock=clock)

    async def alarms(site_id: str) -> list[dict[str, Any]]:
        return [
            {
                "id": row.id,
                "source_id": row.alarm.source_id,
                "camera_name": row.alarm.camera_name,
                "description": row.alarm.description,
                "occurred_at": row.alarm.occurred_at,
                "armed": row.alarm.armed,
                "priority": row.alarm.priority,
                "raw": row.alarm.raw,
                "group_id": row.group_id,
                "repeat_count": row.repeat_count,
            }
            for row in sorted(memory.alarms.values(), key=lambda row: row.id)
            if row.alarm.site_id == site_id
        ]

    async def media_row(media_id: int) -> dict[str, Any]:
        row = memory.media[media_id]
        return {
            "state": row.state.value,
            "last_error": row.last_error,
            "locator": row.locator,
            "attempts": row.attempts,
        }

    async def site_row(site_id: str) -> dict[str, Any] | None:
        state = memory.site_state.get(site_id)
        return (
            None
            if state is None
            else {
                "last_error": state.last_error,
                "last_success_at": state.last_success_at,
                "consecutive_failures": state.consecutive_failures,
            }
        )

    yield Harness(memory, memory, clock, clock.advance, alarms, media_row, site_row)


@pytest.fixture(scope="module")
async def conformance_db(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    """One database for the module's PostgreSQL runs, emptied before each (a database per
    test costs seconds on a busy machine; TRUNCATE costs milliseconds)."""
    async with scratch_database(pg_server_url, "cms_c", template_db) as url:
        yield url


@pytest.fixture(params=["postgres", "memory"])
async def h(request: pytest.FixtureRequest, conformance_db: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        async for harness in _memory():
            yield harness
        return
    url = conformance_db
    connection = await asyncpg.connect(plain_url(url))
    await connection.execute(
        "TRUNCATE alarms, alarm_media, actions, site_state, site_leases, daemons "
        "RESTART IDENTITY CASCADE"
    )
    await connection.close()
    async for harness in _postgres(url):
        yield harness


# ---------------------------------------------------------------------- helpers

ME = "d1"


def _alarm(site_id: str, source_id: str, **fields: Any) -> Alarm:
    values: dict[str, Any] = {
        "site_id": site_id,
        "vendor": "davantis",
        "source_id": source_id,
        "event_type": EventType.INTRUSION,
        "vendor_event": "11",
        "description": "Intrusion detected",
        "occurred_at": datetime.now(UTC),
        "camera_id": "1",
        **fields,
    }
    return Alarm(**values)


def _snapshot(available: bool = True) -> tuple[MediaRequest, ...]:
    return (MediaRequest(MediaKind.SNAPSHOT, {"id": 1}, available=available),)


def _poll(site_id: str, alarms: list[Alarm], cursor: Any = None, **fields: Any) -> PollCommit:
    return PollCommit(site_id, "davantis", alarms, cursor, **fields)


def _terms(*site_ids: str, lease: SiteLease | None = None) -> dict[str, CommitTerms]:
    return {site_id: CommitTerms(600.0, lease) for site_id in site_ids}


class Reporter:
    def __init__(self) -> None:
        self.reports: list[str] = []

    def bad_input(self, what: str, detail: str) -> None:
        self.reports.append(what)


async def _held(h: Harness, site_id: str, owner: str = ME) -> SiteLease:
    await h.leases.ensure_sites([site_id])
    [taken] = await h.leases.acquire(owner, 30, [site_id], 1)
    return SiteLease(owner, taken.epoch)


# ---------------------------------------------------------------------- poll commits


async def test_alarms_media_and_cursor_commit_together_and_a_replay_adds_nothing(
    h: Harness,
) -> None:
    alarms = [_alarm("s", "1", media=_snapshot()), _alarm("s", "2", media=_snapshot(False))]
    first = await h.store.commit_polls([_poll("s", alarms, {"last_id": 2})], _terms("s"))
    assert sorted(row.source_id for row in first.inserted) == ["1", "2"]
    assert first.fenced == set()
    assert await h.store.load_cursors(["s", "new"]) == {"s": {"last_id": 2}, "new": None}
    assert await h.store.queue_depths() == {"media": 1, "actions": 0}

    # Polled again (a crash before the cursor moved in memory): nothing is added.
    again = await h.store.commit_polls([_poll("s", alarms, {"last_id": 2})], _terms("s"))
    assert again.inserted == []
    assert [a["source_id"] for a in await h.alarms("s")] == ["1", "2"]
    assert await h.store.queue_depths() == {"media": 1, "actions": 0}
    pending = await h.store.claim_media(limit=10, claim_s=30)
    assert [job.alarm_id for job in pending] == [first.inserted[0].id], "only the available"

    # A commit without a cursor leaves the stored one as it is.
    await h.store.commit_polls([_poll("s", [_alarm("s", "3")], None)], _terms("s"))
    assert await h.store.load_cursors(["s"]) == {"s": {"last_id": 2}}


async def test_every_field_is_stored_as_given_to_the_microsecond_whatever_its_zone(
    h: Harness,
) -> None:
    """A zone whose offset has seconds (pre-1900 local mean time, a device's odd setting) and
    texts JSON must escape: the batch goes to PostgreSQL as JSON records (see `_INSERT_ALARMS`)
    and nothing may be rounded or reinterpreted on the way."""
    odd_zone = timezone(timedelta(hours=5, minutes=30, seconds=15))
    when = datetime(2026, 12, 5, 17, 5, 3, 700123, tzinfo=odd_zone)
    raw = {"quote": 'say "hi"\\ \n', "n": 1 << 62, "x": 1.5, "ü": ["ö", None, False]}
    alarm = _alarm(
        "z",
        "1",
        occurred_at=when,
        raw=raw,
        description="Tür\tauf",
        camera_name=None,
        armed=False,
        priority=3,
        media=_snapshot(),
    )
    await h.store.commit_polls([_poll("z", [alarm])], _terms("z"))
    [row] = await h.alarms("z")
    assert row["occurred_at"] == when and row["occurred_at"].utcoffset() is not None
    raw_stored = row["raw"] if isinstance(row["raw"], dict) else json.loads(row["raw"])
    assert raw_stored == raw
    assert (row["description"], row["camera_name"], row["armed"], row["priority"]) == (
        "Tür\tauf",
        None,
        False,
        3,
    )
    [job] = await h.store.claim_media(limit=10, claim_s=30)
    assert job.locator == {"id": 1}


async def test_a_commit_the_database_refuses_writes_nothing_of_it(h: Harness) -> None:
    await h.store.commit_polls([_poll("s", [_alarm("s", "1")], {"last_id": 1})], _terms("s"))
    year_one = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    refused = [_alarm("s", "2", media=_snapshot()), _alarm("s", "3", occurred_at=year_one)]
    with pytest.raises(Exception) as raised:  # noqa: PT011 (the adapters' own types differ)
        await h.store.commit_polls([_poll("s", refused, {"last_id": 3})], _terms("s"))
    assert is_data_error(raised.value), "a value, not an outage"
    assert [a["source_id"] for a in await h.alarms("s")] == ["1"]
    assert await h.store.load_cursors(["s"]) == {"s": {"last_id": 1}}
    assert await h.store.queue_depths() == {"media": 0, "actions": 0}


async def test_a_commit_under_a_lost_lease_is_fenced_site_by_site(h: Harness) -> None:
    lease = await _held(h, "f1", "X")
    first = await h.store.commit_polls(
        [_poll("f1", [_alarm("f1", "1")], {"last_id": 1})], _terms("f1", lease=lease)
    )
    assert first.fenced == set() and len(first.inserted) == 1

    # X is declared gone; Y takes the site over at the next epoch.
    assert await h.leases.expire_daemons(["X"]) == 1
    [taken] = await h.leases.acquire("Y", 30, ["f1"], 1)
    assert (taken.epoch, taken.previous_owner) == (lease.epoch + 1, "X")

    stale = await h.store.commit_polls(
        [_poll("f1", [_alarm("f1", "2")], {"last_id": 2})], _terms("f1", lease=lease)
    )
    assert stale.fenced == {"f1"} and stale.inserted == []
    wrong_epoch = SiteLease("Y", lease.epoch)
    refused = await h.store.commit_polls(
        [_poll("f1", [_alarm("f1", "2")], {"last_id": 2})], _terms("f1", lease=wrong_epoch)
    )
    assert refused.fenced == {"f1"}
    assert await h.store.load_cursors(["f1"]) == {"f1": {"last_id": 1}}

    # In one batch the fenced site is left out, the other commits.
    other = await _held(h, "f2", "X")
    mixed = await h.store.commit_polls(
        [_poll("f1", [_alarm("f1", "4")], {"last_id": 4}), _poll("f2", [_alarm("f2", "1")], {})],
        {"f1": CommitTerms(600.0, lease), "f2": CommitTerms(600.0, other)},
    )
    assert mixed.fenced == {"f1"}
    assert [(row.site_id, row.source_id) for row in mixed.inserted] == [("f2", "1")]
    assert [a["source_id"] for a in await h.alarms("f1")] == ["1"]
    assert await h.store.load_cursors(["f1", "f2"]) == {"f1": {"last_id": 1}, "f2": {}}


async def test_the_store_cleans_what_it_writes_and_reports_a_cleaned_cursor(h: Harness) -> None:
    reporter = Reporter()
    poisoned = _alarm(
        "p",
        "ev\x00-1",
        camera_name="cam\x00era \ud800",
        description="x" * 3000,
        raw={"name": "a\x00", "score": float("nan"), "big": 10**5000},
        media=(MediaRequest(MediaKind.SNAPSHOT, {"path": "/s\x00", "t": float("inf")}),),
    )
    result = await h.store.commit_polls(
        [_poll("p", [poisoned], {"serial": "SN\x001", "n": float("nan")}, problems=reporter)],
        _terms("p"),
    )
    assert [row.source_id for row in result.inserted] == ["ev\ufffd-1"]
    [row] = await h.alarms("p")
    assert row["camera_name"] == "cam\ufffdera \ufffd"
    assert len(row["description"]) == 2048 and row["description"].endswith("…")
    assert row["raw"] == {"name": "a\ufffd", "score": None, "big": None}
    assert await h.store.load_cursors(["p"]) == {"p": {"serial": "SN\ufffd1", "n": None}}
    assert reporter.reports == ["unstorable_cursor"]
    [job] = await h.store.claim_media(limit=1, claim_s=30)
    assert job.locator == {"path": "/s\ufffd", "t": None}


async def test_flood_members_point_at_their_head_by_the_stored_id(h: Harness) -> None:
    head = _alarm("f", "h\x00")
    members = [_alarm("f", f"m{i}", group_of="h\x00") for i in range(3)]
    await h.store.commit_polls([_poll("f", [head, *members[:2]])], _terms("f"))
    await h.store.commit_polls([_poll("f", [members[1], members[2]])], _terms("f"))
    rows = {a["source_id"]: a for a in await h.alarms("f")}
    head_id = rows["h\ufffd"]["id"]
    assert rows["h\ufffd"]["repeat_count"] == 3, "each member counted once, replays not"
    assert [rows[f"m{i}"]["group_id"] for i in range(3)] == [head_id] * 3


async def test_supervision_resumes_from_the_stored_outage_and_last_success(h: Harness) -> None:
    silent = datetime(2026, 1, 1, 12, tzinfo=UTC)
    success = datetime(2026, 1, 1, 11, 59, tzinfo=UTC)
    await h.store.record_health([SiteHealth("c", "davantis", success, success, 0, None)])
    lost = _alarm("c", "comm-1", event_type=EventType.COMM_LOST, raw={"silent_since": str(silent)})
    await h.store.commit_polls([_poll("c", [lost])], _terms("c"))
    states = await h.store.supervision_states(["c", "quiet"])
    assert states["c"] == CommHistory(success, OpenOutage("comm-1", silent))
    assert states["quiet"] == CommHistory(None, None)
    restored = _alarm("c", "comm-1-r", event_type=EventType.COMM_RESTORED)
    await h.store.commit_polls([_poll("c", [restored])], _terms("c"))
    assert (await h.store.supervision_states(["c"]))["c"].open_outage is None


async def test_health_keeps_the_last_success_and_a_cleaned_error(h: Harness) -> None:
    ok_at = h.now()
    await h.store.record_health([SiteHealth("h", "davantis", ok_at, ok_at, 0, None)])
    later = ok_at + timedelta(seconds=5)
    error = "refused \x00" + "e" * 2000
    await h.store.record_health([SiteHealth("h", "davantis", later, None, 3, error)])
    row = await h.site_row("h")
    assert row["last_success_at"] == ok_at, "a failed poll keeps the last success"
    assert row["consecutive_failures"] == 3
    assert row["last_error"].startswith("refused \ufffd") and len(row["last_error"]) == 1000
    await h.store.record_health([])  # nothing to write: no error


# ---------------------------------------------------------------------- media queue


async def _one_media(h: Harness, site_id: str = "m") -> int:
    result = await h.store.commit_polls(
        [_poll(site_id, [_alarm(site_id, "1", media=_snapshot())])], _terms(site_id)
    )
    return result.inserted[0].id


async def test_a_media_claim_not_renewed_in_time_is_claimed_again(h: Harness) -> None:
    alarm_id = await _one_media(h)
    [job] = await h.store.claim_media(limit=5, claim_s=30)
    assert (job.alarm_id, job.kind, job.attempts, job.site_id) == (
        alarm_id,
        MediaKind.SNAPSHOT,
        0,
        "m",
    )
    assert job.deadline_at > h.now() + timedelta(seconds=590)
    assert await h.store.claim_media(limit=5, claim_s=30) == [], "claimed: nobody else gets it"
    await h.later(31)
    [again] = await h.store.claim_media(limit=5, claim_s=30)
    assert again.id == job.id
    await h.store.release_media([again.id])
    [back] = await h.store.claim_media(limit=5, claim_s=30)
    assert back.id == job.id, "released: claimable at once"


async def test_a_renewed_media_claim_holds_and_lapses_once_no_longer_renewed(
    h: Harness,
) -> None:
    await _one_media(h)
    [job] = await h.store.claim_media(limit=5, claim_s=30)
    await h.later(20)
    await h.store.extend_media_claims([job.id], claim_s=30)
    await h.later(20)
    assert await h.store.claim_media(limit=5, claim_s=30) == [], "renewed: still claimed"
    await h.later(11)
    [again] = await h.store.claim_media(limit=5, claim_s=30)
    assert again.id == job.id, "no longer renewed: another worker takes it"
    await h.store.release_media([again.id])
    await h.store.extend_media_claims([again.id], claim_s=30)  # a renewal racing the release
    [back] = await h.store.claim_media(limit=5, claim_s=30)
    assert back.id == again.id, "handed back: a late renewal does not claim it for nobody"
    await h.store.media_final(again.id, MediaState.FAILED, "gave up")
    await h.store.extend_media_claims([again.id, 999_999], claim_s=30)  # settled, unknown: no-op
    assert (await h.media_row(again.id))["state"] == "failed"


async def test_media_retried_later_waits_and_keeps_what_the_vendor_remembers(h: Harness) -> None:
    await _one_media(h)
    [job] = await h.store.claim_media(limit=1, claim_s=30)
    await h.store.media_retry_later(
        job.id, delay_s=10, note="not ready: \x00", locator={"id": 1, "export": "x\ud800"}
    )
    assert await h.store.claim_media(limit=1, claim_s=30) == [], "not due yet"
    await h.later(11)
    [due] = await h.store.claim_media(limit=1, claim_s=30)
    assert (due.id, due.attempts) == (job.id, 1)
    assert due.locator == {"id": 1, "export": "x\ufffd"}
    assert (await h.media_row(job.id))["last_error"] == "not ready: \ufffd"


async def test_media_settled_leaves_the_queue(h: Harness) -> None:
    await _one_media(h, "a")
    await _one_media(h, "b")
    jobs = await h.store.claim_media(limit=5, claim_s=30)
    ready, failed = sorted(jobs, key=lambda job: job.site_id)
    await h.store.media_ready(
        ready.id, path="a/1.jpg", content_type="image/jpeg", size_bytes=3, sha256="00"
    )
    await h.store.media_final(failed.id, MediaState.FAILED, "gave up: " + "r" * 3000)
    assert await h.store.queue_depths() == {"media": 0, "actions": 0}
    await h.later(60)
    assert await h.store.claim_media(limit=5, claim_s=30) == []
    assert (await h.media_row(ready.id))["state"] == "ready"
    settled = await h.media_row(failed.id)
    assert (settled["state"], settled["attempts"], len(settled["last_error"])) == (
        "failed",
        1,
        2048,
    )


async def test_claims_are_limited_to_the_sites_asked_for_and_sites_nobody_leases(
    h: Harness,
) -> None:
    for site_id in ("mine", "theirs", "unknown"):
        await _one_media(h, site_id)
        await h.store.enqueue_action(
            site_id=site_id, kind="relay", target="1", params={}, requested_by="op"
        )
    await h.leases.ensure_sites(["mine", "theirs"])  # "unknown" is in no daemon's config
    media = await h.store.claim_media(limit=5, claim_s=30, site_ids=["mine"])
    assert sorted(job.site_id for job in media) == ["mine", "unknown"]
    actions = await h.store.claim_actions(limit=5, claim_s=30, owner=ME, site_ids=["mine"])
    assert sorted(action.site_id for action in actions) == ["mine", "unknown"]
    everything = await h.store.claim_actions(limit=5, claim_s=30, owner=ME)
    assert [action.site_id for action in everything] == ["theirs"]


# ---------------------------------------------------------------------- action queue


async def _action(h: Harness, **fields: Any) -> int:
    values: dict[str, Any] = {
        "site_id": "a",
        "kind": "relay",
        "target": "1",
        "params": {"duration_s": 1},
        "requested_by": "op",
        **fields,
    }
    return await h.store.enqueue_action(**values)


async def test_an_action_is_claimed_once_and_finished_once(h: Harness) -> None:
    action_id = await _action(h)
    [action] = await h.store.claim_actions(limit=5, claim_s=30, owner=ME)
    assert (action.id, action.attempts, dict(action.params)) == (action_id, 1, {"duration_s": 1})
    assert await h.store.claim_actions(limit=5, claim_s=30, owner="d2") == []
    assert await h.store.queue_depths() == {"media": 0, "actions": 1}
    result = {"answer": "ok\x00", "level": float("nan")}
    assert await h.store.finish_action(action_id, ActionState.SUCCEEDED, result=result)
    assert not await h.store.finish_action(action_id, ActionState.FAILED, error="again")
    row = await h.store.action_row(action_id)
    assert row is not None
    assert (row["state"], row["result"], row["error"]) == (
        "succeeded",
        {"answer": "ok\ufffd", "level": None},
        None,
    )
    assert row["finished_at"] is not None and row["claimed_until"] is None
    assert await h.store.queue_depths() == {"media": 0, "actions": 0}
    assert await h.store.action_row(action_id + 100) is None


async def test_an_action_past_not_after_expires_and_is_never_claimed(h: Harness) -> None:
    late = await _action(h, not_after=h.now() + timedelta(seconds=5))
    timely = await _action(h, not_after=h.now() + timedelta(seconds=60))
    assert await h.store.expire_actions() == 0
    await h.later(6)
    [claimed] = await h.store.claim_actions(limit=5, claim_s=30, owner=ME)
    assert claimed.id == timely
    assert await h.store.expire_actions() == 1
    row = await h.store.action_row(late)
    assert row is not None and row["state"] == "expired" and "not_after" in row["error"]
    assert await h.store.expire_actions() == 0


async def test_a_requeued_action_waits_its_delay_and_loses_its_claim(h: Harness) -> None:
    action_id = await _action(h)
    await h.store.claim_actions(limit=1, claim_s=30, owner=ME)
    assert await h.store.requeue_action(action_id, delay_s=10, error="refused \x00")
    assert not await h.store.requeue_action(action_id, delay_s=10, error="not running now")
    assert await h.store.claim_actions(limit=1, claim_s=30, owner=ME) == []
    await h.later(11)
    [again] = await h.store.claim_actions(limit=1, claim_s=30, owner="d2")
    assert again.attempts == 2
    row = await h.store.action_row(action_id)
    assert row is not None and (row["claimed_by"], row["error"]) == ("d2", "refused \ufffd")


async def test_a_running_action_whose_claim_ran_out_is_stale_and_recovered_once(
    h: Harness,
) -> None:
    await h.leases.ensure_sites(["a"])  # a configured site: only its holder recovers it
    action_id = await _action(h)
    await h.store.claim_actions(limit=1, claim_s=30, owner=ME)
    await h.later(20)
    await h.store.extend_action_claim(action_id, claim_s=30, owner="someone else")
    await h.store.extend_action_claim(action_id, claim_s=30, owner=ME)
    await h.later(20)
    assert await h.store.stale_running_actions() == [], "renewed by its owner: alive"
    assert not await h.store.finish_action(
        action_id, ActionState.FAILED, error="crashed?", only_if_claim_expired=True
    ), "a live claim is not recovered"
    await h.later(11)
    [stale] = await h.store.stale_running_actions(["a"])
    assert stale.id == action_id
    assert await h.store.stale_running_actions(["elsewhere"]) == []
    assert await h.store.requeue_action(
        action_id, delay_s=0, error="retried", only_if_claim_expired=True
    )
    assert await h.store.stale_running_actions() == []
    assert not await h.store.finish_action(
        action_id, ActionState.FAILED, error="too late", only_if_claim_expired=True
    ), "recovered once"
    assert await h.store.finish_action(
        action_id, ActionState.EXPIRED, error="gone", expected=ActionState.QUEUED
    )


# ---------------------------------------------------------------------- site leases


def _me(daemon_id: str = ME, *, host: str = "h1", pid: int = 1) -> DaemonIdentity:
    return DaemonIdentity(daemon_id, host, pid, "boot", "test")


async def test_a_daemon_whose_heartbeat_is_stale_is_counted_out_before_it_expires(
    h: Harness,
) -> None:
    await h.leases.heartbeat(_me("X"), 30, {})
    await h.leases.heartbeat(_me("Y"), 30, {})
    await h.later(6)  # X beats again, Y stays silent: not expired (30 s), but stale
    assert (await h.leases.heartbeat(_me("X"), 30, {}, fresh_s=10)).live == ["X", "Y"]
    assert (await h.leases.heartbeat(_me("X"), 30, {}, fresh_s=5)).live == ["X"]
    assert (await h.leases.heartbeat(_me("X"), 30, {})).live == ["X", "Y"], "no fresh_s"


async def test_leases_renew_expire_hand_off_and_take_over_by_epoch(h: Harness) -> None:
    await h.leases.ensure_sites(["r1", "r2"])
    await h.leases.ensure_sites(["r1"])  # idempotent
    [x] = await h.leases.acquire("X", 30, ["r1"], 1)
    assert (x.site_id, x.previous_owner) == ("r1", None)
    beat = await h.leases.heartbeat(_me("X"), 30, {"r1": x.epoch})
    assert (beat.renewed, beat.live) == ({"r1": x.epoch}, ["X"])
    assert await h.leases.acquire("Y", 30, ["r1"], 1) == [], "a live lease stays its holder's"

    await h.later(31)
    [y] = await h.leases.acquire("Y", 30, ["r1"], 1)
    assert (y.epoch, y.previous_owner) == (x.epoch + 1, "X"), "taken over after expiry"
    row = (await h.leases.lease_rows(["r1"]))["r1"]
    assert (row.owner, row.epoch, row.live) == ("Y", x.epoch + 1, True)
    lost = await h.leases.heartbeat(_me("X"), 30, {"r1": x.epoch})
    assert lost.renewed == {} and lost.live == ["X"], "X's heartbeat renews nothing of r1"
    assert await h.leases.release("X", {"r1": x.epoch}) == set()
    await h.leases.heartbeat(_me("Y"), 30, {"r1": y.epoch})
    assert (await h.leases.heartbeat(_me("X"), 30, {})).live == ["X", "Y"]

    assert await h.leases.release("Y", {"r1": y.epoch}) == {"r1"}
    row = (await h.leases.lease_rows(["r1"]))["r1"]
    assert (row.owner, row.live) == (None, False), "free at once"
    [back] = await h.leases.acquire("X", 30, ["r1"], 1)
    assert (back.epoch, back.previous_owner) == (y.epoch + 1, None), "a hand-off"
    [again] = await h.leases.acquire("X", 30, ["r1"], 1)
    assert (again.epoch, again.previous_owner) == (back.epoch + 1, None), "its own, retaken"
    assert await h.leases.acquire("X", 30, ["r1"], 0) == []
    assert await h.leases.acquire("X", 30, [], 5) == []


async def test_acquire_takes_at_most_its_limit_and_never_a_site_twice(h: Harness) -> None:
    sites = [f"s{i}" for i in range(6)]
    await h.leases.ensure_sites(sites)
    first = await h.leases.acquire("A", 30, sites, 4)
    second = await h.leases.acquire("B", 30, sites, 4)
    assert len(first) == 4 and len(second) == 2
    assert {a.site_id for a in first}.isdisjoint(a.site_id for a in second)
    assert await h.leases.acquire("C", 30, [*sites, "not-configured"], 4) == []


async def test_expired_leases_of_others_are_taken_beyond_the_limit(h: Harness) -> None:
    """A daemon at its share (limit 0) still takes what another daemon let expire: a dead or
    frozen daemon's sites must not wait for a third daemon to count it out."""
    sites = ["o1", "o2", "o3", "o4"]
    await h.leases.ensure_sites(sites)
    dead = await h.leases.acquire("D", 10, ["o1", "o2"], 2)
    await h.leases.acquire("B", 30, ["o3"], 1)
    assert await h.leases.acquire("A", 30, sites, 0) == [], "nothing expired yet"
    await h.later(11)
    taken = await h.leases.acquire("A", 30, sites, 0)
    assert sorted((t.site_id, t.previous_owner) for t in taken) == [("o1", "D"), ("o2", "D")]
    assert {t.site_id: t.epoch for t in taken} == {d.site_id: d.epoch + 1 for d in dead}
    assert await h.leases.acquire("C", 30, sites, 0) == [], "free o4 needs a limit"
    [free] = await h.leases.acquire("C", 30, sites, 5)
    assert free.site_id == "o4", "B's live lease stays B's"


async def test_leaving_and_dead_daemons_free_their_leases_at_once(h: Harness) -> None:
    await h.leases.ensure_sites(["l1", "l2"])
    await h.leases.heartbeat(_me("A", pid=11), 30, {})
    await h.leases.heartbeat(_me("B", pid=12), 30, {})
    await h.leases.heartbeat(_me("C", host="h2", pid=13), 30, {})
    [a] = await h.leases.acquire("A", 30, ["l1"], 1)
    await h.leases.acquire("B", 30, ["l2"], 1)
    assert sorted(await h.leases.local_daemons("h1", "boot")) == [("A", 11), ("B", 12)]
    assert await h.leases.release("A", {"l1": a.epoch}, leaving=True) == {"l1"}
    assert await h.leases.release("A", {}, leaving=False) == set()
    assert await h.leases.local_daemons("h1", "boot") == [("B", 12)]
    assert await h.leases.expire_daemons(["B"]) == 1
    assert await h.leases.expire_daemons([]) == 0
    rows = await h.leases.lease_rows(["l1", "l2"])
    assert not rows["l1"].live and not rows["l2"].live
    assert (await h.leases.heartbeat(_me("C", host="h2", pid=13), 30, {})).live == ["C"]
    await h.leases.announce("C")


# ---------------------------------------------------------------------- the ports' shape

_PORTS = [
    storage_ports.PollCommits,
    storage_ports.MediaQueue,
    storage_ports.ActionQueue,
    storage_ports.ActionRequests,
    storage_ports.SiteHealthRecords,
    storage_ports.SiteLeases,
]


def _shape(method: Any) -> list[tuple[str, Any, Any]]:
    parameters = inspect.signature(method).parameters.values()
    return [(p.name, p.kind, p.default) for p in parameters if p.name != "self"]


@pytest.mark.parametrize("adapter", [Store, LeaseStore, MemoryStorage], ids=lambda a: a.__name__)
def test_each_adapter_takes_every_port_method_as_the_port_declares_it(adapter: type) -> None:
    ports = [port for port in _PORTS if adapter is MemoryStorage or _serves(adapter, port)]
    assert ports, f"{adapter.__name__} implements no port"
    for port in ports:
        for name in _port_methods(port):
            implemented = getattr(adapter, name, None)
            assert implemented is not None, f"{adapter.__name__} lacks {port.__name__}.{name}"
            assert inspect.iscoroutinefunction(implemented), name
            assert _shape(implemented) == _shape(getattr(port, name)), name


def _port_methods(port: type) -> list[str]:
    return [name for name in vars(port) if not name.startswith("_")]


def _serves(adapter: type, port: type) -> bool:
    """PostgreSQL splits the ports between Store and LeaseStore."""
    return (port is storage_ports.SiteLeases) == (adapter is LeaseStore)


# ---------------------------------------------------------------------- memory only


async def test_the_memory_adapter_can_be_unavailable_like_a_database() -> None:
    memory = MemoryStorage(clock=ManualClock())
    await memory.commit_polls([_poll("s", [_alarm("s", "1")], {"last_id": 1})], _terms("s"))
    memory.unavailable = True
    with pytest.raises(DatabaseUnavailable):
        await memory.load_cursors(["s"])
    with pytest.raises(DatabaseUnavailable):
        await memory.commit_polls([_poll("s", [_alarm("s", "2")], {"last_id": 2})], _terms("s"))
    with pytest.raises(DatabaseUnavailable):
        await memory.heartbeat(_me(), 30, {})
    memory.unavailable = False
    assert await memory.load_cursors(["s"]) == {"s": {"last_id": 1}}, "nothing half-written"


async def test_a_heartbeat_says_when_a_silent_daemons_leases_expire(h: Harness) -> None:
    """The lease keeper looks again just then, not at its next tick."""
    await h.leases.heartbeat(_me("X"), 30, {})
    await h.leases.heartbeat(_me("Y"), 30, {})
    assert (await h.leases.heartbeat(_me("X"), 30, {}, fresh_s=10)).orphans_in_s is None
    await h.later(6)  # Y silent since: stale for fresh_s 5, its expiry 24 s away
    beat = await h.leases.heartbeat(_me("X"), 30, {}, fresh_s=5)
    assert beat.orphans_in_s is not None and 23 < beat.orphans_in_s <= 24.5
    assert (await h.leases.heartbeat(_me("X"), 30, {})).orphans_in_s is None, "no fresh_s"
    await h.later(25)  # Y expired: nothing left to wait for
    assert (await h.leases.heartbeat(_me("X"), 30, {}, fresh_s=5)).orphans_in_s is None
