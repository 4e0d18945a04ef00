"""Database outages and failover, with real daemon processes and private PostgreSQL clusters.

Each test starts PostgreSQL clusters of its own (the binaries bundled with pgserver, listening
on free loopback ports only, data in a private temporary directory linked from tmp_path as
`pg`, server logs copied to `pg-logs`), runs `cms-ingest run` as a subprocess against simulated
Davantis sites that keep producing alarms, and breaks the database under it: a restart, a dead
first host in a multi-host URL, a primary failover to a promoted standby, an old primary fenced
read-only but left running. Every alarm the simulator produced must be in `alarms` exactly once,
and the database password (a canary; trust auth ignores it) must never reach the daemon's log.

Running as root (CI containers), PostgreSQL refuses to start; like pgserver itself, the
clusters then run as the unprivileged `pgserver` user (created on first use by pgserver's helper).
Measured figures are printed: run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.sia_receiver import sia_receiver
from tests.support import daemon_process, final, free_port, log_events, metric_sum, metrics, ready

with warnings.catch_warnings():  # pgserver's platformdirs warns about XDG_RUNTIME_DIR
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH

PG_USER = "pgserver"  # the unprivileged account pgserver itself runs PostgreSQL as under root
CANARY = "canary-db-pw-7f3a"  # a database password (trust auth ignores it) that must never leak
SITES = ("k1", "k2")
RATE_PER_SITE = 15.0  # alarms per second per site while the generator runs


# ------------------------------------------------------------------ private clusters


@functools.cache
def _system_user() -> str | None:
    """None when we may run PostgreSQL ourselves; else the account to run it as (root)."""
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_folder_permissions, ensure_user_exists

    ensure_user_exists(PG_USER)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)  # what pgserver does for its binaries
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
    return PG_USER


@dataclass
class Cluster:
    """One PostgreSQL server: data in `root/name`, listening on 127.0.0.1:`port` only."""

    root: Path
    name: str
    user: str | None
    port: int = field(default_factory=free_port)

    @property
    def datadir(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, exe: str, *args: str, timeout: float = 60) -> None:
        # Output to a file, not a pipe: a postmaster inheriting a pipe would hold it open.
        with (self.root / "commands.log").open("ab") as out:
            subprocess.run(
                [str(POSTGRES_BIN_PATH / exe), *args],
                stdout=out,
                stderr=out,
                check=True,
                timeout=timeout,
                # As the user with its own group only, none of root's: files the server
                # creates are then plainly its own.
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user else None,
            )

    def configure(self, **settings: str | int) -> None:
        lines = [
            f"{key} = '{value}'" if isinstance(value, str) else f"{key} = {value}"
            for key, value in settings.items()
        ]
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def initdb(self) -> None:
        self.run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=utf8",
            "--no-sync",
        )
        self.configure(
            port=self.port,
            listen_addresses="127.0.0.1",
            unix_socket_directories="",
            max_connections=40,
            shared_buffers="16MB",
            wal_level="replica",
            max_wal_senders=4,
            hot_standby="on",
            fsync="off",  # no OS crash here: shutdown checkpoints still write everything
            full_page_writes="off",
            logging_collector="off",
        )

    def basebackup_from(self, primary: Cluster) -> None:
        """A streaming standby of `primary` (`-R` writes primary_conninfo and standby.signal)."""
        self.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.datadir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        self.configure(port=self.port)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")

    def promote(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "30", "promote")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def cleanup(self) -> None:
        if self.running():
            with contextlib.suppress(Exception):
                self.stop("immediate")


@pytest.fixture
def pg_root(tmp_path: Path) -> Iterator[Path]:
    """A private directory for the clusters' data, removed at the end (logs copied to tmp_path).

    Not inside tmp_path: under root the clusters run as another user, who must traverse the
    path to it, and every pytest session (other people's too) chmods /tmp/pytest-of-root
    back to 0700 when it starts.
    """
    root = Path(tempfile.mkdtemp(prefix="cms-ingest-pg-"))
    root.chmod(0o755)
    user = _system_user()
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    (tmp_path / "pg").symlink_to(root)
    try:
        yield root
    finally:
        (tmp_path / "pg").unlink()
        (tmp_path / "pg-logs").mkdir()
        for log in root.glob("*.log"):
            shutil.copy(log, tmp_path / "pg-logs" / log.name)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clusters(pg_root: Path) -> Iterator[list[Cluster]]:
    """Append `Cluster`s to the list; every one still running is stopped at the end."""
    made: list[Cluster] = []
    try:
        yield made
    finally:
        for cluster in reversed(made):
            cluster.cleanup()


async def new_cluster(made: list[Cluster], name: str, root: Path) -> Cluster:
    cluster = Cluster(root, name, _system_user())
    made.append(cluster)
    await asyncio.to_thread(cluster.initdb)
    await asyncio.to_thread(cluster.start)
    return cluster


async def create_database(cluster: Cluster, name: str = "cms") -> None:
    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


# ------------------------------------------------------------------ the daemon process


def write_config(
    path: Path,
    database_url: str,
    data_dir: Path,
    sites: dict[str, str],
    *,
    forward_to: int | None = None,
    lease_ttl: float = 15.0,
) -> int:
    """The daemon's YAML (sweeps rare, so a prompt action proves LISTEN); returns its port.
    With `forward_to`, every alarm is also forwarded over DC-09 to a receiver on that port."""
    port = free_port()
    lines = [
        f"database_url: '{database_url}'",
        f"data_dir: {data_dir}",
        f"listen: 127.0.0.1:{port}",
        "log_format: json",
        f"lease_ttl: {lease_ttl}",
        "actions: {sweep_interval_s: 60}",
        "defaults:",
        "  username: cms",
        "  password: ${SITE_PASSWORD}",
        "  poll_interval: 0.2",
        "sites:",
    ]
    for site_id, url in sites.items():
        lines.append(f"  - {{id: {site_id}, vendor: davantis, url: '{url}'}}")
    if forward_to is not None:
        lines += [
            "forwarders:",
            "  - name: station",
            f"    primary: 127.0.0.1:{forward_to}",
            f"    account: '{DC09_ACCOUNT}'",
            "    ack_timeout_s: 1",
            "    connect_timeout_s: 0.5",
            "    retry_base_s: 0.05",
            "    retry_max_s: 0.5",
        ]
    path.write_text("\n".join(lines) + "\n")
    return port


async def readyz_status(port: int) -> int:
    """/readyz's status; 0 when the daemon does not answer. (Unlike `support.ready`, tells
    a 503 from no answer: the outage must show as a 503.)"""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
            ) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def db_errors(port: int) -> float:
    """The sum of cms_ingest_db_errors_total over every operation."""
    return metric_sum(await metrics(port), "cms_ingest_db_errors_total") or 0.0


# ------------------------------------------------------------------ database checks


class Db:
    """Short-lived connections to one server (it is going to be stopped under us)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def value(self, sql: str, *args: object) -> object:
        try:
            connection = await asyncpg.connect(self.url, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            return await connection.fetchval(sql, *args, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return None
        finally:
            connection.terminate()

    async def count(self) -> int:
        value = await self.value("SELECT count(*) FROM alarms")
        return -1 if value is None else int(str(value))

    async def cursors(self) -> int:
        value = await self.value("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL")
        return -1 if value is None else int(str(value))


async def assert_exactly_once(url: str, sites: dict[str, DavantisSite]) -> dict[str, int]:
    """Every generated alarm stored, and nothing else (once each: the unique key on
    (site_id, source_id) sees to that); returns {'generated', 'lost'}."""
    connection = await asyncpg.connect(url)
    try:
        generated = lost = 0
        for name, site in sites.items():
            expected = {alarm.id for alarm in site.alarms}
            rows = await connection.fetch(
                "SELECT source_id FROM alarms WHERE site_id = $1 AND vendor = 'davantis'", name
            )
            stored = {int(row["source_id"]) for row in rows}
            generated += len(expected)
            lost += len(expected - stored)
            extra = sorted(stored - expected)
            assert not extra, f"{name}: alarms the device never raised: {extra[:10]}"
    finally:
        await connection.close()
    figures = {"generated": generated, "lost": lost}
    assert lost == 0, figures
    return figures


def generated(sites: dict[str, DavantisSite]) -> int:
    return sum(len(site.alarms) for site in sites.values())


async def drain_and_check(
    sim: DavantisSimulator, sites: dict[str, DavantisSite], db: Db, timeout: float = 30
) -> dict[str, int]:
    """Stop generating, wait until the daemon stored everything, check exactly-once."""
    await sim.stop_generator()
    total = generated(sites)
    await eventually(
        lambda: _at_least(db, total), timeout=timeout, interval=0.2, what=f"all {total} alarms"
    )
    return await assert_exactly_once(db.url, sites)


async def _at_least(db: Db, n: int) -> bool:
    return await db.count() >= n


async def stop_daemon(process: asyncio.subprocess.Process, log: Path) -> list[str]:
    """SIGTERM, exit 0; the log must not contain the database password. Returns the names
    of the events it logged, in order."""
    assert process.returncode is None, "the daemon exited during the test"
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert CANARY not in log.read_text(), "the database password reached the log"
    return [str(record.get("event")) for record in log_events(log)]


def report(name: str, figures: dict[str, object]) -> None:
    """Measured figures, visible with `pytest -s` (and in the captured output on failure)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


DC09_ACCOUNT = "C0FFEE"

# ------------------------------------------------------------------ the tests


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("outage", "lease_ttl"),
    [
        pytest.param(6.0, 15.0, id="6s"),
        # Longer than lease_ttl: the daemon also gives up its site leases meanwhile.
        pytest.param(9.0, 5.0, id="9s-past-a-5s-lease-ttl"),
    ],
)
async def test_database_restarted_mid_stream_loses_and_duplicates_nothing(
    clusters: list[Cluster], pg_root: Path, tmp_path: Path, outage: float, lease_ttl: float
) -> None:
    pg = await new_cluster(clusters, "main", pg_root)
    await create_database(pg)
    db = Db(pg.url("cms"))
    sites = {name: DavantisSite(media_delay=0) for name in SITES}
    receiver_port = free_port()
    async with (
        DavantisSimulator(dict(sites)) as sim,
        sia_receiver(receiver_port, [(DC09_ACCOUNT, None)]) as receiver,
    ):
        url = f"postgresql://postgres:{CANARY}@127.0.0.1:{pg.port}/cms"
        port = write_config(
            tmp_path / "cms.yaml",
            url,
            tmp_path / "data",
            {n: sim.url(n) for n in sites},
            forward_to=receiver_port,
            lease_ttl=lease_ttl,
        )
        log = tmp_path / "daemon.log"
        async with daemon_process(tmp_path / "cms.yaml", log) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(lambda: _cursors(db, len(sites)), timeout=15, what="cursors")
            sim.start_generator(RATE_PER_SITE, events=(1, 2, 11), seed=11)
            await eventually(lambda: _at_least(db, 40), timeout=15, what="40 alarms in")
            errors_before = await db_errors(port)

            # The outage: a fast shutdown (every session cut), then down while alarms come.
            stopped_at = time.monotonic()
            await asyncio.to_thread(pg.stop, "fast")
            first_new = {name: len(site.alarms) + 1 for name, site in sites.items()}
            before = generated(sites)
            assert await db.value("SELECT 1") is None, "the server is still up"
            saw_not_ready = False
            while time.monotonic() - stopped_at < outage:
                saw_not_ready |= await readyz_status(port) == 503
                assert daemon.returncode is None, "the daemon exited during the outage"
                await asyncio.sleep(0.2)
            errors_during = await db_errors(port)
            during = generated(sites) - before
            await asyncio.to_thread(pg.start)
            up_at = time.monotonic()
            outage_s = up_at - stopped_at

            # Resumed: the alarms raised during the outage land within seconds.
            await eventually(
                lambda: _outage_alarms(db, first_new), timeout=20, interval=0.1, what="resume"
            )
            resume_s = time.monotonic() - up_at
            await eventually(lambda: ready(port), timeout=15, what="ready again")
            # LISTEN reconnected: an action is fired at once (the sweep runs every 60 s).
            await eventually(lambda: _listening(db), timeout=20, what="LISTEN again")
            action_s = await fire_relay(db, "k1")
            figures = await drain_and_check(sim, sites, db)
            # Each alarm also reached the station's receiver over DC-09: once, across the
            # restart (the outbox rows were written with the alarms), each site's in order.
            # Not in id order across sites: two commits of different sites may finish in
            # either order (the writer keeps two in flight).
            ids = await db.value("SELECT array_agg(id ORDER BY id) FROM alarms")
            stored = [int(i) for i in ids] if isinstance(ids, list) else []
            await eventually(
                lambda: sorted(receiver.alarm_ids()) == stored,
                timeout=20,
                what="every alarm forwarded, once",
            )
            pairs = await db.value("SELECT json_object_agg(id, site_id) FROM alarms")
            site_of = {int(i): site for i, site in json.loads(str(pairs)).items()}
            for name in sites:
                sent = [i for i in receiver.alarm_ids() if site_of[i] == name]
                assert sent == sorted(sent), f"{name}: forwarded out of its own order"
            figures["forwarded"] = len(stored)
            figures["receiver_repeats"] = receiver.repeats()
            # Not asserted (runtime/media.py's business): media rows whose final write
            # failed in the outage stay leased until their lease runs out.
            stuck = await db.value(
                "SELECT count(*) FROM alarm_media WHERE state = 'pending' AND claimed_until > now()"
            )
            assert daemon.returncode is None, "the daemon exited"
            events = await stop_daemon(daemon, log)

    assert during > 0, "no alarms were raised during the outage"
    assert saw_not_ready or errors_during > errors_before, (
        "neither /readyz nor cms_ingest_db_errors_total showed the outage"
    )
    assert "started" in events and events.count("started") == 1, "the daemon restarted itself"
    # The server restarted: the pollers were restarted from the stored cursors, in case the
    # server came back without its last commits (past lease_ttl they had stopped anyway).
    assert "database_server_changed" in events or "leases_abandoned" in events
    report(
        f"restart {outage:.0f}s",
        {
            "outage_s": round(outage_s, 1),
            "resume_after_up_s": round(resume_s, 2),
            "alarms_during_outage": during,
            "readyz_503_seen": saw_not_ready,
            "db_errors_during_outage": errors_during - errors_before,
            "action_latency_after_s": round(action_s, 2),
            "media_rows_left_leased": stuck,
            **figures,
        },
    )


async def _outage_alarms(db: Db, first_new: dict[str, int]) -> bool:
    """Is any alarm raised after the server stopped stored yet?"""
    value = await db.value(
        "SELECT count(*) FROM alarms a JOIN jsonb_each_text($1::jsonb) f ON f.key = a.site_id "
        "WHERE a.source_id::bigint >= f.value::bigint",
        json.dumps(first_new),
    )
    return value is not None and int(str(value)) > 0


async def _more_than(db: Db, n: int) -> bool:
    return await db.count() > n


async def _cursors(db: Db, n: int) -> bool:
    return await db.cursors() >= n


@pytest.mark.timeout(60)
async def test_multi_host_url_with_the_first_host_down(
    clusters: list[Cluster], pg_root: Path, tmp_path: Path
) -> None:
    pg = await new_cluster(clusters, "main", pg_root)
    await create_database(pg)
    db = Db(pg.url("cms"))
    dead = free_port()  # nothing listens there: connection refused
    url = (
        f"postgresql://postgres:{CANARY}@127.0.0.1:{dead},127.0.0.1:{pg.port}/cms"
        "?target_session_attrs=read-write"
    )
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        port = write_config(tmp_path / "cms.yaml", url, tmp_path / "data", {"d1": sim.url()})
        log = tmp_path / "daemon.log"
        async with daemon_process(tmp_path / "cms.yaml", log) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(lambda: _cursors(db, 1), timeout=15, what="cursor")
            site.add_alarms(5, event=11)
            await eventually(lambda: _at_least(db, 5), timeout=15, what="5 alarms")
            # LISTEN: the action worker sweeps only every 60 s here, so a prompt action
            # means the NOTIFY arrived over the listener's own multi-host connection.
            await eventually(lambda: _listening(db), timeout=15, what="LISTEN connection")
            action_s = await fire_relay(db, "d1")
            assert site.relay_log == [(2, False)]
            await assert_exactly_once(db.url, {"d1": site})
            await stop_daemon(daemon, log)
    report("multi-host", {"action_latency_s": round(action_s, 2), "alarms": len(site.alarms)})


async def _listening(db: Db) -> bool:
    # The daemon's LISTEN session, past its LISTEN (the last statement shown is the
    # LISTEN itself, or later the periodic probe).
    value = await db.value(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'cms' "
        "AND application_name = 'cms-ingest-listen' "
        "AND (query ILIKE 'LISTEN%' OR query ILIKE '%pg_is_in_recovery%' OR query = 'SELECT 1')"
    )
    return value is not None and int(str(value)) > 0


async def fire_relay(db: Db, site_id: str) -> float:
    """An operator's relay action, inserted now, succeeds within 5 s; returns its latency.
    The worker sweeps the table only every 60 s here: so fast, only a NOTIFY woke it."""
    connection = await asyncpg.connect(db.url)
    try:
        inserted = time.monotonic()
        action_id = await connection.fetchval(
            "INSERT INTO actions (site_id, kind, target, params) "
            "VALUES ($1, 'relay', '2', '{\"state\": false}') RETURNING id",
            site_id,
        )
        action = await final(connection, action_id, timeout=5)
        latency = time.monotonic() - inserted
    finally:
        await connection.close()
    assert action["state"] == "succeeded", dict(action)
    return latency


@pytest.mark.timeout(60)
async def test_primary_failover_to_a_promoted_standby(
    clusters: list[Cluster], pg_root: Path, tmp_path: Path
) -> None:
    primary, standby = await primary_and_standby(clusters, pg_root)
    # The standby first: target_session_attrs=read-write must skip it for the primary.
    url = (
        f"postgresql://postgres:{CANARY}@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/cms"
        "?target_session_attrs=read-write"
    )
    sites = {name: DavantisSite(media_delay=0) for name in SITES}
    async with DavantisSimulator(dict(sites)) as sim:
        port = write_config(
            tmp_path / "cms.yaml", url, tmp_path / "data", {n: sim.url(n) for n in sites}
        )
        log = tmp_path / "daemon.log"
        old, new = Db(primary.url("cms")), Db(standby.url("cms"))
        async with daemon_process(tmp_path / "cms.yaml", log) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(lambda: _cursors(old, len(sites)), timeout=15, what="cursors")
            assert await _daemon_sessions(old) > 0
            assert await _daemon_sessions(new) == 0, "the daemon is connected to the standby"
            sim.start_generator(RATE_PER_SITE, events=(1, 2, 11), seed=5)
            await eventually(lambda: _at_least(old, 40), timeout=15, what="40 alarms in")

            # Failover: the primary goes (a fast shutdown ships its last WAL to the
            # standby first), then the standby is promoted, as Patroni would.
            started = time.monotonic()
            await asyncio.to_thread(primary.stop, "fast")
            before = generated(sites)
            await asyncio.sleep(2.0)  # the cluster has no primary for a while
            await asyncio.to_thread(standby.promote)
            promoted_at = time.monotonic()
            during = generated(sites) - before
            count_at_promotion = await new.count()
            await eventually(
                lambda: _more_than(new, count_at_promotion),
                timeout=20,
                interval=0.1,
                what="alarms on the new primary",
            )
            resume_s = time.monotonic() - promoted_at
            assert daemon.returncode is None
            await eventually(lambda: ready(port), timeout=15, what="ready again")
            # LISTEN followed too (its reconnect sweeps once; then NOTIFY alone wakes it).
            await eventually(lambda: _listening(new), timeout=20, what="LISTEN on new primary")
            await asyncio.sleep(1.0)  # past that sweep: only a NOTIFY can wake it in time
            action_s = await fire_relay(new, "k1")
            figures = await drain_and_check(sim, sites, new)
            events = await stop_daemon(daemon, log)
    # Another server now: pollers restarted from what it has stored (see _follow_server).
    assert "database_server_changed" in events
    report(
        "failover",
        {
            "no_primary_s": round(promoted_at - started, 1),
            "resume_after_promotion_s": round(resume_s, 2),
            "alarms_during_failover": during,
            "action_latency_after_s": round(action_s, 2),
            **figures,
        },
    )


async def primary_and_standby(clusters: list[Cluster], root: Path) -> tuple[Cluster, Cluster]:
    """A primary with the `cms` database, and a standby streaming from it."""
    primary = await new_cluster(clusters, "primary", root)
    await create_database(primary)
    standby = Cluster(root, "standby", primary.user)
    clusters.append(standby)
    await asyncio.to_thread(standby.basebackup_from, primary)
    await asyncio.to_thread(standby.start)
    await eventually(lambda: _streaming(primary), timeout=15, what="standby streaming")
    return primary, standby


async def _streaming(primary: Cluster) -> bool:
    value = await Db(primary.url()).value(
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    )
    return value is not None and int(str(value)) > 0


async def _daemon_sessions(db: Db) -> int:
    value = await db.value(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cms-ingest'"
    )
    return -1 if value is None else int(str(value))


@pytest.mark.timeout(60)
async def test_fenced_primary_left_running_read_only(
    clusters: list[Cluster], pg_root: Path, tmp_path: Path
) -> None:
    """A switchover that fences the old primary (read-only, still up) instead of stopping it.

    Its sessions stay open, so pool_pre_ping alone would keep every pooled connection on it
    and every commit failing with "read-only transaction" until pool_recycle; the LISTEN
    connection would stay on it too and never see a NOTIFY again.
    """
    primary, standby = await primary_and_standby(clusters, pg_root)
    url = (
        f"postgresql://postgres:{CANARY}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/cms"
        "?target_session_attrs=read-write"
    )
    sites = {name: DavantisSite(media_delay=0) for name in SITES}
    async with DavantisSimulator(dict(sites)) as sim:
        port = write_config(
            tmp_path / "cms.yaml", url, tmp_path / "data", {n: sim.url(n) for n in sites}
        )
        log = tmp_path / "daemon.log"
        old, new = Db(primary.url("cms")), Db(standby.url("cms"))
        async with daemon_process(tmp_path / "cms.yaml", log) as daemon:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(lambda: _cursors(old, len(sites)), timeout=15, what="cursors")
            await eventually(lambda: _listening(old), timeout=15, what="LISTEN on the primary")
            sim.start_generator(RATE_PER_SITE, events=(1, 2, 11), seed=3)
            await eventually(lambda: _at_least(old, 40), timeout=15, what="40 alarms in")

            started = time.monotonic()
            await old.value("ALTER SYSTEM SET default_transaction_read_only = on")
            await old.value("SELECT pg_reload_conf()")  # applies to open sessions too
            before = generated(sites)
            await eventually(lambda: _caught_up(primary, standby), timeout=10, what="replayed")
            await asyncio.to_thread(standby.promote)
            promoted_at = time.monotonic()
            count_at_promotion = await new.count()
            await eventually(
                lambda: _more_than(new, count_at_promotion),
                timeout=20,
                interval=0.1,
                what="alarms on the new primary",
            )
            resume_s = time.monotonic() - promoted_at
            during = generated(sites) - before
            await eventually(lambda: _listening(new), timeout=25, what="LISTEN on new primary")
            listen_s = time.monotonic() - promoted_at
            # LISTEN followed (its reconnect sweeps once; then NOTIFY alone wakes it).
            await asyncio.sleep(1.0)  # past that sweep: only a NOTIFY can wake it in time
            action_s = await fire_relay(new, "k1")
            figures = await drain_and_check(sim, sites, new)
            assert await _daemon_sessions(old) == 0, "sessions left on the fenced primary"
            await stop_daemon(daemon, log)
    report(
        "fenced",
        {
            "fenced_to_promoted_s": round(promoted_at - started, 1),
            "resume_after_promotion_s": round(resume_s, 2),
            "listen_moved_after_s": round(listen_s, 1),
            "alarms_during_switchover": during,
            "action_latency_after_s": round(action_s, 2),
            **figures,
        },
    )


async def _caught_up(primary: Cluster, standby: Cluster) -> bool:
    sent = await Db(primary.url()).value("SELECT pg_current_wal_lsn()::text")
    replayed = await Db(standby.url()).value(
        "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), $1::text::pg_lsn) >= 0", sent
    )
    return bool(replayed)
