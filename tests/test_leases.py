"""Several daemons, one database: site leases, fair split, hand-off, take-over and fencing.

Unit level (a real database, no subprocess): `fair_share`, and the lease SQL with the real
`Store.commit_polls` (a commit under a lost lease is refused in its own transaction).

Process level: real `cms-ingest run` processes over one database and one simulator of 12
Davantis sites producing alarms at a steady rate. Each daemon connects as a PostgreSQL role of
its own, and this test (only) installs an audit trigger in its scratch database that records,
for every alarm row inserted and every cursor moved, the session user (so: which daemon) and
the site's lease owner and epoch seen inside that same transaction. No product table gets a
column for it. "No split brain" is then a plain query: every row was written by the daemon
holding that site's lease at that moment. (Roles are cluster-wide: each test creates its own,
named after a random tag, and drops them at the end.)

Two tests pin down bugs this file found, now fixed: a daemon frozen inside a commit blocked the
take-over of its sites for a fixed 30 s idle-in-transaction timeout (now half of lease_ttl),
and a SIGTERM hand-off could wait a keeper interval because the leases were released (and
announced) before the daemon left the membership (now one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy.engine import make_url

from cms_ingest.db.engine import create_engine, plain_url
from cms_ingest.db.leases import DaemonIdentity, LeaseStore
from cms_ingest.db.store import CommitTerms, PollCommit, Store
from cms_ingest.domain import Alarm, EventType, SiteLease
from cms_ingest.runtime.leases import fair_share
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import free_port, log_events, metric_sum, metrics, ready, spawn_daemon

# ============================================================== unit level: fair_share


def test_fair_share_ten_sites_over_three_daemons_is_4_3_3_in_any_order() -> None:
    members = ["d1", "d2", "d3"]
    for order in itertools.permutations(members):
        shares = {me: fair_share(10, list(order), me) for me in members}
        assert shares == {"d1": 4, "d2": 3, "d3": 3}, order  # the remainder to the first ids
    # A newcomer not yet in the live list counts itself; a duplicate id counts once.
    assert fair_share(10, ["d1", "d2"], "d3") == 3
    assert fair_share(10, ["d1", "d1", "d2"], "d2") == 5
    assert fair_share(10, [], "solo") == 10


def test_fair_share_always_sums_to_the_sites_and_differs_by_at_most_one() -> None:
    rng = random.Random(11)
    for sites in range(41):
        for count in range(1, 8):
            ids = [f"host-{rng.randrange(1000)}:{rng.randrange(99999)}" for _ in range(count)]
            ids = list(dict.fromkeys(ids))
            for _ in range(3):
                view = ids[:]
                rng.shuffle(view)  # every daemon sees the membership in its own order
                shares = [fair_share(sites, view, me) for me in ids]
                assert sum(shares) == sites, (sites, ids, shares)
                assert max(shares) - min(shares) <= 1, (sites, ids, shares)


# ============================================================== unit level: SQL + fencing


def _alarm(site_id: str, source_id: int) -> Alarm:
    return Alarm(
        site_id=site_id,
        vendor="davantis",
        source_id=str(source_id),
        event_type=EventType.INTRUSION,
        vendor_event="11",
        description="Intrusion detected",
        occurred_at=datetime.now(UTC),
        camera_id="1",
    )


def _poll(site_id: str, ids: Iterable[int], lease: tuple[str, int]) -> PollCommit:
    ids = list(ids)
    return PollCommit(
        site_id=site_id,
        vendor="davantis",
        alarms=[_alarm(site_id, i) for i in ids],
        cursor={"last_id": max(ids)},
    )


def _terms(**leases: tuple[str, int]) -> dict[str, CommitTerms]:
    """Each site's commit terms: the lease (owner, epoch) its poll ran under."""
    return {site: CommitTerms(60.0, SiteLease(*lease)) for site, lease in leases.items()}


async def _stored(db: asyncpg.Connection, site_id: str) -> list[int]:
    rows = await db.fetch("SELECT source_id FROM alarms WHERE site_id = $1", site_id)
    return sorted(int(row["source_id"]) for row in rows)


async def _cursor(db: asyncpg.Connection, site_id: str) -> Any:
    value = await db.fetchval("SELECT cursor FROM site_state WHERE site_id = $1", site_id)
    return None if value is None else json.loads(value)


def _identity(daemon_id: str) -> DaemonIdentity:
    return DaemonIdentity(daemon_id, "test-host", 1, "boot", "test")


