"""Helpers for tests that run the daemon, in-process or as a real process, against simulators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pydantic import SecretStr

from cms_ingest.config import ActionsConfig, AppConfig, FloodConfig, MediaConfig, SiteConfig
from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.domain import CommHistory, DaemonIdentity, SiteLease
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.comm_loss import CommLossTracker
from cms_ingest.runtime.daemon import Daemon, run_daemon
from cms_ingest.runtime.flood import FloodTracker
from cms_ingest.runtime.leases import LeaseKeeper
from cms_ingest.runtime.poller import FIRST_POLL_PATIENCE_S, SitePoller
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.sites import SiteRegistry, SiteRuntime
from cms_ingest.runtime.tasks import Gate, TaskSupervisor
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.sitehttp import new_client_session
from tests.conftest import eventually

# What each vendor's simulator accepts by default.
CREDENTIALS: dict[str, dict[str, Any]] = {
    "davantis": {"username": "cms", "password": SecretStr("secret")},
    "camtrace": {"username": "cms", "password": SecretStr("secret")},
    "videoloft": {"username": "cms@example.com", "password": SecretStr("secret")},
    "exacq": {"username": "cms", "password": SecretStr("secret")},
    "camstreamer": {"token": SecretStr("api-token"), "poll_interval": 1.2},
}


def site_config(vendor: str, site_id: str, url: str, **overrides: Any) -> SiteConfig:
    """A site polling fast against a simulator, with the simulator's default credentials."""
    values: dict[str, Any] = {
        "id": site_id,
        "vendor": vendor,
        "url": url,
        "poll_interval": 0.1,
        "request_timeout_s": 2.0,
        **CREDENTIALS[vendor],
    }
    values.update(overrides)
    return SiteConfig(**values)


def davantis_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("davantis", site_id, url, **overrides)


def camtrace_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("camtrace", site_id, url, **overrides)


def videoloft_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("videoloft", site_id, url, **overrides)


def exacq_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("exacq", site_id, url, **overrides)


def camstreamer_site(site_id: str, url: str, **overrides: Any) -> SiteConfig:
    return site_config("camstreamer", site_id, url, **overrides)


def app_config(
    database_url: str, data_dir: Path, sites: list[SiteConfig], **overrides: Any
) -> AppConfig:
    values: dict[str, Any] = {
        "database_url": SecretStr(database_url),
        "data_dir": data_dir,
        "listen": "127.0.0.1:0",
        "media": MediaConfig(retry_base_s=0.2, retry_max_s=0.5),
        "actions": ActionsConfig(sweep_interval_s=0.5, running_timeout_s=5.0),
        "sites": sites,
    }
    values.update(overrides)
    return AppConfig(**values)


@contextlib.asynccontextmanager
async def running_daemon(config: AppConfig) -> AsyncIterator[Daemon]:
    """The daemon in this event loop, ready (migrated, pollers started); stopped on exit."""
    stop = asyncio.Event()
    started: asyncio.Queue[Daemon] = asyncio.Queue()
    task = asyncio.create_task(run_daemon(config, stop=stop, on_started=started.put_nowait))
    try:
        daemon = await asyncio.wait_for(started.get(), timeout=30)
        await asyncio.wait_for(daemon.readiness.wait(), timeout=30)
        await asyncio.wait_for(daemon.first_polls(), timeout=30)
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


