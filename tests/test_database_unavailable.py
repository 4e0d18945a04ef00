"""`DatabaseUnavailable`: the database failing is told apart from our bugs, in `db/` only.

A connection-level failure (nothing listening, the server read-only after a failover, the
server shutting down) raises `DatabaseUnavailable`, which callers wait out. A bug in our SQL
or a constraint we did not expect propagates unchanged, so it reaches the supervisor instead
of being retried for ever as an outage. Against real PostgreSQL (and a port nobody listens on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import sqlalchemy.exc

from cms_ingest.db.engine import create_engine, migrate
from cms_ingest.db.errors import DatabaseUnavailable, is_connection_failure, is_data_error
from cms_ingest.db.leases import LeaseStore
from cms_ingest.db.store import CommitTerms, PollCommit, Store
from cms_ingest.domain import (
    Alarm,
    DaemonIdentity,
    EventType,
    MediaKind,
    MediaRequest,
    SiteHealth,
)
from tests.support import free_port

ME = DaemonIdentity("d1", "host", 1, "boot", "test")


@pytest.fixture
async def nowhere() -> AsyncIterator[Store]:
    """A store whose server does not exist: connections are refused."""
    store = Store(create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/none"))
    yield store
    await store.engine.dispose()


def _alarm(**fields: object) -> Alarm:
    values: dict[str, object] = {
        "site_id": "s",
        "vendor": "davantis",
        "source_id": "1",
        "event_type": EventType.INTRUSION,
        "vendor_event": "1",
        "description": "",
        "occurred_at": datetime.now(UTC),
        **fields,
    }
    return Alarm(**values)  # type: ignore[arg-type]


async def test_an_unreachable_database_raises_database_unavailable(nowhere: Store) -> None:
    with pytest.raises(DatabaseUnavailable) as raised:
        await nowhere.load_cursors(["s"])
    assert isinstance(raised.value.__cause__, OSError | sqlalchemy.exc.DBAPIError)
    assert str(raised.value), "the message says what failed"
    with pytest.raises(DatabaseUnavailable):
        await nowhere.commit_polls(
            [PollCommit("s", "davantis", [_alarm()], {"last_id": 1})],
            {"s": CommitTerms(60.0)},
        )
    with pytest.raises(DatabaseUnavailable):
        await LeaseStore(nowhere.engine).heartbeat(ME, 15, {})
    with pytest.raises(DatabaseUnavailable):
        await migrate(nowhere.engine)


async def test_a_read_only_server_is_unavailable(
    store: Store, db: asyncpg.Connection, database_url: str
) -> None:
    # As after a failover that left us on a standby: every write is refused with 25006.
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    await store.engine.dispose()  # new sessions pick the setting up
    report = SiteHealth("s", "davantis", datetime.now(UTC), None, 1, "down")
    with pytest.raises(DatabaseUnavailable):
        await store.record_health([report])


async def test_a_bug_in_our_sql_is_not_an_outage(store: Store, db: asyncpg.Connection) -> None:
    # Code and schema disagree (as a query naming a wrong column would): not DatabaseUnavailable.
    await db.execute("ALTER TABLE site_state RENAME COLUMN cursor TO cursor_renamed")
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as raised:
        await store.load_cursors(["s"])
    assert not isinstance(raised.value, DatabaseUnavailable)
    assert not is_connection_failure(raised.value)
    assert not is_data_error(raised.value)


async def test_a_constraint_we_did_not_expect_propagates_unchanged(store: Store) -> None:
    # Two snapshots for one alarm break UNIQUE (alarm_id, kind): our bug, not the database's.
    twice = _alarm(
        media=(MediaRequest(MediaKind.SNAPSHOT, {"n": 1}), MediaRequest(MediaKind.SNAPSHOT, {}))
    )
    with pytest.raises(sqlalchemy.exc.IntegrityError) as raised:
        await store.commit_polls(
            [PollCommit("s", "davantis", [twice], {"last_id": 1})], {"s": CommitTerms(60.0)}
        )
    assert not is_connection_failure(raised.value)
    assert await store.load_cursors(["s"]) == {"s": None}, "nothing of the commit was written"


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), True),
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), True),
        (asyncpg.exceptions.TargetServerAttributeNotMatched("not a primary"), True),
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), True),
        (asyncpg.exceptions.UndefinedColumnError("column does not exist"), False),
        (asyncpg.exceptions.PostgresSyntaxError("syntax error"), False),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),
        (asyncpg.exceptions.DataError("invalid input"), False),
        (KeyError("site"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_which_driver_errors_mean_the_database_is_unavailable(
    error: BaseException, unavailable: bool
) -> None:
    assert is_connection_failure(error) is unavailable
    # As SQLAlchemy hands them over: wrapped, the driver's error as `orig` and the cause.
    wrapped = sqlalchemy.exc.DBAPIError("SELECT 1", None, error)
    wrapped.__cause__ = error
    assert is_connection_failure(wrapped) is unavailable