async def test_commit_under_a_lost_lease_is_refused_and_writes_nothing(
    store: Store, db: asyncpg.Connection
) -> None:
    leases = LeaseStore(store.engine)
    await leases.ensure_sites(["f1", "f2"])
    [x1] = await leases.acquire("X", 30, ["f1"], 1)
    assert (x1.site_id, x1.previous_owner) == ("f1", None)
    e = x1.epoch
    first = await store.commit_polls([_poll("f1", [1], ("X", e))], _terms(f1=("X", e)))
    assert first.fenced == set() and [a.source_id for a in first.inserted] == ["1"]

    # X is declared gone (as after its lease_ttl); Y takes the site over at e + 1.
    assert await leases.expire_daemons(["X"]) == 1
    [y1] = await leases.acquire("Y", 30, ["f1"], 1)
    assert (y1.site_id, y1.epoch, y1.previous_owner) == ("f1", e + 1, "X")

    # X, back from a pause, commits what it polled meanwhile: refused, nothing written.
    stale = await store.commit_polls([_poll("f1", [2, 3], ("X", e))], _terms(f1=("X", e)))
    assert stale.fenced == {"f1"} and stale.inserted == []
    assert await _stored(db, "f1") == [1]
    assert await _cursor(db, "f1") == {"last_id": 1}, "a fenced commit moved the cursor"

    # The epoch is checked, not only the owner: Y at X's old epoch is refused too.
    wrong_epoch = await store.commit_polls([_poll("f1", [2], ("Y", e))], _terms(f1=("Y", e)))
    assert wrong_epoch.fenced == {"f1"} and wrong_epoch.inserted == []

    # Y, the holder, at e + 1: lands.
    fresh = await store.commit_polls([_poll("f1", [2, 3], ("Y", e + 1))], _terms(f1=("Y", e + 1)))
    assert fresh.fenced == set() and sorted(a.source_id for a in fresh.inserted) == ["2", "3"]
    assert await _stored(db, "f1") == [1, 2, 3]
    assert await _cursor(db, "f1") == {"last_id": 3}

    # Fencing is per site inside one transaction: in one batch X's stale f1 is left out
    # while its valid f2 commits.
    [x2] = await leases.acquire("X", 30, ["f2"], 1)
    mixed = await store.commit_polls(
        [_poll("f1", [4], ("X", e)), _poll("f2", [1], ("X", x2.epoch))],
        _terms(f1=("X", e), f2=("X", x2.epoch)),
    )
    assert mixed.fenced == {"f1"}
    assert [(a.site_id, a.source_id) for a in mixed.inserted] == [("f2", "1")]
    assert await _stored(db, "f1") == [1, 2, 3]
    assert await _cursor(db, "f1") == {"last_id": 3}
    assert await _cursor(db, "f2") == {"last_id": 1}


async def test_renew_fails_after_a_takeover_and_release_hands_the_site_back(
    store: Store, db: asyncpg.Connection
) -> None:
    leases = LeaseStore(store.engine)
    await leases.ensure_sites(["r1"])
    [x] = await leases.acquire("X", 30, ["r1"], 1)
    beat = await leases.heartbeat(_identity("X"), 30, {"r1": x.epoch})
    assert beat.renewed == {"r1": x.epoch} and beat.live == ["X"]

    # A live lease is never handed to anyone else.
    assert await leases.acquire("Y", 30, ["r1"], 1) == []

    # A tiny ttl: X's lease (renewed for 0.2 s) runs out, Y takes it over.
    await leases.heartbeat(_identity("X"), 0.2, {"r1": x.epoch})
    await eventually(lambda: leases.acquire("Y", 30, ["r1"], 1), timeout=5, what="Y takes r1 over")
    rows = await leases.lease_rows(["r1"])
    assert (rows["r1"].owner, rows["r1"].epoch, rows["r1"].live) == ("Y", x.epoch + 1, True)

    # X's renewal and X's release at its old epoch both fail; Y's renewal works.
    lost = await leases.heartbeat(_identity("X"), 30, {"r1": x.epoch})
    assert lost.renewed == {}
    assert await leases.release("X", {"r1": x.epoch}) == set()
    assert (await leases.lease_rows(["r1"]))["r1"].owner == "Y"
    kept = await leases.heartbeat(_identity("Y"), 30, {"r1": x.epoch + 1})
    assert kept.renewed == {"r1": x.epoch + 1} and kept.live == ["X", "Y"]

    # Y releases: the site is free at once (no waiting for expiry), and X's acquire is a
    # hand-off, not a take-over (no previous owner), at a new epoch.
    assert await leases.release("Y", {"r1": x.epoch + 1}) == {"r1"}
    row = (await leases.lease_rows(["r1"]))["r1"]
    assert row.owner is None and not row.live
    [back] = await leases.acquire("X", 30, ["r1"], 1)
    assert (back.epoch, back.previous_owner) == (x.epoch + 2, None)
    # A process restarted under the same instance id takes its own live lease back.
    [again] = await leases.acquire("X", 30, ["r1"], 1)
    assert (again.epoch, again.previous_owner) == (x.epoch + 3, None)


async def test_concurrent_acquires_never_hand_a_site_to_two_daemons(database_url: str) -> None:
    sites = [f"c{i:02d}" for i in range(60)]
    # Two engines: the contenders really run on separate connections, in parallel.
    stores = [LeaseStore(create_engine(database_url, pool_size=4)) for _ in range(2)]
    try:
        await stores[0].ensure_sites(sites)
        contenders = [(stores[i % 2], f"D{i}") for i in range(8)]
        for round_ in range(6):
            got = await asyncio.gather(*(s.acquire(me, 30, sites, 20) for s, me in contenders))
            taken: Counter[str] = Counter()
            for leases in got:
                taken.update(lease.site_id for lease in leases)
            twice = sorted(site for site, n in taken.items() if n > 1)
            assert not twice, f"round {round_}: acquired by two daemons: {twice}"
            assert sum(taken.values()) == len(sites), f"round {round_}: {taken}"
            rows = await stores[0].lease_rows(sites)
            for (_, me), leases in zip(contenders, got, strict=True):
                for lease in leases:
                    assert rows[lease.site_id].owner == me
                    assert rows[lease.site_id].epoch == lease.epoch == round_ + 1
            # While every lease is live, nobody gets anything.
            assert await stores[1].acquire("late", 30, sites, 60) == []
            # All of them expire: the next round contends for expired leases.
            await stores[0].expire_daemons([me for _, me in contenders])
    finally:
        for s in stores:
            await s.engine.dispose()