async def spawn_daemon(
    config: Path, log: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`cms-ingest run --config CONFIG` as a real process, its output appended to `log`.

    `env` defaults to ours with SITE_PASSWORD=secret (the simulators' password)."""
    with log.open("ab") as handle:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cms_ingest.cli",
            "run",
            "--config",
            str(config),
            stdout=handle,
            stderr=handle,
            env=dict(env) if env is not None else {**os.environ, "SITE_PASSWORD": "secret"},
        )


@contextlib.asynccontextmanager
async def daemon_process(
    config: Path, log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`spawn_daemon`, killed at the end if the test did not stop it."""
    process = await spawn_daemon(config, log, env)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# Ports for servers a test starts later (daemons, standby databases) come from below the
# kernel's ephemeral range (32768-60999 on Linux): a port the kernel handed out and took back
# went to the next outgoing connection often enough that a daemon, started a moment later,
# found its port taken. Each xdist worker draws from its own band, and never twice.
_PORT_BAND = 1500
_PORTS_FROM = 20000
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking), outside
    the ephemeral range and this worker's own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    band = int(worker) % 8 if worker.isdigit() else 0
    first = _PORTS_FROM + band * _PORT_BAND
    candidates = [p for p in range(first, first + _PORT_BAND) if p not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port left in {first}-{first + _PORT_BAND - 1}")


async def ready(port: int) -> bool:
    """Does the daemon listening on `port` answer /readyz with 200? False when it does not
    answer at all (not started yet, or gone)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
            ) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def metrics(port: int) -> list[Sample]:
    """Every sample the daemon listening on `port` exposes at /metrics (it must answer)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=2)
        ) as response,
    ):
        assert response.status == 200, response.status
        body = await response.text()
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples called `name` whose labels include `labels`; None if none is."""
    values = [
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return float(sum(values)) if values else None


def log_events(log: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon's log file (`log_format: json`), those of event `name`
    only when given; lines that are not JSON objects are skipped."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (name is None or record.get("event") == name):
            found.append(record)
    return found


async def final(db: asyncpg.Connection, action_id: int, timeout: float = 10) -> asyncpg.Record:
    """The `actions` row once it has finished (succeeded, failed or expired)."""

    async def done() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT * FROM actions WHERE id = $1", action_id)
        return row if row["state"] in ("succeeded", "failed", "expired") else None

    return await eventually(done, timeout=timeout, what=f"action {action_id} to finish")


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as a device ships with: (cert, key) PEM
    files. Skips the test when openssl is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = folder / "device.pem", folder / "device.key"
    request = ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    names = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", *request, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


# ------------------------------------------------ direct tests on the in-memory storage adapter

NO_DATABASE = "postgresql://unused@127.0.0.1:1/none"  # direct tests never connect to it


def clock_at_now() -> ManualClock:
    """A manual clock starting at the wall clock's now. The runtime parts read the wall clock
    themselves (a media deadline, an action's `not_after`, comm loss), so the storage's time
    must start where theirs is, then move only when a test moves it."""
    return ManualClock(datetime.now(UTC))


def memory_storage() -> MemoryStorage:
    return MemoryStorage(clock=clock_at_now())


@contextlib.asynccontextmanager
async def site_registry(config: AppConfig) -> AsyncIterator[SiteRegistry]:
    """The configured sites with their vendor clients, over one HTTP session."""
    session = new_client_session()
    sites = SiteRegistry(config, session)
    try:
        yield sites
    finally:
        await sites.close()
        await session.close()


@contextlib.asynccontextmanager
async def running(body: Callable[[asyncio.Event], Awaitable[None]]) -> AsyncIterator[asyncio.Event]:
    """`body(stop)` as a task (a writer, a worker's loop); stopped, and must end, on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(body(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def site_poller(
    site: SiteRuntime,
    writer: AlarmWriter,
    *,
    cursor: Mapping[str, Any] | None = None,
    history: CommHistory | None = None,
    flood: FloodConfig | None = None,
    start_within_s: float = 1.0,
    overdue: bool = False,
    first_poll_gate: Gate | None = None,
    first_poll_patience_s: float = FIRST_POLL_PATIENCE_S,
) -> SitePoller:
    """A site's poller as the poller set builds it."""
    flood = flood or FloodConfig()
    return SitePoller(
        site,
        writer,
        cursor=cursor,
        start_within_s=start_within_s,
        overdue=overdue,
        first_poll_gate=first_poll_gate,
        first_poll_patience_s=first_poll_patience_s,
        comm_loss=CommLossTracker(
            site_id=site.config.id,
            timeout_s=site.config.supervision_timeout,
            restore_after_s=site.options.restore_after_s,
            history=history or CommHistory(),
        ),
        flood=FloodTracker(
            max_per_minute=flood.max_per_minute,
            quiet_s=flood.quiet_s,
            fetch_media=flood.fetch_media,
        ),
    )


# ----------------------------------- daemons' runtime parts over one in-memory storage adapter

KEEPER_TTL_S = 0.6  # keeper ticks every 0.2 s; leases expire only when the manual clock moves


def identity(name: str) -> DaemonIdentity:
    # A host of its own per daemon: daemons of one host and process would take each other
    # for a dead predecessor and free each other's leases at start.
    return DaemonIdentity(daemon_id=name, host=f"host-{name}", pid=1, boot_id="", version="")


class RecordingLeases:
    """One daemon's door to the shared storage's leases, noting what was still running when
    it released leases; every other call goes to the storage unchanged."""

    def __init__(self, storage: MemoryStorage, tasks: TaskSupervisor) -> None:
        self._storage = storage
        self._tasks = tasks
        self.pollers: PollerSet | None = None
        self.releases: list[tuple[set[str], list[str], set[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    async def release(
        self, me: str, leases: Mapping[str, int], *, leaving: bool = False
    ) -> set[str]:
        assert self.pollers is not None
        running = [
            name.split(":", 1)[1] for name in self._tasks.names if name.startswith("poller:")
        ]
        self.releases.append((set(leases), running, set(self.pollers.held)))
        return await self._storage.release(me, leases, leaving=leaving)


@dataclass
class Node:
    """One daemon's runtime parts, as `Daemon` wires them."""

    name: str
    tasks: TaskSupervisor
    sites: SiteRegistry
    store: MemoryStorage
    pollers: PollerSet
    keeper: LeaseKeeper
    leases: RecordingLeases
    config: AppConfig

    def run_keeper(self) -> None:
        self.tasks.start("leases", self.keeper.run)

    def held(self) -> set[str]:
        return set(self.pollers.held)


@contextlib.asynccontextmanager
async def node(
    name: str,
    store: MemoryStorage,
    config: AppConfig,
    *,
    ttl_s: float = KEEPER_TTL_S,
    metrics: Metrics | None = None,
) -> AsyncIterator[Node]:
    """`metrics`: the daemon's, shared by every part that counts (a private one each when
    None)."""
    session = new_client_session()
    tasks = TaskSupervisor(metrics=metrics)
    sites = SiteRegistry(config, session, metrics=metrics)

    # As the daemon wires them: the writer commits under the leases the poller set holds.
    def lease_of(site_id: str) -> SiteLease | None:
        return pollers.lease_of(site_id)

    def media_deadline_of(site_id: str) -> float:
        return pollers.media_deadline_of(site_id)

    writer = AlarmWriter(
        store, lease_of=lease_of, media_deadline_of=media_deadline_of, metrics=metrics
    )
    pollers = PollerSet(
        tasks,
        sites,
        store,
        writer,
        daemon_id=name,
        media_deadline_s=60.0,
        flood=config.flood,
        metrics=metrics,
    )
    leases = RecordingLeases(store, tasks)
    leases.pollers = pollers
    keeper = LeaseKeeper(leases, identity(name), ttl_s, pollers, metrics=metrics)
    tasks.start("writer", writer.run)
    try:
        yield Node(name, tasks, sites, store, pollers, keeper, leases, config)
    finally:
        # The daemon's shutdown order.
        await tasks.stop_tasks(["leases"], timeout=2.0)
        await pollers.halt()
        await tasks.stop_tasks(["writer"], timeout=2.0)
        await keeper.release_all(reason="shutdown")
        await tasks.stop_all(timeout=2.0)
        await sites.close()
        await session.close()


def tenants(*names: str) -> dict[str, DavantisSite]:
    return {name: DavantisSite(media_delay=0) for name in names}


def sites_of(sim: DavantisSimulator, names: Iterable[str]) -> list[SiteConfig]:
    return [davantis_site(name, sim.url(name)) for name in names]


async def take(node: Node, *site_ids: str) -> dict[str, int]:
    """Leases taken for `node` straight in the store, as the keeper takes them."""
    await node.leases.ensure_sites(site_ids)
    taken = await node.leases.acquire(node.name, KEEPER_TTL_S * 10, list(site_ids), len(site_ids))
    return {lease.site_id: lease.epoch for lease in taken}


def stored_ids(store: MemoryStorage, site_id: str) -> set[int]:
    alarms = (row.alarm for row in store.alarms.values())
    return {int(alarm.source_id) for alarm in alarms if alarm.site_id == site_id}


def owner(store: MemoryStorage, site_id: str) -> tuple[str | None, int]:
    lease = store.leases[site_id]
    return lease.owner, lease.epoch


async def first_polls(node: Node, *site_ids: str) -> None:
    """Until these sites were polled once: a new site's cursor starts at its newest alarm, so
    only alarms raised after its first poll are stored."""
    polled = [node.sites.by_id[site_id].health.polled.wait() for site_id in site_ids]
    await asyncio.wait_for(asyncio.gather(*polled), timeout=10)


def pollers_running(node: Node) -> set[str]:
    return {name.split(":", 1)[1] for name in node.tasks.names if name.startswith("poller:")}


def holding(node: Node, site_ids: set[str]) -> Callable[[], bool]:
    """A check for `eventually`: `node` holds exactly these sites and runs exactly their
    pollers. (A site stops being held when its stop begins; its poller ends a moment later,
    once its last commit is done.)"""
    return lambda: node.held() == site_ids and pollers_running(node) == site_ids
