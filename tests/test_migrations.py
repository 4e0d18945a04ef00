"""The migrations build exactly the schema the code describes, with its triggers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from cms_ingest.db.engine import create_engine, current_revision, head_revision, migrate, plain_url
from cms_ingest.db.schema import metadata


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_models(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url, pool_size=1)
    try:
        await migrate(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
        await migrate(engine)  # idempotent: a second run changes nothing
    finally:
        await engine.dispose()


async def test_concurrent_migrations_do_not_collide(empty_database_url: str) -> None:
    engines = [create_engine(empty_database_url, pool_size=1) for _ in range(5)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        assert await current_revision(engines[0]) == head_revision()
    finally:
        for engine in engines:
            await engine.dispose()


async def test_inserts_are_announced(database_url: str) -> None:
    listener = await asyncpg.connect(plain_url(database_url))
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for channel in ("cms_alarms", "cms_actions"):
        await listener.add_listener(
            channel, lambda _c, _p, ch, payload: got.put_nowait((ch, payload))
        )
    writer = await asyncpg.connect(plain_url(database_url))
    try:
        alarm_id = await writer.fetchval(
            "INSERT INTO alarms (site_id, vendor, source_id, event_type, occurred_at) "
            "VALUES ('s', 'davantis', '1', 'motion', now()) RETURNING id"
        )
        action_id = await writer.fetchval(
            "INSERT INTO actions (site_id, kind, target) VALUES ('s', 'relay', '1') RETURNING id"
        )
        notes = {await asyncio.wait_for(got.get(), 5), await asyncio.wait_for(got.get(), 5)}
        assert notes == {("cms_alarms", str(alarm_id)), ("cms_actions", str(action_id))}
        # The contract's key: one row per (site, vendor id), whatever replays.
        duplicate = await writer.execute(
            "INSERT INTO alarms (site_id, vendor, source_id, event_type, occurred_at) "
            "VALUES ('s', 'davantis', '1', 'motion', now()) ON CONFLICT DO NOTHING"
        )
        assert duplicate == "INSERT 0 0"
        defaults = await writer.fetchrow("SELECT * FROM actions WHERE id = $1", action_id)
        assert defaults["state"] == "queued" and defaults["attempts"] == 0
        age = await writer.fetchval("SELECT now() - $1::timestamptz", defaults["requested_at"])
        assert abs(age.total_seconds()) < 5, age  # DEFAULT now(): stamped at the insert
    finally:
        await writer.close()
        await listener.close()


async def test_media_lease_of_a_dead_worker_is_taken_back(
    store: object, db: asyncpg.Connection
) -> None:
    from cms_ingest.db.store import CommitTerms, PollCommit, Store
    from cms_ingest.domain import Alarm, EventType, MediaKind, MediaRequest

    assert isinstance(store, Store)
    from datetime import UTC, datetime

    alarm = Alarm(
        site_id="s",
        vendor="davantis",
        source_id="1",
        event_type=EventType.MOTION,
        vendor_event="1",
        description="",
        occurred_at=datetime.now(UTC),
        media=(MediaRequest(MediaKind.SNAPSHOT, {"alarm_id": 1}),),
    )
    terms = {"s": CommitTerms(media_deadline_s=60.0)}
    await store.commit_polls([PollCommit("s", "davantis", [alarm], {"last_id": 1})], terms)
    first = await store.claim_media(limit=10, claim_s=0.3)
    assert len(first) == 1
    assert await store.claim_media(limit=10, claim_s=0.3) == []  # claimed: nobody else gets it
    await asyncio.sleep(0.4)  # the worker "died" holding it
    again = await store.claim_media(limit=10, claim_s=0.3)
    assert [job.id for job in again] == [first[0].id]
    # A replayed poll changes nothing: one alarm, one media row, the cursor as committed.
    await store.commit_polls([PollCommit("s", "davantis", [alarm], {"last_id": 1})], terms)
    assert await db.fetchval("SELECT count(*) FROM alarms") == 1
    assert await db.fetchval("SELECT count(*) FROM alarm_media") == 1