# ============================================================== process level

SITES = 12
RATE = 2.0  # alarms per second and site: 24 alarms/s in all
FAST_TTL = 3.0  # for kill and pause: take-overs wait for expiry
SLOW_TTL = 10.0  # for join and SIGTERM: graceful moves must not wait for expiry

AUDIT_SQL = """
CREATE TABLE lease_test_audit (
    kind text NOT NULL,             -- 'alarm' or 'cursor'
    site_id text NOT NULL,
    what text,                      -- the alarm's source_id, or the new cursor
    written_by name NOT NULL,       -- session_user: each daemon has a role of its own
    lease_owner text,               -- site_leases as seen inside the writing transaction
    lease_epoch bigint,
    txid bigint NOT NULL,
    at timestamptz NOT NULL
);
-- A row here makes that role's next alarm insert ('alarm') or its leaving the daemons
-- table ('leave') sleep inside the transaction.
CREATE TABLE lease_test_stall (
    role name NOT NULL, what text NOT NULL, seconds float8 NOT NULL, PRIMARY KEY (role, what)
);
CREATE FUNCTION lease_test_stall(what text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    pause float8;
BEGIN
    DELETE FROM lease_test_stall s WHERE s.role = session_user AND s.what = $1
    RETURNING seconds INTO pause;
    IF pause IS NOT NULL THEN
        PERFORM pg_sleep(pause);
    END IF;
END $$;
CREATE FUNCTION lease_test_slow_leave() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM lease_test_stall('leave');
    RETURN NULL;
END $$;
CREATE TRIGGER lease_test_slow_leave AFTER DELETE ON daemons
    FOR EACH ROW EXECUTE FUNCTION lease_test_slow_leave();
CREATE FUNCTION lease_test_audit() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_TABLE_NAME = 'alarms' THEN
        PERFORM lease_test_stall('alarm');
    END IF;
    IF TG_TABLE_NAME = 'site_state' THEN
        IF NEW.cursor IS NULL OR (TG_OP = 'UPDATE' AND NEW.cursor IS NOT DISTINCT FROM OLD.cursor)
        THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO lease_test_audit
    SELECT CASE WHEN TG_TABLE_NAME = 'alarms' THEN 'alarm' ELSE 'cursor' END,
           NEW.site_id,
           CASE WHEN TG_TABLE_NAME = 'alarms' THEN to_jsonb(NEW) ->> 'source_id'
                ELSE to_jsonb(NEW) ->> 'cursor' END,
           session_user, l.owner, l.epoch, txid_current(), clock_timestamp()
    FROM (SELECT 1) AS one LEFT JOIN site_leases l ON l.site_id = NEW.site_id;
    RETURN NULL;
END $$;
CREATE TRIGGER lease_test_audit AFTER INSERT ON alarms
    FOR EACH ROW EXECUTE FUNCTION lease_test_audit();
CREATE TRIGGER lease_test_audit AFTER INSERT OR UPDATE ON site_state
    FOR EACH ROW EXECUTE FUNCTION lease_test_audit();
"""


@dataclasses.dataclass
class Node:
    name: str  # its instance_id
    role: str  # its own PostgreSQL role: what it writes is attributed by session_user
    port: int
    config: Path
    log: Path
    process: asyncio.subprocess.Process | None = None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.log, name)


