"""The database roles of deploy/sql/roles.sql, proved with real connections as each role.

Each test gets a database of its own, runs roles.sql in it as the superuser, migrates it as
`cms_migrator` and runs roles.sql again (the documented order), then connects as the
migrator, the daemon and the operator. Every refusal must be SQLSTATE 42501
(`InsufficientPrivilegeError`): a grant that is too broad makes a test fail.

Roles are cluster-wide and other tests share the server: roles.sql is idempotent, and the
roles are left in place afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy.engine import Connection, make_url

from cms_ingest.db.engine import (
    MigrationNeeded,
    alembic_config,
    create_engine,
    current_revision,
    head_revision,
    migrate,
    plain_url,
)
from cms_ingest.runtime.daemon import Daemon, run_daemon
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually, scratch_database
from tests.support import app_config, davantis_site, final, running_daemon

ROLES_SQL = Path(__file__).resolve().parent.parent / "deploy" / "sql" / "roles.sql"
ROLES = ("cms_migrator", "cms_daemon", "cms_operator")
# Serializes role set-up between test sessions sharing a server (taken in the server URL's
# own database: advisory locks are per database).
ROLES_LOCK_KEY = 0x636D_7372
# Only used when the test server wants passwords (its URL has one), and only for a role
# that has none yet.
TEST_PASSWORD = "cms-ingest-test-only"

OPERATOR_TABLES = ("alarms", "alarm_media", "actions")
OPERATOR_ACTION_COLUMNS = ("site_id", "kind", "target", "params", "requested_by", "not_after")


def with_user(url: str, user: str, password: str | None) -> str:
    parsed = make_url(plain_url(url)).set(username=user)
    if password is not None:
        parsed = parsed.set(password=password)
    return parsed.render_as_string(hide_password=False)


async def apply_roles(server_url: str, database_url: str) -> str | None:
    """roles.sql, as the superuser in `database_url`; the password the roles log in with."""
    lock = await asyncpg.connect(plain_url(server_url))
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", ROLES_LOCK_KEY)
        target = await asyncpg.connect(plain_url(database_url))
        try:
            await target.execute(ROLES_SQL.read_text())
        finally:
            await target.close()
        if not make_url(plain_url(server_url)).password:
            return None  # trust authentication (the machine's server, pgserver)
        for role in ROLES:
            if await lock.fetchval(
                "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = $1", role
            ):
                await lock.execute(f"ALTER ROLE {role} PASSWORD '{TEST_PASSWORD}'")
        return TEST_PASSWORD
    finally:
        await lock.close()  # and the lock with it


async def migrate_as(url: str, revision: str = "head") -> None:
    engine = create_engine(url, pool_size=1)
    try:
        if revision == "head":
            await migrate(engine)
            return

        def upgrade(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            connection.commit()

        async with engine.connect() as connection:
            await connection.run_sync(upgrade)
    finally:
        await engine.dispose()


@dataclass
class RolesDatabase:
    server_url: str
    admin_url: str  # the superuser, in this database
    password: str | None

    def url(self, role: str) -> str:
        return with_user(self.admin_url, role, self.password)

    async def connect(self, role: str) -> asyncpg.Connection:
        return await asyncpg.connect(self.url(role))

    async def apply_roles(self) -> None:
        await apply_roles(self.server_url, self.admin_url)


@pytest.fixture
async def roles_db(pg_server_url: str) -> AsyncIterator[RolesDatabase]:
    """A database set up the documented way: roles.sql, migrate as cms_migrator, roles.sql."""
    async with scratch_database(pg_server_url, "cms_roles") as url:
        password = await apply_roles(pg_server_url, url)
        database = RolesDatabase(pg_server_url, url, password)
        await migrate_as(database.url("cms_migrator"))
        await database.apply_roles()
        yield database


@pytest.fixture
async def bare_db(pg_server_url: str) -> AsyncIterator[RolesDatabase]:
    """A database with the roles and no schema at all."""
    async with scratch_database(pg_server_url, "cms_roles") as url:
        password = await apply_roles(pg_server_url, url)
        yield RolesDatabase(pg_server_url, url, password)


@pytest.fixture
async def as_role(roles_db: RolesDatabase) -> AsyncIterator[Callable[[str], Any]]:
    """`await as_role("cms_daemon")`: a connection as that role, closed after the test."""
    connections: list[asyncpg.Connection] = []

    async def connect(role: str) -> asyncpg.Connection:
        connection = await roles_db.connect(role)
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        await connection.close()


async def refused(connection: asyncpg.Connection, statement: str, *args: Any) -> None:
    """`statement` fails with SQLSTATE 42501, and with nothing else."""
    try:
        await connection.execute(statement, *args)
    except asyncpg.PostgresError as exc:
        error = exc
    else:
        user = await connection.fetchval("SELECT current_user")
        raise AssertionError(f"{user} was allowed: {statement}")
    assert error.sqlstate == "42501", f"{statement}: {error.sqlstate} {error}"


async def schema_owners(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    """(name, owner) of every relation and function in the public schema."""
    rows = await connection.fetch(
        "SELECT c.relname AS name, c.relowner::regrole::text AS owner FROM pg_class c "
        "WHERE c.relnamespace = 'public'::regnamespace "
        "UNION ALL SELECT p.proname, p.proowner::regrole::text FROM pg_proc p "
        "WHERE p.pronamespace = 'public'::regnamespace"
    )
    return [(row["name"], row["owner"]) for row in rows]


async def insert_alarm(connection: asyncpg.Connection, source_id: str = "1") -> int:
    return int(
        await connection.fetchval(
            "INSERT INTO alarms (site_id, vendor, source_id, event_type, occurred_at) "
            "VALUES ('d1', 'davantis', $1, 'motion', now()) RETURNING id",
            source_id,
        )
    )


# ---------------------------------------------------------------------------- the model


async def _acl_snapshot(admin: asyncpg.Connection) -> list[Any]:
    return [
        tuple(row)
        for row in await admin.fetch(
            """
            SELECT 'class', c.relname, c.relowner::regrole::text, c.relacl::text
              FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
            UNION ALL
            SELECT 'column', c.relname || '.' || a.attname, NULL, a.attacl::text
              FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE c.relnamespace = 'public'::regnamespace AND a.attacl IS NOT NULL
            UNION ALL
            SELECT 'schema', nspname, nspowner::regrole::text, nspacl::text
              FROM pg_namespace WHERE nspname = 'public'
            UNION ALL
            SELECT 'database', datname, NULL, datacl::text
              FROM pg_database WHERE datname = current_database()
            UNION ALL
            SELECT 'default', defaclobjtype::text, defaclrole::regrole::text, defaclacl::text
              FROM pg_default_acl
            ORDER BY 1, 2
            """
        )
    ]


async def test_roles_sql_grants_exactly_the_model_and_is_idempotent(
    roles_db: RolesDatabase,
) -> None:
    admin = await asyncpg.connect(plain_url(roles_db.admin_url))
    try:
        roles = {
            row["rolname"]: row
            for row in await admin.fetch(
                "SELECT * FROM pg_roles WHERE rolname = ANY($1::text[])", list(ROLES)
            )
        }
        assert set(roles) == set(ROLES)
        for row in roles.values():
            assert row["rolcanlogin"]
            assert not any(
                row[flag]
                for flag in (
                    "rolsuper",
                    "rolcreatedb",
                    "rolcreaterole",
                    "rolreplication",
                    "rolbypassrls",
                )
            )

        # Table-level grants of every relation in the schema, to anyone but the owner.
        grants = await admin.fetch(
            """
            SELECT c.relname, c.relkind::text AS relkind, c.relowner::regrole::text AS owner,
                   g.grantee::regrole::text AS grantee, g.privilege_type
              FROM pg_class c
              LEFT JOIN LATERAL aclexplode(c.relacl) g ON g.grantee <> c.relowner
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S')
            """
        )
        tables = {row["relname"] for row in grants if row["relkind"] == "r"}
        sequences = {row["relname"] for row in grants if row["relkind"] == "S"}
        assert {"alarms", "alarm_media", "actions", "site_state", "alembic_version"} <= tables
        assert {"alarms_id_seq", "alarm_media_id_seq", "actions_id_seq"} <= sequences
        assert {row["owner"] for row in grants} == {"cms_migrator"}
        dml = {"SELECT", "INSERT", "UPDATE", "DELETE"}
        expected = {
            (table, "cms_daemon", privilege)
            for table in tables - {"alembic_version"}
            for privilege in dml
        }
        expected |= {("alembic_version", "cms_daemon", "SELECT")}
        expected |= {
            (sequence, "cms_daemon", privilege)
            for sequence in sequences
            for privilege in ("USAGE", "SELECT")
        }
        expected |= {(table, "cms_operator", "SELECT") for table in OPERATOR_TABLES}
        granted = {
            (row["relname"], row["grantee"], row["privilege_type"])
            for row in grants
            if row["grantee"] is not None
        }
        assert granted == expected

        columns = await admin.fetch(
            """
            SELECT c.relname, a.attname, g.grantee::regrole::text AS grantee, g.privilege_type
              FROM pg_attribute a
              JOIN pg_class c ON c.oid = a.attrelid
              CROSS JOIN LATERAL aclexplode(a.attacl) g
             WHERE c.relnamespace = 'public'::regnamespace
            """
        )
        assert {tuple(row) for row in columns} == {
            ("alarms", "status", "cms_operator", "UPDATE"),
            *(("actions", column, "cms_operator", "INSERT") for column in OPERATOR_ACTION_COLUMNS),
        }

        schema = await admin.fetch(
            "SELECT g.grantee, g.privilege_type FROM pg_namespace n, aclexplode(n.nspacl) g "
            "WHERE n.nspname = 'public' AND g.grantee <> n.nspowner"
        )
        names = {0: "PUBLIC"} | {
            row["oid"]: row["rolname"]
            for row in await admin.fetch("SELECT oid::int AS oid, rolname FROM pg_roles")
        }
        assert {(names[row["grantee"]], row["privilege_type"]) for row in schema} == {
            ("cms_migrator", "USAGE"),
            ("cms_migrator", "CREATE"),
            ("cms_daemon", "USAGE"),
            ("cms_operator", "USAGE"),
        }
        database = await admin.fetch(
            "SELECT g.grantee, g.privilege_type FROM pg_database d, aclexplode(d.datacl) g "
            "WHERE d.datname = current_database() AND g.grantee <> d.datdba"
        )
        assert {(names[row["grantee"]], row["privilege_type"]) for row in database} == {
            (role, "CONNECT") for role in ROLES
        }

        # A third run (the fixture ran it before and after migrating) changes nothing.
        before = await _acl_snapshot(admin)
        await roles_db.apply_roles()
        await roles_db.apply_roles()
        assert await _acl_snapshot(admin) == before
    finally:
        await admin.close()


async def test_roles_sql_on_an_empty_database_twice_then_migrations(
    bare_db: RolesDatabase,
) -> None:
    # Before the first migration: runnable twice, the operator's grants wait for the tables.
    await bare_db.apply_roles()
    migrator = await bare_db.connect("cms_migrator")
    try:
        assert await migrator.fetchval("SELECT has_schema_privilege('public', 'CREATE')")
    finally:
        await migrator.close()
    await migrate_as(bare_db.url("cms_migrator"))
    # The daemon can already work (default privileges); the operator not until roles.sql ran.
    daemon = await bare_db.connect("cms_daemon")
    operator = await bare_db.connect("cms_operator")
    try:
        await insert_alarm(daemon)
        await refused(operator, "SELECT * FROM alarms")
        await bare_db.apply_roles()
        assert await operator.fetchval("SELECT count(*) FROM alarms") == 1
    finally:
        await daemon.close()
        await operator.close()


# ---------------------------------------------------------------------------- the migrator


async def test_migrator_owns_the_schema_and_its_new_tables_reach_the_daemon_only(
    roles_db: RolesDatabase, as_role: Callable[[str], Any]
) -> None:
    migrator = await as_role("cms_migrator")
    daemon = await as_role("cms_daemon")
    operator = await as_role("cms_operator")
    owners = await schema_owners(migrator)
    assert {owner for _, owner in owners} == {"cms_migrator"}
    assert {"cms_alarms_notify", "cms_actions_notify"} <= {name for name, _ in owners}

    # DDL, as a future migration would do it.
    await migrator.execute(
        "CREATE TABLE probe (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, note text)"
    )
    await migrator.execute("ALTER TABLE probe ADD COLUMN at timestamptz DEFAULT now()")
    await migrator.execute("CREATE INDEX probe_at_idx ON probe (at)")
    await migrator.execute("ALTER TABLE alarms ADD COLUMN probe_note text")
    await migrator.execute("ALTER TABLE alarms DROP COLUMN probe_note")
    # The daemon reaches the new table without any grant (default privileges)...
    probe_id = await daemon.fetchval("INSERT INTO probe (note) VALUES ('x') RETURNING id")
    updated = await daemon.execute("UPDATE probe SET note = 'y' WHERE id = $1", probe_id)
    assert updated == "UPDATE 1"
    assert await daemon.execute("DELETE FROM probe WHERE id = $1", probe_id) == "DELETE 1"
    await refused(daemon, "TRUNCATE probe")
    await refused(daemon, "DROP TABLE probe")
    # ... the operator not at all.
    await refused(operator, "SELECT * FROM probe")
    await refused(operator, "INSERT INTO probe (note) VALUES ('x')")
    await migrator.execute("DROP TABLE probe")
    assert await migrator.fetchval("SELECT to_regclass('public.probe')") is None


async def test_roles_sql_adopts_a_database_migrated_before_the_roles(
    bare_db: RolesDatabase,
) -> None:
    # An existing deployment: its daemon migrated the schema as the superuser.
    await migrate_as(bare_db.admin_url)
    await bare_db.apply_roles()
    migrator = await bare_db.connect("cms_migrator")
    daemon = await bare_db.connect("cms_daemon")
    operator = await bare_db.connect("cms_operator")
    try:
        assert {owner for _, owner in await schema_owners(migrator)} == {"cms_migrator"}
        await migrator.execute("ALTER TABLE alarms ADD COLUMN probe_note text")
        await migrator.execute("ALTER TABLE alarms DROP COLUMN probe_note")
        alarm_id = await insert_alarm(daemon)
        assert await operator.fetchval("SELECT id FROM alarms") == alarm_id
        await refused(daemon, "ALTER TABLE alarms ADD COLUMN probe_note text")
        await refused(daemon, "UPDATE alembic_version SET version_num = version_num")
        await refused(operator, "SELECT * FROM site_state")
    finally:
        for connection in (migrator, daemon, operator):
            await connection.close()


# ---------------------------------------------------------------------------- the daemon


async def test_the_daemon_runs_end_to_end_as_cms_daemon(
    roles_db: RolesDatabase, as_role: Callable[[str], Any], tmp_path: Path
) -> None:
    daemon_db = await as_role("cms_daemon")
    operator = await as_role("cms_operator")
    announced: asyncio.Queue[str] = asyncio.Queue()
    await operator.add_listener("cms_alarms", lambda *args: announced.put_nowait(args[3]))

    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(roles_db.url("cms_daemon"), tmp_path, [davantis_site("d1", sim.url())])
        async with running_daemon(config):

            async def has_cursor() -> bool:
                return bool(
                    await daemon_db.fetchval("SELECT cursor FROM site_state WHERE site_id = 'd1'")
                )

            await eventually(has_cursor, what="first cursor")
            site.add_alarm(event=11, camera=2)
            # The operator sees the alarm (announced on cms_alarms), its media and claims it.
            alarm_id = int(await asyncio.wait_for(announced.get(), 10))
            alarm = await operator.fetchrow("SELECT * FROM alarms WHERE id = $1", alarm_id)
            assert (alarm["source_id"], alarm["event_type"]) == ("1", "intrusion")

            async def media_ready() -> bool:
                states = await operator.fetch(
                    "SELECT state FROM alarm_media WHERE alarm_id = $1", alarm_id
                )
                return [row["state"] for row in states] == ["ready", "ready"]

            await eventually(media_ready, timeout=15, what="snapshot and video ready")
            claimed = await operator.execute(
                "UPDATE alarms SET status = 'claimed' WHERE id = $1", alarm_id
            )
            assert claimed == "UPDATE 1"

            # The operator's plain INSERT wakes the daemon, which fires the relay.
            action_id = await operator.fetchval(
                "INSERT INTO actions (site_id, kind, target, params, requested_by) "
                "VALUES ('d1', 'relay', '1', $1, 'operator 7') RETURNING id",
                json.dumps({"duration_s": 30}),
            )
            action = await final(operator, action_id)
            assert action["state"] == "succeeded", action["error"]
            assert site.relay_log == [(1, True)]
    assert await daemon_db.fetchval("SELECT count(*) FROM alarms") == 1


async def test_the_daemon_is_refused_ddl_and_truncate(as_role: Callable[[str], Any]) -> None:
    daemon = await as_role("cms_daemon")
    # What it needs works, DELETE included.
    alarm_id = await insert_alarm(daemon)
    await daemon.execute(
        "INSERT INTO site_state (site_id, vendor) VALUES ('d1', 'davantis') "
        "ON CONFLICT (site_id) DO UPDATE SET updated_at = now()"
    )
    assert await daemon.execute("DELETE FROM site_state WHERE site_id = 'd1'") == "DELETE 1"
    assert await daemon.fetchval("SELECT version_num FROM alembic_version") == head_revision()
    assert await daemon.fetchval("SELECT pg_try_advisory_lock(1)")

    await refused(daemon, "CREATE TABLE intruder (id int)")
    await refused(daemon, "CREATE TEMP TABLE intruder (id int)")
    await refused(daemon, "CREATE VIEW intruder AS SELECT 1")
    await refused(daemon, "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    await refused(daemon, "CREATE INDEX intruder_idx ON alarms (camera_id)")
    await refused(daemon, "ALTER TABLE alarms ADD COLUMN intruder text")
    await refused(daemon, "ALTER TABLE actions DISABLE TRIGGER actions_notify")
    await refused(daemon, "DROP TABLE site_state")
    await refused(daemon, "DROP TABLE alarms CASCADE")
    await refused(daemon, "DROP FUNCTION cms_actions_notify() CASCADE")
    for table in ("alarms", "alarm_media", "actions", "site_state"):
        await refused(daemon, f"TRUNCATE {table} CASCADE")
    await refused(daemon, "UPDATE alembic_version SET version_num = 'x'")
    await refused(daemon, "DELETE FROM alembic_version")
    assert await daemon.fetchval("SELECT count(*) FROM alarms WHERE id = $1", alarm_id) == 1


async def test_a_daemon_facing_an_old_schema_says_how_to_migrate(bare_db: RolesDatabase) -> None:
    head = head_revision()
    daemon = create_engine(bare_db.url("cms_daemon"), pool_size=1)
    try:
        # Nothing migrated yet.
        with pytest.raises(MigrationNeeded) as empty:
            await migrate(daemon)
        message = str(empty.value)
        assert message.startswith(f"database schema at nothing (no tables yet), code needs {head}")
        assert "'cms_daemon' may not migrate it (permission denied for schema public)" in message
        assert "run `cms-ingest migrate` with the migrator's database_url" in message
        assert (empty.value.current, empty.value.head) == (None, head)
        assert await current_revision(daemon) is None

        # A schema one release behind.
        await migrate_as(bare_db.url("cms_migrator"), "0001")
        await bare_db.apply_roles()
        with pytest.raises(MigrationNeeded) as behind:
            await migrate(daemon)
        assert str(behind.value).startswith(f"database schema at 0001, code needs {head}")
        assert "run `cms-ingest migrate` with the migrator's database_url" in str(behind.value)
        assert await current_revision(daemon) == "0001"  # rolled back, lock released

        # Once the migrator has run, the daemon's start-up migrate() is a no-op that works.
        await migrate_as(bare_db.url("cms_migrator"))
        await migrate(daemon)
        assert await current_revision(daemon) == head
    finally:
        await daemon.dispose()


async def test_the_daemon_waits_for_the_migrator_and_says_why(
    bare_db: RolesDatabase, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        config = app_config(bare_db.url("cms_daemon"), tmp_path, [davantis_site("d1", sim.url())])
        stop = asyncio.Event()
        started: asyncio.Queue[Daemon] = asyncio.Queue()
        task = asyncio.create_task(run_daemon(config, stop=stop, on_started=started.put_nowait))
        try:
            daemon = await asyncio.wait_for(started.get(), timeout=30)
            # Not ready, and /readyz (and the log) says what to do.
            await eventually(
                lambda: "cms-ingest migrate" in daemon.readiness.reason,
                what="the daemon's reason to wait",
            )
            assert not daemon.readiness.ready
            assert daemon.readiness.reason.startswith(
                f"database schema at nothing (no tables yet), code needs {head_revision()}"
            )
            # The migrator runs; the daemon, retrying, starts by itself.
            await migrate_as(bare_db.url("cms_migrator"))
            await bare_db.apply_roles()
            await asyncio.wait_for(daemon.readiness.wait(), timeout=30)
            await asyncio.wait_for(daemon.first_polls(), timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)


# ---------------------------------------------------------------------------- the operator


async def test_the_operator_reads_enqueues_and_claims(as_role: Callable[[str], Any]) -> None:
    daemon = await as_role("cms_daemon")
    operator = await as_role("cms_operator")
    actions_announced: asyncio.Queue[str] = asyncio.Queue()
    await daemon.add_listener("cms_actions", lambda *args: actions_announced.put_nowait(args[3]))

    alarm_id = await insert_alarm(daemon)
    await daemon.execute(
        "INSERT INTO alarm_media (alarm_id, site_id, kind, deadline_at) "
        "VALUES ($1, 'd1', 'snapshot', now() + interval '1 hour')",
        alarm_id,
    )
    assert await operator.fetchval("SELECT id FROM alarms") == alarm_id
    assert await operator.fetchval("SELECT state FROM alarm_media") == "pending"
    assert await operator.fetchval("SELECT count(*) FROM actions") == 0

    # The contract's plain INSERT, and one with every column an operator writes; the NOTIFY
    # trigger fires for both, for the operator's role as for anyone's.
    plain = await operator.fetchval(
        "INSERT INTO actions (site_id, kind, target, params) "
        "VALUES ('d1', 'relay', '1', '{}') RETURNING id"
    )
    full = await operator.fetchval(
        "INSERT INTO actions (site_id, kind, target, params, requested_by, not_after) "
        "VALUES ('d1', 'relay', '2', '{\"state\": false}', 'operator 7', "
        "now() + interval '1 minute') RETURNING id"
    )
    assert [await asyncio.wait_for(actions_announced.get(), 5) for _ in range(2)] == [
        str(plain),
        str(full),
    ]
    row = await operator.fetchrow("SELECT * FROM actions WHERE id = $1", full)
    assert (row["state"], row["requested_by"], row["attempts"]) == ("queued", "operator 7", 0)

    # Claiming: lock the new alarm, move its status; then close it.
    async with operator.transaction():
        locked = await operator.fetchval(
            "SELECT id FROM alarms WHERE status = 'new' ORDER BY id FOR UPDATE SKIP LOCKED"
        )
        assert locked == alarm_id
        await operator.execute("UPDATE alarms SET status = 'claimed' WHERE id = $1", alarm_id)
    await operator.execute("UPDATE alarms SET status = 'closed' WHERE id = $1", alarm_id)
    assert await daemon.fetchval("SELECT status FROM alarms WHERE id = $1", alarm_id) == "closed"


async def test_the_operator_is_refused_everything_else(as_role: Callable[[str], Any]) -> None:
    daemon = await as_role("cms_daemon")
    operator = await as_role("cms_operator")
    alarm_id = await insert_alarm(daemon)
    media_id = await daemon.fetchval(
        "INSERT INTO alarm_media (alarm_id, site_id, kind, deadline_at) "
        "VALUES ($1, 'd1', 'snapshot', now()) RETURNING id",
        alarm_id,
    )
    action_id = await daemon.fetchval(
        "INSERT INTO actions (site_id, kind, target) VALUES ('d1', 'relay', '1') RETURNING id"
    )
    await daemon.execute("INSERT INTO site_state (site_id, vendor) VALUES ('d1', 'davantis')")

    # alarms: only status moves; no insert, no delete.
    for column, value in (
        ("priority", "1"),
        ("event_type", "'person'"),
        ("raw", "'{}'"),
        ("group_id", "NULL"),
        ("received_at", "now()"),
    ):
        await refused(operator, f"UPDATE alarms SET {column} = {value} WHERE id = $1", alarm_id)
    await refused(
        operator, "UPDATE alarms SET status = 'claimed', priority = 1 WHERE id = $1", alarm_id
    )
    await refused(
        operator,
        "INSERT INTO alarms (site_id, vendor, source_id, event_type, occurred_at) "
        "VALUES ('d1', 'cms', 'x', 'other', now())",
    )
    await refused(operator, "DELETE FROM alarms WHERE id = $1", alarm_id)

    # alarm_media: read only.
    await refused(operator, "UPDATE alarm_media SET state = 'failed' WHERE id = $1", media_id)
    await refused(operator, "DELETE FROM alarm_media WHERE id = $1", media_id)
    await refused(
        operator,
        "INSERT INTO alarm_media (alarm_id, site_id, kind, deadline_at) "
        "VALUES ($1, 'd1', 'video', now())",
        alarm_id,
    )

    # actions: insert of the operator's columns only; no update, no delete.
    await refused(operator, "UPDATE actions SET state = 'succeeded' WHERE id = $1", action_id)
    await refused(operator, "UPDATE actions SET not_after = now() WHERE id = $1", action_id)
    await refused(operator, "DELETE FROM actions WHERE id = $1", action_id)
    for column, value in (
        ("state", "'succeeded'"),
        ("attempts", "5"),
        ("result", "'{}'"),
        ("requested_at", "now()"),
        ("claimed_by", "'me'"),
        ("id", "1000"),
    ):
        await refused(
            operator,
            f"INSERT INTO actions (site_id, kind, target, {column}) "
            f"VALUES ('d1', 'relay', '1', {value})",
        )
    await refused(operator, "SELECT nextval('actions_id_seq')")

    # Every other table: nothing at all (site_state, alembic_version, and whatever later
    # migrations add, e.g. site_leases and daemons).
    others = [
        row["relname"]
        for row in await daemon.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind = 'r' AND relname <> ALL($1::text[]) ORDER BY relname",
            list(OPERATOR_TABLES),
        )
    ]
    assert {"site_state", "alembic_version"} <= set(others)
    for table in others:
        await refused(operator, f"SELECT * FROM {table}")
        await refused(operator, f"DELETE FROM {table}")
    await refused(operator, "INSERT INTO site_state (site_id, vendor) VALUES ('x', 'davantis')")
    await refused(operator, "UPDATE site_state SET cursor = NULL")
    await refused(operator, "UPDATE alembic_version SET version_num = 'x'")

    # No DDL.
    await refused(operator, "CREATE TABLE intruder (id int)")
    await refused(operator, "CREATE TEMP TABLE intruder (id int)")
    await refused(operator, "CREATE INDEX intruder_idx ON alarms (camera_id)")
    await refused(operator, "ALTER TABLE alarms ADD COLUMN intruder text")
    await refused(operator, "DROP TABLE actions")
    for table in OPERATOR_TABLES:
        await refused(operator, f"TRUNCATE {table} CASCADE")

    # And all of it left the rows alone.
    assert await daemon.fetchval("SELECT count(*) FROM alarms") == 1
    state = await daemon.fetchval("SELECT state FROM actions WHERE id = $1", action_id)
    assert state == "queued"
