"""Values PostgreSQL refuses, committed through the real writer into real PostgreSQL.

A device can put NUL, lone surrogates, NaN, infinity or giant integers into an alarm, a media
locator or (through the vendor's cursor) the site's cursor. They are made storable where rows
are written, so a poisoned site shares its batch with a healthy one without splitting or
delaying it; a value the database still refuses (a device time that cannot be converted) is
the site's bad input, and its alarms are stored anyway instead of being retried for ever as a
database outage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from cms_ingest.db.store import PollCommit, Store, records_json
from cms_ingest.domain import Alarm, CommitTerms, EventType, MediaKind, MediaRequest
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.sites import SiteProblems
from cms_ingest.runtime.writer import AlarmWriter

POISON = "cam\x00era \ud800 name"


def _alarm(site_id: str, source_id: str, **fields: Any) -> Alarm:
    values: dict[str, Any] = {
        "site_id": site_id,
        "vendor": "exacq",
        "source_id": source_id,
        "event_type": EventType.INTRUSION,
        "vendor_event": "intrusion",
        "description": "Intrusion detected",
        "occurred_at": datetime.now(UTC),
        "camera_id": "1",
        **fields,
    }
    return Alarm(**values)


def _commit(
    site_id: str, alarms: list[Alarm], cursor: dict[str, Any], problems: SiteProblems
) -> PollCommit:
    return PollCommit(
        site_id=site_id,
        vendor="exacq",
        alarms=alarms,
        cursor=cursor,
        problems=problems,
    )


@pytest.fixture
def metrics() -> Metrics:
    """The test's metrics: the writer's and the sites' problems count here."""
    return Metrics()


@pytest.fixture
async def writer(store: Store, metrics: Metrics) -> AsyncIterator[AlarmWriter]:
    # Long enough a gathering window that two commits handed over together share one batch.
    writer = AlarmWriter(
        store, max_wait_s=0.5, media_deadline_of=lambda _site: 60.0, metrics=metrics
    )
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    yield writer
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def _cursor(db: asyncpg.Connection, site_id: str) -> Any:
    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = $1", site_id)
    return None if value is None else json.loads(value)


def _batches(metrics: Metrics) -> tuple[float, float]:
    return metrics.sample("cms_ingest_commit_batch_sites_count"), metrics.sample(
        "cms_ingest_commit_batch_sites_sum"
    )


def _bad_input(metrics: Metrics, what: str) -> float:
    return metrics.sample("cms_ingest_bad_input_total", source="device:exacq", what=what)


async def test_poisoned_cursor_and_alarm_share_a_batch_with_a_healthy_site(
    writer: AlarmWriter, db: asyncpg.Connection, metrics: Metrics
) -> None:
    poisoned_cursor = {
        "serial": "SN\x00123",
        "status": "open \udc80",
        "camera": float("nan"),
        "score": float("inf"),
        "event_id": 2**80,  # over 64 bits: jsonb takes it
        "giant": 10**5000,  # Python cannot even print it as JSON
        "open": [{"id": "e\x001", "started": float("-inf")}],
    }
    poisoned_alarm = _alarm(
        "poisoned",
        "ev\x00-1",
        camera_name=POISON,
        description="a\ud800b",
        raw={"name": POISON, "score": float("nan"), "big": 10**5000, "k\x00": [float("inf")]},
        media=(
            MediaRequest(MediaKind.SNAPSHOT, {"path": "/snap\x00?id=\udfff", "t": float("nan")}),
        ),
    )
    healthy_cursor = {"last_id": 7}

    with capture_logs() as logs:
        poisoned, healthy = await asyncio.gather(
            writer.commit(
                _commit(
                    "poisoned",
                    [poisoned_alarm],
                    poisoned_cursor,
                    SiteProblems("poisoned", "exacq", metrics=metrics),
                )
            ),
            writer.commit(
                _commit(
                    "healthy",
                    [_alarm("healthy", "7")],
                    healthy_cursor,
                    SiteProblems("healthy", "exacq", metrics=metrics),
                )
            ),
        )

    assert [row.source_id for row in poisoned] == ["ev\ufffd-1"]
    assert [row.source_id for row in healthy] == ["7"]
    assert _batches(metrics) == (1, 2), "one shared batch"
    assert not [entry for entry in logs if entry["event"] == "batch_commit_failed"]
    assert await _cursor(db, "healthy") == healthy_cursor
    assert await _cursor(db, "poisoned") == {
        "serial": "SN\ufffd123",
        "status": "open \ufffd",
        "camera": None,
        "score": None,
        "event_id": 2**80,
        "giant": None,
        "open": [{"id": "e\ufffd1", "started": None}],
    }
    assert _bad_input(metrics, "unstorable_cursor") == 1
    row = await db.fetchrow("SELECT * FROM alarms WHERE site_id = 'poisoned'")
    assert row["camera_name"] == "cam\ufffdera \ufffd name"
    assert row["description"] == "a\ufffdb"
    assert json.loads(row["raw"]) == {
        "name": "cam\ufffdera \ufffd name",
        "score": None,
        "big": None,
        "k\ufffd": [None],
    }
    locator = await db.fetchval("SELECT locator FROM alarm_media WHERE alarm_id = $1", row["id"])
    assert json.loads(locator) == {"path": "/snap\ufffd?id=\ufffd", "t": None}