class Cluster:
    """Daemons over one scratch database and one simulator of SITES Davantis sites."""

    def __init__(
        self,
        database_url: str,
        db: asyncpg.Connection,
        tmp_path: Path,
        sim: DavantisSimulator,
        ttl: float,
    ) -> None:
        self.database_url = database_url
        self.db = db
        self.tmp = tmp_path
        self.sim = sim
        self.ttl = ttl
        self.site_ids = sorted(sim.sites)
        self.tag = uuid.uuid4().hex[:8]
        self.nodes: dict[str, Node] = {}
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.roles: list[str] = []  # created here, dropped by close()

    # ---------------------------------------------------------------- processes

    async def start(self, *names: str) -> None:
        for name in names:
            node = self.nodes.get(name) or await self._create(name)
            node.process = await spawn_daemon(node.config, node.log)

    async def _create(self, name: str) -> Node:
        role = f"cms_lt_{self.tag}_{name}"
        await self.db.execute(f'CREATE ROLE "{role}" LOGIN')
        self.roles.append(role)
        await self.db.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
        )
        await self.db.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        url = make_url(plain_url(self.database_url)).set(username=role)
        port = free_port()
        lines = [
            f"database_url: '{url.render_as_string(hide_password=False)}'",
            f"data_dir: {self.tmp / ('data-' + name)}",
            f"listen: 127.0.0.1:{port}",
            "log_format: json",
            f"lease_ttl: {self.ttl}",
            f"instance_id: {name}",
            "defaults:",
            "  username: cms",
            "  password: ${SITE_PASSWORD}",
            "  poll_interval: 0.2",
            "  request_timeout_s: 30",
            "sites:",
            *(
                f"  - {{id: {s}, vendor: davantis, url: '{self.sim.url(s)}'}}"
                for s in self.site_ids
            ),
        ]
        config = self.tmp / f"{name}.yaml"
        config.write_text("\n".join(lines) + "\n")
        node = Node(name, role, port, config, self.tmp / f"{name}.log")
        self.nodes[name] = node
        return node

    async def open_transactions(self, name: str) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            "SELECT state, wait_event, clock_timestamp() - xact_start AS open_for, "
            "left(query, 60) AS query FROM pg_stat_activity "
            "WHERE usename = $1 AND xact_start IS NOT NULL",
            self.nodes[name].role,
        )
        return [dict(row) for row in rows]

    async def stop_outside_a_transaction(self, name: str) -> None:
        """SIGSTOP, at a moment when the daemon has no transaction open."""
        for _ in range(50):
            self.signal(name, signal.SIGSTOP)
            await asyncio.sleep(0.1)  # the server runs whatever the daemon sent before
            if not await self.open_transactions(name):
                return
            self.signal(name, signal.SIGCONT)
            await asyncio.sleep(random.uniform(0.01, 0.1))
        raise AssertionError(f"{name} was always inside a transaction")

    def signal(self, name: str, signum: int) -> None:
        process = self.nodes[name].process
        assert process is not None
        process.send_signal(signum)

    async def exit_code(self, name: str, timeout: float) -> int:
        process = self.nodes[name].process
        assert process is not None
        return await asyncio.wait_for(process.wait(), timeout=timeout)

    async def close(self, failed: bool) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.returncode is None:
                node.process.kill()  # SIGKILL also ends a SIGSTOPped process
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(node.process.wait(), timeout=10)
        await self.http.close()
        if failed:
            for node in self.nodes.values():
                tail = node.log.read_text(errors="replace").splitlines()[-40:]
                print(f"----- {node.name} log tail -----", *tail, sep="\n")
        roles = ", ".join(f'"{role}"' for role in self.roles)
        if roles:
            await self.db.execute(f"DROP OWNED BY {roles}")
            await self.db.execute(f"DROP ROLE {roles}")

    # ---------------------------------------------------------------- observation

    async def db_now(self) -> datetime:
        now: datetime = await self.db.fetchval("SELECT clock_timestamp()")
        return now

    async def live_owners(self) -> dict[str, str]:
        """site_id -> owner, of the leases held and not expired."""
        rows = await self.db.fetch(
            "SELECT site_id, owner FROM site_leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
        return {row["site_id"]: row["owner"] for row in rows}

    async def sites_of(self, name: str) -> set[str]:
        return {site for site, owner in (await self.live_owners()).items() if owner == name}

    async def status(self, name: str) -> dict[str, Any] | None:
        try:
            async with self.http.get(f"http://127.0.0.1:{self.nodes[name].port}/status") as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def counters(self, names: Iterable[str]) -> dict[str, dict[str, float]]:
        wanted = (
            "cms_ingest_sites_owned",
            "cms_ingest_daemons_live",
            "cms_ingest_lease_takeovers_total",
            "cms_ingest_lease_handoffs_total",
            "cms_ingest_leases_lost_total",
            "cms_ingest_fencing_refusals_total",
        )
        out = {}
        for name in names:
            samples = await metrics(self.nodes[name].port)
            out[name] = {
                m.removeprefix("cms_ingest_"): metric_sum(samples, m) or 0.0 for m in wanted
            }
        return out

    async def split_is(self, expected: dict[str, int]) -> bool:
        """The database (live rows of site_leases), every daemon's /status (its sites, the
        live daemons) and its gauges agree: each site held exactly once, by the daemons
        named, in the counts given."""
        owners = await self.live_owners()
        if set(owners) != set(self.site_ids):
            return False
        if Counter(owners.values()) != Counter(expected):
            return False
        for name, count in expected.items():
            status = await self.status(name)
            if status is None or status["instance"] != name or status["sites_owned"] != count:
                return False
            if sorted(status["live_daemons"]) != sorted(expected):
                return False
            mine = {s["site_id"] for s in status["sites"] if s["owned"]}
            if mine != {site for site, owner in owners.items() if owner == name}:
                return False
            gauges = await metrics(self.nodes[name].port)
            if metric_sum(gauges, "cms_ingest_sites_owned") != count:
                return False
            if metric_sum(gauges, "cms_ingest_daemons_live") != len(expected):
                return False
        return True

    async def wait_split(self, expected: dict[str, int], *, timeout: float, what: str) -> float:
        started = time.monotonic()
        try:
            await eventually(lambda: self.split_is(expected), timeout=timeout, what=what)
        except AssertionError as exc:
            owners = Counter((await self.live_owners()).values())
            raise AssertionError(f"{exc}; live leases per owner: {dict(owners)}") from None
        return time.monotonic() - started

    async def ready(self, name: str) -> bool:
        return await ready(self.nodes[name].port)

    async def held_by(self, sites: set[str], *names: str) -> bool:
        """Is every one of `sites` held (live lease) by one of the daemons `names`?"""
        owners = await self.live_owners()
        return all(owners.get(site) in names for site in sites)

    async def taken_after_release_s(self, name: str, sites: set[str]) -> float:
        """From `name` logging its last release (just after the commit that freed the
        leases and woke the others) to the last of `sites` being acquired by another
        daemon: how long the survivors took, without the leaving daemon's own shutdown
        and the test's polling in the figure."""
        released = self.nodes[name].events("leases_released")[-1]["timestamp"]
        acquired = await self.db.fetchval(
            "SELECT max(acquired_at) FROM site_leases WHERE site_id = ANY($1::text[])",
            sorted(sites),
        )
        return float((acquired - datetime.fromisoformat(released)).total_seconds())

    async def stall(self, name: str, what: str, seconds: float) -> None:
        """`name`'s next alarm insert ('alarm') or its leaving the membership ('leave')
        sleeps `seconds` inside its transaction (see lease_test_stall)."""
        await self.db.execute(
            "INSERT INTO lease_test_stall VALUES ($1, $2, $3)", self.nodes[name].role, what, seconds
        )

    # ---------------------------------------------------------------- the stream

    async def alarms_in(self) -> int:
        return int(await self.db.fetchval("SELECT count(*) FROM alarms WHERE vendor = 'davantis'"))

    async def start_stream(self) -> None:
        """Once every site has its first cursor (so each alarm from now on is expected)."""
        await eventually(
            lambda: self._cursors(len(self.site_ids)), timeout=20, what="every site's cursor"
        )
        self.sim.start_generator(RATE, events=(1, 2, 11), seed=int(self.tag, 16))

    async def _cursors(self, n: int) -> bool:
        return (
            int(await self.db.fetchval("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL"))
            >= n
        )

    async def more_alarms(self, n: int, timeout: float = 20.0) -> None:
        target = await self.alarms_in() + n
        await eventually(
            lambda: self._at_least(target), timeout=timeout, what=f"{n} more alarms ingested"
        )

    async def _at_least(self, n: int) -> bool:
        return await self.alarms_in() >= n

    async def finish_stream(self) -> int:
        """Stop the generator; every alarm it made is stored exactly once, per site with no
        hole (the simulator numbers a site's alarms 1, 2, 3...). Returns how many."""
        await self.sim.stop_generator()
        expected = {s: sorted(a.id for a in self.sim.site(s).alarms) for s in self.site_ids}
        total = sum(len(ids) for ids in expected.values())
        await eventually(
            lambda: self._at_least(total), timeout=30, what=f"all {total} generated alarms"
        )
        rows = await self.db.fetch(
            "SELECT site_id, source_id FROM alarms WHERE vendor = 'davantis'"
        )
        # Once each: the unique key on (site_id, source_id) sees to that.
        stored: dict[str, set[int]] = {s: set() for s in self.site_ids}
        for row in rows:
            stored[row["site_id"]].add(int(row["source_id"]))
        for site, ids in expected.items():
            got = sorted(stored[site])
            missing = sorted(set(ids) - set(got))
            extra = sorted(set(got) - set(ids))
            assert not missing and not extra, f"{site}: lost {missing[:10]}, extra {extra[:10]}"
            assert got == list(range(1, len(got) + 1)), f"{site}: not continuous"
        return total

    # ---------------------------------------------------------------- the audit

    def role_names(self) -> dict[str, str]:
        return {node.role: node.name for node in self.nodes.values()}

    async def assert_no_split_brain(self) -> list[asyncpg.Record]:
        """Every alarm row and every cursor move was written by the daemon that held the
        site's lease at that moment (seen inside the writing transaction)."""
        rows: list[asyncpg.Record] = await self.db.fetch(
            "SELECT * FROM lease_test_audit ORDER BY at"
        )
        names = self.role_names()
        strangers = [r for r in rows if r["written_by"] not in names]
        assert not strangers, f"rows written by someone else: {strangers[:5]}"
        wrong = [dict(r) for r in rows if names[r["written_by"]] != r["lease_owner"]]
        assert not wrong, f"{len(wrong)} rows written without the lease, e.g. {wrong[:5]}"
        return rows

    async def finish(self, label: str) -> list[asyncpg.Record]:
        """`finish_stream` and `assert_no_split_brain`, with the figure; returns the audit."""
        total = await self.finish_stream()
        rows = await self.assert_no_split_brain()
        figure(f"{label}: {total} alarms generated, lost 0")
        return rows


@contextlib.asynccontextmanager
async def cluster(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, *, ttl: float
) -> AsyncIterator[Cluster]:
    sites = {f"s{i:02d}": DavantisSite(media_delay=0, video_size=64) for i in range(1, SITES + 1)}
    await db.execute(AUDIT_SQL)
    async with DavantisSimulator(dict(sites)) as sim:
        c = Cluster(database_url, db, tmp_path, sim, ttl)
        failed = True
        try:
            yield c
            failed = False
        finally:
            await sim.stop_generator()
            await c.close(failed)


def figure(text: str) -> None:
    print(f"FIGURE {text}")


async def _three(c: Cluster) -> None:
    """Three daemons sharing the 12 sites 4/4/4, each site owned exactly once (database,
    /status and gauges agree), and alarms flowing."""
    await c.start("d1", "d2", "d3")
    await c.wait_split({"d1": 4, "d2": 4, "d3": 4}, timeout=45, what="4/4/4, three daemons")
    await c.start_stream()
    await c.more_alarms(3 * SITES)


@pytest.mark.timeout(150)
async def test_sigkill_mid_stream_sites_move_within_the_ttl_nothing_lost_or_doubled(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=FAST_TTL) as c:
        await _three(c)
        victim = await c.sites_of("d2")
        assert len(victim) == 4
        before = await c.counters(["d1", "d3"])
        killed_at = await c.db_now()
        recent = await db.fetchval(
            "SELECT count(*) FROM lease_test_audit WHERE kind = 'alarm' AND written_by = $1 "
            "AND at > $2::timestamptz - interval '2 seconds'",
            c.nodes["d2"].role,
            killed_at,
        )
        assert recent > 0, "d2 was not committing alarms when killed: not mid-stream"
        started = time.monotonic()
        c.signal("d2", signal.SIGKILL)
        assert await c.exit_code("d2", timeout=10) == -signal.SIGKILL
        dead_at = await c.db_now()  # nothing of d2's can commit after this
        bound = FAST_TTL + 5
        await eventually(
            lambda: c.held_by(victim, "d1", "d3"),
            timeout=bound + 5,
            what="d2's sites held by d1/d3",
        )
        takeover_s = time.monotonic() - started
        split_s = takeover_s + await c.wait_split(
            {"d1": 6, "d3": 6}, timeout=10, what="6/6 after the kill"
        )
        # The taken-over sites are polled again: the first alarm each new holder commits.
        await c.more_alarms(4 * SITES)
        first = await db.fetch(
            "SELECT site_id, extract(epoch FROM min(at) - $1) AS s FROM lease_test_audit "
            "WHERE kind = 'alarm' AND site_id = ANY($2) AND at > $1 AND written_by <> $3 "
            "GROUP BY site_id ORDER BY site_id",
            killed_at,
            sorted(victim),
            c.nodes["d2"].role,
        )
        figure(
            f"sigkill: d2's 4 sites held by the others after {takeover_s:.2f} s "
            f"(lease_ttl {FAST_TTL}, keeper interval {FAST_TTL / 3:.0f} s, poll 0.2 s); "
            f"6/6 everywhere after {split_s:.2f} s; first alarm per moved site committed after "
            + ", ".join(f"{r['site_id']} {float(r['s']):.2f} s" for r in first)
        )
        assert takeover_s < bound, f"take-over took {takeover_s:.1f} s"
        after = await c.counters(["d1", "d3"])
        took = sum(
            after[n]["lease_takeovers_total"] - before[n]["lease_takeovers_total"] for n in after
        )
        assert took == 4, (before, after)  # taken over from an expired lease, not handed
        assert all(after[n]["leases_lost_total"] == 0 for n in after), after
        assert all(after[n]["daemons_live"] == 2 for n in after), after
        rows = await c.finish("sigkill")
        late = [
            dict(r) for r in rows if r["written_by"] == c.nodes["d2"].role and r["at"] > dead_at
        ]
        assert not late, f"d2 wrote after it was killed: {late[:5]}"


@pytest.mark.timeout(150)
async def test_sigstop_past_the_ttl_then_sigcont_commits_nothing_for_the_lost_sites(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=FAST_TTL) as c:
        await _three(c)
        victim = await c.sites_of("d3")
        assert len(victim) == 4
        before = await c.counters(["d1", "d2", "d3"])
        # Leave a poll of each of d3's sites in flight: the device answers it while d3 is
        # stopped, so on SIGCONT d3 holds fresh alarms it will try to commit.
        asked = {s: c.sim.site(s).requests["GET /alarms"] for s in victim}
        for site in victim:
            c.sim.site(site).slow_alarm_polls(1, delay=1.0)

        def in_flight() -> bool:
            return all(c.sim.site(s).requests["GET /alarms"] > asked[s] for s in victim)

        await eventually(in_flight, timeout=5, what="a slow poll of each of d3's sites")
        started = time.monotonic()
        # Paused between two transactions: a pause inside one is the next test's case.
        await c.stop_outside_a_transaction("d3")
        pause = 3 * FAST_TTL
        try:
            await eventually(
                lambda: c.held_by(victim, "d1", "d2"),
                timeout=pause - 0.5,
                what="d3's sites held by d1/d2",
            )
        except AssertionError:
            stuck = await db.fetch(
                "SELECT state, now() - xact_start AS in_tx, query FROM pg_stat_activity "
                "WHERE usename = $1",
                c.nodes["d3"].role,
            )
            raise AssertionError(
                f"not taken over; d3's sessions: {[dict(r) for r in stuck]}"
            ) from None
        takeover_s = time.monotonic() - started
        taken_at = {
            r["site_id"]: r["acquired_at"]
            for r in await db.fetch(
                "SELECT site_id, acquired_at FROM site_leases WHERE site_id = ANY($1)",
                sorted(victim),
            )
        }
        await c.wait_split({"d1": 6, "d2": 6}, timeout=5, what="6/6 while d3 is stopped")
        # Alarms keep flowing to the new holders while d3 sleeps.
        await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
        c.signal("d3", signal.SIGCONT)
        resumed = time.monotonic()

        # d3 finds its leases gone and stops those pollers; what it had polled is refused.
        await eventually(
            lambda: c.nodes["d3"].events("leases_lost"), timeout=10, what="d3 logs leases_lost"
        )
        lost = c.nodes["d3"].events("leases_lost")
        assert sum(e["sites"] for e in lost) == 4, lost
        assert set().union(*(e["examples"] for e in lost)) == victim, lost
        # Back in the membership: the split evens out again, by hand-off from d1 and d2.
        await c.wait_split({"d1": 4, "d2": 4, "d3": 4}, timeout=15, what="4/4/4 after SIGCONT")
        rejoin_s = time.monotonic() - resumed
        after = await c.counters(["d1", "d2", "d3"])
        delta = {
            n: {k: after[n][k] - before[n][k] for k in after[n] if k.endswith("_total")}
            for n in after
        }
        refused_logs = c.nodes["d3"].events("commit_refused_lease_lost")
        figure(
            f"sigstop: d3 stopped {pause:.0f} s; its 4 sites held by d1/d2 after "
            f"{takeover_s:.2f} s; 4/4/4 again {rejoin_s:.2f} s after SIGCONT; counters "
            f"{delta}; d3 logged commit_refused_lease_lost x{len(refused_logs)}"
        )
        assert takeover_s < FAST_TTL + 5
        assert delta["d3"]["leases_lost_total"] == 4, delta
        # The fresh alarms d3 held on SIGCONT were refused inside the commit transaction.
        assert delta["d3"]["fencing_refusals_total"] >= 1, delta
        assert len(refused_logs) <= delta["d3"]["fencing_refusals_total"]
        assert delta["d1"]["lease_takeovers_total"] + delta["d2"]["lease_takeovers_total"] == 4
        assert delta["d3"]["lease_takeovers_total"] == 0, "d3 got its share back by hand-off"
        # Whoever of d1/d2 ticked first took all four expired leases (nobody waits for a
        # share), so a pair may first have moved between them.
        assert delta["d1"]["lease_handoffs_total"] + delta["d2"]["lease_handoffs_total"] >= 4
        await c.more_alarms(2 * SITES)
        rows = await c.finish("sigstop")
        # Spelled out for d3: from the take-over on it wrote nothing for a site it had lost,
        # neither alarms nor cursors, until (and unless) it was handed that site again.
        reacquired = {
            r["site_id"]: r["acquired_at"]
            for r in await db.fetch(
                "SELECT site_id, acquired_at FROM site_leases WHERE owner = 'd3' "
                "AND site_id = ANY($1)",
                sorted(victim),
            )
        }
        never = datetime.max.replace(tzinfo=UTC)
        late = [
            dict(r)
            for r in rows
            if r["written_by"] == c.nodes["d3"].role
            and r["site_id"] in victim
            and taken_at[r["site_id"]] < r["at"] < reacquired.get(r["site_id"], never)
        ]
        assert not late, f"d3 wrote for sites it had lost: {late[:5]}"


@pytest.mark.timeout(150)
async def test_a_fourth_daemon_joins_and_gets_its_share_by_handoff_without_a_gap(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=SLOW_TTL) as c:
        await _three(c)
        before = await c.counters(["d1", "d2", "d3"])
        joined_at = await c.db_now()
        started = time.monotonic()
        await c.start("d4")
        await eventually(lambda: c.ready("d4"), timeout=30, what="d4 ready")
        ready_s = time.monotonic() - started
        split_s = await c.wait_split(
            {"d1": 3, "d2": 3, "d3": 3, "d4": 3}, timeout=SLOW_TTL, what="3/3/3/3"
        )
        total_s = time.monotonic() - started
        registered = await db.fetchval("SELECT started_at FROM daemons WHERE daemon_id = 'd4'")
        moved = await db.fetch(
            "SELECT site_id, extract(epoch FROM acquired_at - $1::timestamptz) AS s "
            "FROM site_leases WHERE owner = 'd4' ORDER BY site_id",
            registered,
        )
        after = await c.counters(["d1", "d2", "d3", "d4"])
        figure(
            f"join: d4 ready {ready_s:.2f} s after spawn; 3/3/3/3 {total_s:.2f} s after spawn "
            f"({split_s:.2f} s after ready); d4's leases acquired "
            + ", ".join(f"{r['site_id']} +{float(r['s']):.2f} s" for r in moved)
            + f" after d4 registered (lease_ttl {SLOW_TTL:.0f} s)"
        )
        assert len(moved) == 3
        assert max(float(r["s"]) for r in moved) < 3.0, "hand-off waited (for expiry?)"
        for name in ("d1", "d2", "d3"):
            gave = after[name]["lease_handoffs_total"] - before[name]["lease_handoffs_total"]
            assert gave == 1, (name, before[name], after[name])
            assert after[name]["lease_takeovers_total"] == before[name]["lease_takeovers_total"]
        assert after["d4"]["lease_takeovers_total"] == 0, "d4 took over instead of a hand-off"
        assert all(after[n]["leases_lost_total"] == 0 for n in after), after
        assert all(after[n]["fencing_refusals_total"] == 0 for n in after), after
        assert all(after[n]["daemons_live"] == 4 for n in after), after
        await c.more_alarms(2 * SITES)
        # No gap: every alarm generated before, during and after the rebalance is stored once,
        # and the moved sites' alarms were written by their holder of the moment.
        rows = await c.finish("join")
        writers = {
            r["lease_owner"]
            for r in rows
            if r["site_id"] in {m["site_id"] for m in moved} and r["at"] > joined_at
        }
        assert "d4" in writers, writers


@pytest.mark.timeout(150)
async def test_sigterm_hands_the_sites_over_at_once_and_exits_0(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=SLOW_TTL) as c:
        await _three(c)
        leaving = await c.sites_of("d2")
        before = await c.counters(["d1", "d3"])
        started = time.monotonic()
        c.signal("d2", signal.SIGTERM)
        await eventually(
            lambda: c.held_by(leaving, "d1", "d3"),
            timeout=SLOW_TTL,
            what="d2's sites held by d1/d3",
        )
        moved_s = time.monotonic() - started
        code = await c.exit_code("d2", timeout=15)
        exit_s = time.monotonic() - started
        split_s = await c.wait_split({"d1": 6, "d3": 6}, timeout=5, what="6/6 after SIGTERM")
        split_s += moved_s
        figure(
            f"sigterm: d2's 4 sites held by d1/d3 {moved_s:.2f} s after the signal "
            f"(lease_ttl {SLOW_TTL:.0f} s); 6/6 everywhere {split_s:.2f} s; d2 exited "
            f"{code} after {exit_s:.2f} s"
        )
        assert code == 0
        # Shutdown drains the writer (up to 0.5 s), then releases its leases and leaves the
        # membership in one transaction; far less than lease_ttl: nobody waited for an expiry.
        assert moved_s < 3.5, f"took {moved_s:.1f} s"
        released = c.nodes["d2"].events("leases_released")
        assert [(e["reason"], e["sites"]) for e in released][-1:] == [("shutdown", 4)], released
        assert c.nodes["d2"].events("stopped")
        after = await c.counters(["d1", "d3"])
        for name in after:
            assert after[name]["lease_takeovers_total"] == before[name]["lease_takeovers_total"]
            assert after[name]["leases_lost_total"] == 0
        live = await db.fetchval("SELECT count(*) FROM daemons WHERE expires_at > now()")
        assert live == 2, "d2 left the membership"
        await c.more_alarms(2 * SITES)
        await c.finish("sigterm")


@pytest.mark.timeout(150)
async def test_sigstop_inside_a_commit_its_sites_still_move_within_the_ttl(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=FAST_TTL) as c:
        await _three(c)
        victim = await c.sites_of("d3")
        # d3's next alarm insert sleeps inside its commit (lease rows share-locked by the
        # fencing check); it is frozen right there, as a paused VM or a SIGSTOP would.
        await c.stall("d3", "alarm", 1.0)

        async def sleeping() -> bool:
            return any(t["wait_event"] == "PgSleep" for t in await c.open_transactions("d3"))

        await eventually(sleeping, timeout=10, what="d3 inside its commit")
        started = time.monotonic()
        c.signal("d3", signal.SIGSTOP)
        bound = FAST_TTL + 5
        try:
            await eventually(
                lambda: c.held_by(victim, "d1", "d2"),
                timeout=bound,
                what="d3's sites held by d1/d2",
            )
        except AssertionError:
            owners = await c.live_owners()
            stuck = sorted(s for s in victim if owners.get(s) not in ("d1", "d2"))
            held = await db.fetch(
                "SELECT site_id, owner, expires_at < now() AS expired FROM site_leases "
                "WHERE site_id = ANY($1) ORDER BY site_id",
                stuck,
            )
            raise AssertionError(
                f"after {bound:.0f} s (lease_ttl {FAST_TTL:.0f} s) {stuck} not taken over: "
                f"{[dict(r) for r in held]}; d3's open transactions: "
                f"{await c.open_transactions('d3')}"
            ) from None
        figure(f"sigstop inside a commit: taken over after {time.monotonic() - started:.2f} s")
        c.signal("d3", signal.SIGCONT)
        await c.finish("sigstop inside a commit")


@pytest.mark.timeout(150)
async def test_sigterm_with_a_slow_leave_still_hands_the_sites_over_at_once(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with cluster(database_url, db, tmp_path, ttl=SLOW_TTL) as c:
        await _three(c)
        leaving = await c.sites_of("d2")
        # d2's DELETE from `daemons` (leaving the membership) takes 0.3 s, as a busy
        # database may; its leases are released just before it.
        await c.stall("d2", "leave", 0.3)
        started = time.monotonic()
        c.signal("d2", signal.SIGTERM)
        await eventually(
            lambda: c.held_by(leaving, "d1", "d3"),
            timeout=SLOW_TTL,
            what="d2's sites held by d1/d3",
        )
        moved_s = time.monotonic() - started
        assert await c.exit_code("d2", timeout=15) == 0
        taken_s = await c.taken_after_release_s("d2", leaving)
        figure(
            f"sigterm with a 0.3 s leave: d2's sites held by d1/d3 after {moved_s:.2f} s, "
            f"{taken_s:.2f} s after its release committed"
        )
        await c.finish("sigterm with a 0.3 s leave")
        # Woken by the release's notice, not by their next tick (every 2 s): the survivors
        # take the sites in well under a tick after the commit, however loaded the machine.
        assert taken_s < 1.0, f"{taken_s:.2f} s: a survivor waited for its next keeper tick"