@pytest.mark.parametrize(
    "occurred_at",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ],
    ids=["year-1", "year-9999"],
)
async def test_a_value_postgresql_still_refuses_is_bad_input_and_the_alarm_is_kept(
    writer: AlarmWriter, db: asyncpg.Connection, metrics: Metrics, occurred_at: datetime
) -> None:
    problems = SiteProblems("poisoned", "exacq", metrics=metrics)
    received = datetime.now(UTC)

    poisoned, healthy = await asyncio.gather(
        writer.commit(
            _commit(
                "poisoned",
                [_alarm("poisoned", "41", occurred_at=occurred_at), _alarm("poisoned", "42")],
                {"last_id": 42},
                problems,
            )
        ),
        writer.commit(
            _commit(
                "healthy",
                [_alarm("healthy", "1")],
                {"last_id": 1},
                SiteProblems("h", "exacq", metrics=metrics),
            )
        ),
    )

    assert sorted(row.source_id for row in poisoned) == ["41", "42"]
    assert [row.source_id for row in healthy] == ["1"]
    assert await _cursor(db, "poisoned") == {"last_id": 42}
    assert _bad_input(metrics, "unstorable_value") == 1
    assert metrics.sample("cms_ingest_db_errors_total", operation="commit_polls") == 0
    stored = await db.fetchval("SELECT occurred_at FROM alarms WHERE source_id = '41'")
    assert stored >= received - timedelta(seconds=1), "the time we received it instead"


def test_a_storable_alarm_is_kept_as_it_is_and_any_unstorable_field_rebuilds_it() -> None:
    from cms_ingest.db.storable import storable_alarm, storable_json

    media = (MediaRequest(MediaKind.SNAPSHOT, {"alarm_id": 7, "at": [1.5, None, True]}),)
    raw = {"id": 7, "nested": {"list": [1, "a", {"b": False}]}}
    clean = _alarm("s", "7", raw=raw, media=media, camera_name="Gate", group_of="6")
    assert storable_alarm(clean) is clean
    dirty_values: dict[str, Any] = {
        "source_id": "7\x00",
        "vendor_event": "ev\ud800",
        "description": "d" * 5000,
        "camera_id": "c\x00",
        "camera_name": "é\x00",
        "group_of": "h\x00",
        "raw": {"id": float("nan")},
        "media": (MediaRequest(MediaKind.SNAPSHOT, {"k\x00": 1}),),
    }
    fields = {name: getattr(clean, name) for name in clean.__dataclass_fields__}
    for name, value in dirty_values.items():
        dirty = Alarm(**{**fields, name: value})
        stored = storable_alarm(dirty)
        assert stored is not dirty, name
        assert json.dumps(storable_json(stored.raw)) == json.dumps(stored.raw), name
        assert "\x00" not in json.dumps([getattr(stored, f) for f in ("source_id", "camera_id")])
    for raw in ({"t": (1, 2)}, {"big": 1 << 2000}, {"inf": float("inf")}, {1: "int key"}):
        assert storable_alarm(Alarm(**{**fields, "raw": raw})).raw == storable_json(raw), raw


@pytest.mark.parametrize(
    "raw",
    [
        {"id": 7, "name": "Gate ü", "score": 0.5, "nested": {"list": [1, None, True]}},
        {"beyond 64 bits": 1 << 70},  # orjson declines: json.dumps writes it
        {1: "int key"},  # orjson declines: json.dumps makes the key a string
    ],
    ids=["plain", "big-int", "int-key"],
)
def test_records_json_is_what_json_dumps_means(raw: dict[Any, Any]) -> None:
    """Whichever of orjson and json.dumps writes the batch, it reads the same (times too)."""
    at = datetime(2026, 12, 5, 17, 5, 3, 700123, tzinfo=UTC)
    records = [{"raw": raw, "occurred_at": at}]
    expected = [{"raw": json.loads(json.dumps(raw)), "occurred_at": at.isoformat()}]
    assert json.loads(records_json(records)) == expected


async def test_a_raw_record_orjson_declines_is_stored_as_json_dumps_writes_it(
    store: Store, db: asyncpg.Connection
) -> None:
    alarm = _alarm("orj", "1", raw={"big": 1 << 70, "n": 1})
    terms = {"orj": CommitTerms(media_deadline_s=60)}
    await store.commit_polls([PollCommit("orj", "exacq", [alarm], None)], terms)
    stored = await db.fetchval("SELECT raw FROM alarms WHERE site_id = 'orj'")
    assert json.loads(stored) == {"big": 1 << 70, "n": 1}
