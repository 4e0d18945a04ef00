"""Benchmark: N simulated Davantis sites, each on its own host:port, polled at 1 Hz.

Every mode runs the simulator as `--sim-procs` processes (default 2, each serving a slice of
the sites with `--port-per-site`: every site on its own listening socket, so one keep-alive
connection and one connection-pool entry per site, as with real devices) and
`cms-ingest run` daemon processes against PostgreSQL ($CMS_INGEST_TEST_DATABASE_URL, else an
embedded one; every run makes and drops its own database). RLIMIT_NOFILE is raised to the
hard limit (children inherit it). Printed for every window: the simulators' CPU (summed and
the busiest process: one near 1.00 core would make the simulator the bottleneck), the whole
machine's busy cores, the part neither the daemon nor the simulators used (PostgreSQL,
other people's work) and the load average: the machine is shared, read the figures with
them. Nothing asserts a threshold; the figures go into notes and are compared by people.

    export CMS_INGEST_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/sites.py --sites 2000 [--duration 30] [--rate 0.02] [--daemons 1]

  Default mode: warm up until every site has its cursor and a lease holder, split evenly
  (past `--warmup-timeout`, 300 s, the window is measured anyway and says how far it got),
  settle, then a `--duration` window: polls/s (the daemon's cms_ingest_polls_total between
  two scrapes, and the GET /alarms the simulators answered), sites on schedule, alarm
  latency device->commit, CPU (cores, and per GET /alarms answered), RSS, event-loop lag
  (the daemon's histogram), open sockets, how long a /metrics scrape took, and SIGTERM to
  exit at the end (per daemon).

    .venv/bin/python bench/sites.py --sites 2000 --rate 0 --baseline [--duration 30]

  `--baseline`: first the bare poll loop (bench/bare_loop.py, its own process: one aiohttp
  session sized for N, a token per site, one `GET /alarms?cra=yes&min_id=0` per site per
  second on a staggered fixed schedule) against the same simulated sites, then the daemon,
  then a one-site daemon (for memory per site); a table side by side with daemon/bare.
  Definitions:
  - polls answered / target: GET /alarms the simulators answered in the window (they count
    per site; the window opens and closes when they are signalled) / (N * window / 1 s);
  - sites with >= window-1 polls: sites that missed at most one slot in the window;
  - polls counted by the poller: the bare loop's requests started for slots in its window,
    the daemon's cms_ingest_polls_total per second;
  - bare loop only: share of polls started within 0.5 s of their slot, lateness p50/p99/max;
  - CPU per poll: utime+stime of the poller process over the window / polls answered (bare:
    its own successful requests);
  - KB per site: bare = (RSS at the end - RSS before the first connection) / N; daemon =
    (RSS at the end - RSS of a daemon with the same configuration and one site) / N.

    .venv/bin/python bench/sites.py --sites 1000 --rate 0 --storm [--backlog 300]

  `--storm`: once the daemon is warm, every site gets `--backlog` alarms at once (SIGUSR2 to
  the simulators, default one full page of 300); prints alarms committed per second until
  all are stored (or `--storm-timeout`, or 60 s without progress after the first commit), the
  CPU of the daemon, of the PostgreSQL backends of the bench database and of the simulators,
  and checks idempotency: rows = alarms created (per site, against the simulators' own
  counts), no duplicate (site_id, source_id), no equal-content rows. `--profile` works here.

    .venv/bin/python bench/sites.py --sites 1000 --rate 0.05 --failover [--lease-ttl 15]

  `--failover`: three daemons (`--daemons`, at least 2); SIGKILL bench-0, `--freeze-after`
  (12 s) later SIGSTOP bench-1, wait lease_ttl + `--failover-wait` (10 s), then: per site of
  theirs, the time from the signal until the device saw its next alarm poll (the simulators
  record every pause over 2.5 s between two GET /alarms, wall clock) and until its lease
  moved (site_leases.acquired_at); alarm latency of the alarms created from the kill on;
  alarms not yet stored and duplicates (by device id, and equal-content rows); then SIGCONT
  the frozen daemon and check again after `--after-cont` s: lost = created by the
  simulators after the window opened (per site, by id) and never stored (the check waits
  up to 60 s while missing ones still arrive).

    .venv/bin/python bench/sites.py --sites 10000 --rate 0 --interval 10 --handoff

  `--handoff`: one daemon holds every site (polled every `--interval` s); once it is warm
  and has run alone for `--settle` s, a second daemon joins and is handed half of them.
  Prints how long until the leases were split evenly, both daemons' event-loop lag (the
  giver's alone over the settle window and from the join on, the joiner's over its whole
  life: samples of the daemon's 50 ms timer over 50 ms late, and the worst histogram bucket
  reached), the garbage collector's pauses in each (`cms_ingest_gc_pause_seconds`: how many
  collections took over 50 ms, the worst bucket), their CPU, and the sites' pauses between
  two alarm polls (a handed site waits for the joiner's first poll).

    .venv/bin/python bench/sites.py --sites 2000 --rate 0 --profile /tmp/daemon.pyspy

  `--profile FILE` (default mode, `--baseline` or `--storm`): py-spy records the daemon
  during the window (`--nonblocking`, 100 Hz, raw collapsed stacks into FILE: open with
  speedscope or flamegraph.pl) and prints the top functions by own time, own time by
  package, and the cms_ingest functions by inclusive time. py-spy disturbs the daemon a
  little: take the CPU figures from a run without it.

    .venv/bin/python bench/sites.py --sites 10000 --rate 0 --duration 15 --warmup-timeout 60

  SIGTERM to exit at 10,000 sites (the last line of the default mode).

`--shared-port` serves all sites behind one port instead (one simulator process, `/t/<tenant>`
prefixes), the bench's old setup, to compare with earlier figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from cms_ingest.db.engine import plain_url
from cms_ingest.sitehttp import raise_open_files_limit

CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent
GAP_S = 2.5  # the simulators record pauses between two alarm polls longer than this


def gap_s(args: argparse.Namespace) -> float:
    """The pause between two alarm polls of a site the simulators record: GAP_S at 1 Hz,
    GAP_S past the interval when sites are polled less often."""
    return GAP_S if args.interval <= 1.0 else args.interval + GAP_S


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def raise_nofile() -> int:
    """Thousands of sockets: the soft limit up to the hard one (children inherit it)."""
    return raise_open_files_limit(sys.maxsize)[0]


async def alarm_latency(connection: asyncpg.Connection, where: str, *args: Any) -> Any:
    """Device creation -> commit of the alarms `where` selects: n, p50, p99, worst (s)."""
    return await connection.fetchrow(
        f"""
        WITH l AS (
            SELECT extract(epoch FROM received_at - occurred_at) AS s FROM alarms WHERE {where}
        )
        SELECT count(*) AS n,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
               max(s) AS worst
        FROM l
        """,
        *args,
    )


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def quantile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


# ------------------------------------------------------------------ simulators
@dataclass
class SimProc:
    process: asyncio.subprocess.Process
    urls: list[str]
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            with contextlib.suppress(ValueError):
                self.lines.put_nowait(json.loads(line))

    async def expect(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        while True:
            item = await asyncio.wait_for(self.lines.get(), timeout)
            if key in item:
                return item


class Simulators:
    """`--sim-procs` Davantis simulator processes, each serving a slice of the sites."""

    def __init__(self) -> None:
        self.procs: list[SimProc] = []
        self.site_ids: list[tuple[int, str]] = []  # (process, tenant) in the sites' order

    async def start(self, args: argparse.Namespace, backlog: int = 0) -> list[str]:
        count = 1 if args.shared_port else max(1, min(args.sim_procs, args.sites))
        sizes = [args.sites // count + (i < args.sites % count) for i in range(count)]
        for index, size in enumerate(sizes):
            command = [
                sys.executable,
                "-m",
                "cms_ingest.simulators.davantis",
                *("--sites", str(size), "--port", "0", "--rate", str(args.rate)),
                *("--media-delay", "1", "--track-gaps", str(gap_s(args)), "--seed", str(index)),
                *("--track-request", "GET /alarms"),
            ]
            if not args.shared_port:
                command.append("--port-per-site")
            if backlog:
                command += ["--backlog", str(backlog)]
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, limit=1 << 28
            )
            assert process.stdout is not None
            urls: list[str] = []
            while True:
                line = (await process.stdout.readline()).decode().strip()
                if line == "READY" or not line:
                    break
                urls.append(line)
            if len(urls) != size:
                raise SystemExit(f"simulator {index} printed {len(urls)} URLs, not {size}")
            proc = SimProc(process, urls)
            proc.reader = asyncio.create_task(proc.read())
            self.procs.append(proc)
            self.site_ids += [(index, url.rsplit("/", 1)[1]) for url in urls]
        return [url for proc in self.procs for url in proc.urls]

    def cpu(self) -> list[float]:
        return [cpu_seconds(proc.process.pid) for proc in self.procs]

    async def dump(self) -> list[dict[str, Any]]:
        """Every site's state, in the sites' order (SIGUSR1 to every simulator)."""
        for proc in self.procs:
            proc.process.send_signal(signal.SIGUSR1)
        dumps = [(await proc.expect("dump"))["sites"] for proc in self.procs]
        return [dumps[index][tenant] for index, tenant in self.site_ids]

    async def backlog(self) -> tuple[int, float, float]:
        """SIGUSR2: every site gets its backlog; (alarms added, first start, last done)."""
        for proc in self.procs:
            proc.process.send_signal(signal.SIGUSR2)
        answers = [await proc.expect("backlog") for proc in self.procs]
        return (
            sum(a["backlog"] for a in answers),
            min(a["at"] for a in answers),
            max(a["done"] for a in answers),
        )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.process.returncode is None:
                proc.process.terminate()
        for proc in self.procs:
            await proc.process.wait()
            if proc.reader is not None:
                proc.reader.cancel()


def alarm_polls(states: list[dict[str, Any]]) -> list[int]:
    return [int(state["requests"].get("GET /alarms", 0)) for state in states]


@dataclass
class SimWindow:
    """What the simulators saw in a window."""

    elapsed: float
    polls: list[int]  # GET /alarms per site
    cpu: list[float]  # seconds per simulator process
    machine: float  # busy cores of the whole machine (all processes, /proc/stat)
    load: float  # 1-minute load average at the end

    def summary(self, interval: float) -> dict[str, float]:
        target = len(self.polls) * self.elapsed / interval
        floor = self.elapsed / interval - 1
        return {
            "answered": sum(self.polls),
            "target": target,
            "share": sum(self.polls) / target,
            "sites_on_schedule": sum(p >= floor for p in self.polls) / len(self.polls),
            "min_site": min(self.polls),
            "sim_cores": sum(self.cpu) / self.elapsed,
            "sim_busiest": max(self.cpu) / self.elapsed,
        }


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


StartMark = tuple[float, list[int], list[float], tuple[int, int]]


async def sim_window_start(sims: Simulators) -> StartMark:
    started, cpu, jiffies = time.monotonic(), sims.cpu(), machine_jiffies()
    states = await sims.dump()  # counted when the signal lands, not when the dump is read
    return started, alarm_polls(states), cpu, jiffies


def sockets(pid: int) -> int:
    """Open sockets of a process (its connections, listeners, database links)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd).startswith("socket:")
    return count


async def sim_window_end(sims: Simulators, start: StartMark) -> SimWindow:
    t0, polls0, cpu0, jiffies0 = start
    elapsed = time.monotonic() - t0
    busy = machine_jiffies()[0] - jiffies0[0]
    cpu = [b - a for a, b in zip(cpu0, sims.cpu(), strict=True)]
    states = await sims.dump()
    polls = [b - a for a, b in zip(polls0, alarm_polls(states), strict=True)]
    machine = busy / CLK_TCK / elapsed
    return SimWindow(elapsed, polls, cpu, machine, os.getloadavg()[0])


# --------------------------------------------------------------------- daemons
def polls_in(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cms_ingest_polls_total{")
    )


SCRAPES: list[float] = []  # seconds each /metrics scrape took (a busy loop answers late)


async def metrics_text(session: aiohttp.ClientSession, port: int) -> str:
    started = time.monotonic()
    async with session.get(
        f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=120)
    ) as response:
        text = await response.text()
    SCRAPES.append(time.monotonic() - started)
    return text


def lag_buckets(
    text: str, histogram: str = "cms_ingest_event_loop_lag_seconds"
) -> dict[float, float]:
    """A histogram's cumulative buckets, {le: count}, summed over its other labels
    (`cms_ingest_gc_pause_seconds`: every generation)."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(histogram + "_bucket{"):
            le_text = line.split('le="', 1)[1].split('"', 1)[0]
            le = math.inf if le_text == "+Inf" else float(le_text)
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


GC_PAUSES = "cms_ingest_gc_pause_seconds"


def lag_summary(before: dict[float, float], after: dict[float, float]) -> str:
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get(math.inf, 0.0)
    if not total:
        return "no samples"
    parts = [f"{total:.0f} ticks"]
    for le in sorted(delta):
        if le != math.inf and le >= 0.05:
            parts.append(f"> {le * 1000:.0f} ms: {pct(total - delta[le], total)}")
    return ", ".join(parts[:5])


def write_config(
    path: Path,
    database_url: str,
    urls: list[str],
    port: int,
    data_dir: Path,
    instance: str,
    lease_ttl: float,
    interval: float = 1.0,
) -> None:
    lines = [
        f"database_url: {database_url}",
        f"data_dir: {data_dir}",
        f"listen: 127.0.0.1:{port}",
        f"instance_id: {instance}",
        f"lease_ttl: {lease_ttl}",
        "log_level: warning",
        "log_format: json",
        f"defaults: {{username: cms, password: secret, poll_interval: {interval}}}",
        "sites:",
    ]
    lines += [f"  - {{id: s{i:05d}, vendor: davantis, url: '{url}'}}" for i, url in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n")


async def start_daemons(
    workdir: Path,
    db_url: str,
    urls: list[str],
    count: int,
    lease_ttl: float,
    tag: str = "bench",
    *,
    interval: float = 1.0,
    first_port: int = 0,
) -> tuple[list[asyncio.subprocess.Process], list[int]]:
    """`count` daemons polling `urls` every `interval` s; metrics ports from `first_port`
    (0: a base of this bench process's own, so runs side by side do not collide)."""
    base = first_port or 19000 + (os.getpid() % 900) * 4 % 3600
    ports = [base + i for i in range(count)]
    daemons = []
    for i, port in enumerate(ports):
        config = workdir / f"{tag}-{i}.yaml"
        instance = f"{tag}-{i}"
        write_config(
            config, db_url, urls, port, workdir / f"data-{tag}", instance, lease_ttl, interval
        )
        log = (workdir / f"{tag}-{i}.log").open("wb")
        daemons.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cms_ingest.cli",
                "run",
                "--config",
                str(config),
                stdout=log,
                stderr=log,
            )
        )
    return daemons, ports


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError, asyncpg.PostgresError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


async def wait_ready(session: aiohttp.ClientSession, ports: list[int]) -> None:
    async def ready() -> bool:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status != 200:
                    return False
        return True

    await wait_until(ready, 180, "daemons ready")


WARMUP_TIMEOUT = [300.0]  # --warmup-timeout


async def wait_warm(
    connection: asyncpg.Connection, sites: int, daemons: int, *, strict: bool = True
) -> float:
    """Seconds until every site has its cursor and a holder, split evenly. Past
    --warmup-timeout: SystemExit when `strict`, else a warning and the time waited (the
    window is then measured anyway: a daemon that cannot warm up is a figure too)."""
    state = ""

    async def warmed() -> bool:
        nonlocal state
        count = await connection.fetchval(
            "SELECT count(*) FROM site_state WHERE cursor IS NOT NULL"
        )
        held = await connection.fetch(
            "SELECT owner, count(*) AS n FROM site_leases"
            " WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner"
        )
        split = [int(row["n"]) for row in held]
        state = f"{count} of {sites} sites with a first poll, leases held {split}"
        even = len(split) == daemons and max(split) - min(split) <= 1
        return int(count) >= sites and sum(split) == sites and even

    started = time.monotonic()
    try:
        await wait_until(warmed, WARMUP_TIMEOUT[0], "every site's first poll and an even split")
    except SystemExit:
        if strict:
            raise
        print(f"NOT WARM after {time.monotonic() - started:.0f} s: {state}; measuring anyway")
    return time.monotonic() - started


async def terminate(daemons: list[asyncio.subprocess.Process]) -> tuple[float, list[str]]:
    """SIGTERM every daemon at once: (seconds until the last exited, per daemon
    "<exit code> after <seconds>")."""
    for daemon in daemons:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGCONT)
            daemon.terminate()
    started = time.monotonic()

    async def exited(daemon: asyncio.subprocess.Process) -> str:
        code = await daemon.wait()
        return f"{code} after {time.monotonic() - started:.2f} s"

    codes = await asyncio.gather(*(exited(d) for d in daemons))
    return time.monotonic() - started, list(codes)


async def create_database(server_url: str) -> tuple[str, str]:
    name = f"cms_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(plain_url(server_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base, query = plain_url(server_url), ""
    if "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    return name, f"{base.rsplit('/', 1)[0]}/{name}{query}"


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(plain_url(server_url))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def backend_cpu(connection: asyncpg.Connection, db_name: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving the bench database (same machine)."""
    pids = await connection.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        db_name,
    )
    seconds = {}
    for row in pids:
        with contextlib.suppress(OSError, IndexError):
            seconds[int(row["pid"])] = cpu_seconds(int(row["pid"]))
    return seconds


# ---------------------------------------------------------------------- py-spy
def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


async def start_profile(pid: int, path: str, seconds: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        py_spy(),
        "record",
        *("-p", str(pid), "--duration", str(math.ceil(seconds)), "--rate", "100"),
        *("--nonblocking", "--format", "raw", "-o", path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_profile(profile: asyncio.subprocess.Process, args: argparse.Namespace) -> None:
    """Let py-spy write its file (SIGINT ends a recording early and still writes it)."""
    if profile.returncode is None:
        profile.send_signal(signal.SIGINT)
    _, err = await profile.communicate()
    written = os.path.exists(args.profile) and os.path.getsize(args.profile) > 0  # noqa: ASYNC240
    if not written:
        print(f"py-spy failed ({profile.returncode}): {err.decode()[-500:]}")
        args.profile = None


def package_of(frame: str) -> str:
    """`function (path:line)` -> a short label: `cms_ingest.<package>`, or the top-level
    module (aiohttp, asyncio, yarl, ...; py-spy writes paths relative to sys.path)."""
    path = frame.rsplit("(", 1)[-1].rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    parts = path.split("/")
    if parts[0] == "cms_ingest" and len(parts) > 1:
        return "cms_ingest." + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py")


def print_profile(path: str, top: int = 20) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1].rsplit(":", 1)[0] + ")" if ":" in frames[-1] else frames[-1]
        own[leaf] += count
        packages[package_of(frames[-1])] += count
        for name in {f.rsplit(":", 1)[0] for f in frames}:
            inclusive[name + ")"] += count
    print(f"\npy-spy: {total} samples of the daemon on CPU (raw stacks in {path})")
    print("top functions by own time:")
    for name, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {name}")
    print("own time by package/module:")
    for name, count in packages.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {name}")
    print("top cms_ingest functions by inclusive time:")
    shown = 0
    for name, count in inclusive.most_common():
        if "(cms_ingest/" in name:
            print(f"  {100 * count / total:5.1f} %  {name}")
            shown += 1
            if shown == top:
                break


# ------------------------------------------------------------------- the modes
@dataclass
class DaemonWindow:
    elapsed: float
    polls_rate: float  # per second, from cms_ingest_polls_total between two scrapes
    cpu: float  # seconds, all daemons
    rss_kib: int  # largest daemon's VmRSS at the end
    hwm_kib: int  # largest daemon's VmHWM
    lag: str
    sim: SimWindow
    metrics_kib: list[float]
    sockets: int  # the largest daemon's open sockets at the end of the window
    latency: Any


async def daemon_window(
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    connection: asyncpg.Connection,
    sims: Simulators,
    daemons: list[asyncio.subprocess.Process],
    ports: list[int],
) -> DaemonWindow:
    # The daemon's own counters: one scrape each side (a busy daemon takes seconds to
    # answer one, so its polls/s is over the time between the scrapes); the CPU and the
    # simulators' counts are over the window itself.
    texts_before = [await metrics_text(session, port) for port in ports]
    scraped_before = time.monotonic()
    cpu_before = sum(cpu_seconds(d.pid) for d in daemons)
    sim_start = await sim_window_start(sims)
    window_start = await connection.fetchval("SELECT now()")
    profile = None
    if args.profile:
        profile = await start_profile(daemons[0].pid, args.profile, args.duration)
    t0 = time.monotonic()
    await asyncio.sleep(args.duration)
    elapsed = time.monotonic() - t0
    cpu_after = sum(cpu_seconds(d.pid) for d in daemons)
    open_sockets = max(sockets(d.pid) for d in daemons)
    sim = await sim_window_end(sims, sim_start)
    texts_after = [await metrics_text(session, port) for port in ports]
    scraped = time.monotonic() - scraped_before
    polls = sum(map(polls_in, texts_after)) - sum(map(polls_in, texts_before))
    lag_before = [lag_buckets(text) for text in texts_before]
    lag_after = [lag_buckets(text) for text in texts_after]
    merged_before: Counter[float] = Counter()
    merged_after: Counter[float] = Counter()
    for before, after in zip(lag_before, lag_after, strict=True):
        merged_before.update(before)
        merged_after.update(after)
    latency = await alarm_latency(connection, "received_at > $1", window_start)
    if profile is not None:
        await stop_profile(profile, args)
    return DaemonWindow(
        elapsed=elapsed,
        polls_rate=polls / scraped,
        cpu=cpu_after - cpu_before,
        rss_kib=max(status_kib(d.pid, "VmRSS") for d in daemons),
        hwm_kib=max(status_kib(d.pid, "VmHWM") for d in daemons),
        lag=lag_summary(dict(merged_before), dict(merged_after)),
        sim=sim,
        latency=latency,
        metrics_kib=[len(text) / 1024 for text in texts_after],
        sockets=open_sockets,
    )


async def bare_phase(
    args: argparse.Namespace, workdir: Path, sims: Simulators, urls: list[str]
) -> tuple[dict[str, Any], SimWindow]:
    url_file = workdir / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "bare_loop.py"),
        *("--urls", str(url_file), "--warmup", str(args.bare_warmup)),
        *("--duration", str(args.duration), "--loop", args.bare_loop),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    sim_start = None
    result: dict[str, Any] = {}
    while line := (await process.stdout.readline()).decode().strip():
        if line.startswith("WINDOW"):
            sim_start = await sim_window_start(sims)
        elif line.startswith("{"):
            result = json.loads(line)
            break
    if sim_start is None or not result:
        raise SystemExit("the bare loop ended without its figures")
    sim = await sim_window_end(sims, sim_start)
    await process.wait()
    return result, sim


async def one_site_rss(server_url: str, workdir: Path, url: str) -> int:
    """VmRSS (KiB) of a daemon with the same configuration and one site, polling."""
    name, db_url = await create_database(server_url)
    daemons, ports = await start_daemons(workdir, db_url, [url], 1, 15.0, tag="one")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await wait_ready(session, ports)
            connection = await asyncpg.connect(db_url)
            try:
                await wait_warm(connection, 1, 1)
            finally:
                await connection.close()
            await asyncio.sleep(5)
            return status_kib(daemons[0].pid, "VmRSS")
    finally:
        await terminate(daemons)
        await drop_database(server_url, name)


def print_daemon(args: argparse.Namespace, window: DaemonWindow, warmup: float) -> None:
    interval = args.interval
    sim = window.sim.summary(interval)
    target = args.sites / interval
    achieved = window.polls_rate
    print(
        f"sites                 {args.sites} every {args.interval:g} s, "
        f"{args.rate} alarms/s per site, "
        f"{args.daemons} daemon(s), {len(window.sim.cpu)} simulator process(es), "
        f"{'one shared port' if args.shared_port else 'one port per site'}, "
        f"{window.elapsed:.0f} s measured"
    )
    print(f"warm-up               {warmup:.1f} s until every site had its first poll committed")
    print(
        f"polls/s (daemon)      {achieved:.1f} achieved / {target:.1f} target "
        f"({pct(achieved, target)})"
    )
    print(
        f"polls (simulators)    {sim['answered']:.0f} / {sim['target']:.0f} "
        f"({pct(sim['share'], 1)}); sites with >= window-1 polls: "
        f"{pct(sim['sites_on_schedule'], 1)}; fewest for one site: {sim['min_site']}"
    )
    print(f"alarms in window      {window.latency['n']}")
    if window.latency["n"]:
        print(
            f"latency device->commit p50 {window.latency['p50'] * 1000:.0f} ms, "
            f"p99 {window.latency['p99'] * 1000:.0f} ms, "
            f"max {window.latency['worst'] * 1000:.0f} ms"
        )
    cores = window.cpu / window.elapsed
    answered = sum(window.sim.polls)
    per_poll = window.cpu / answered * 1e6 if answered else math.nan
    print(
        f"daemon CPU            {cores:.2f} cores (all daemons), {per_poll:.0f} µs per poll "
        "(per GET /alarms the simulators answered)"
    )
    print(f"daemon memory         {window.rss_kib / 1024:.0f} MiB RSS at the end (largest daemon)")
    print(f"                      {window.hwm_kib / 1024:.0f} MiB peak (VmHWM)")
    print(f"event-loop lag        {window.lag}")
    print(f"daemon sockets        {window.sockets} open at the end of the window (largest daemon)")
    print(
        f"/metrics scrapes      {len(SCRAPES)}, slowest {max(SCRAPES, default=0):.2f} s "
        f"({len(window.metrics_kib) and max(window.metrics_kib):.0f} KiB)"
    )
    print(
        f"simulators CPU        {sim['sim_cores']:.2f} cores, busiest process "
        f"{sim['sim_busiest']:.2f} core"
    )
    others = window.sim.machine - cores - sim["sim_cores"]
    print(
        f"machine ({os.cpu_count()} cores)     {window.sim.machine:.2f} cores busy, of which "
        f"{others:.2f} neither daemon nor simulators (PostgreSQL, other work); "
        f"load average {window.sim.load:.1f}"
    )


async def mode_default(
    args: argparse.Namespace, server_url: str, db_url: str, workdir: Path
) -> None:
    sims = Simulators()
    daemons: list[asyncio.subprocess.Process] = []
    bare: tuple[dict[str, Any], SimWindow] | None = None
    window = None
    one_site = 0
    stop: tuple[float, list[str]] | None = None
    try:
        urls = await sims.start(args)
        if args.baseline:
            bare = await bare_phase(args, workdir, sims, urls)
        daemons, ports = await start_daemons(
            workdir, db_url, urls, args.daemons, args.lease_ttl, interval=args.interval
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, ports)
            connection = await asyncpg.connect(db_url)
            try:
                warmup = await wait_warm(connection, args.sites, args.daemons, strict=False)
                await asyncio.sleep(args.settle)
                window = await daemon_window(args, session, connection, sims, daemons, ports)
            finally:
                await connection.close()
        stop = await terminate(daemons)
        if args.baseline:
            one_site = await one_site_rss(server_url, workdir, urls[0])
    finally:
        await terminate(daemons)
        await sims.stop()
    assert window is not None
    assert stop is not None
    print_daemon(args, window, warmup)
    print(f"SIGTERM to exit       {stop[0]:.2f} s (exit {', '.join(stop[1])})")
    if bare is not None:
        print_baseline(args, bare, window, one_site)
    if args.profile:
        print_profile(args.profile)


def print_baseline(
    args: argparse.Namespace,
    bare: tuple[dict[str, Any], SimWindow],
    window: DaemonWindow,
    one_site_kib: int,
) -> None:
    result, bare_sim = bare
    n = args.sites
    b_sim, d_sim = bare_sim.summary(1.0), window.sim.summary(1.0)
    b_cpu = result["cpu_s"] / result["ok"] * 1e6 if result["ok"] else math.nan
    answered = sum(window.sim.polls)
    d_cpu = window.cpu / answered * 1e6 if answered else math.nan
    b_kb = (result["rss_end_kib"] - result["rss_before_kib"]) / n * 1.024
    d_kb = (window.rss_kib - one_site_kib) / n * 1.024
    b_started = result["started"] / result["target"]
    b_cores = result["cpu_s"] / result["duration"]
    d_cores = window.cpu / window.elapsed
    rows = [
        ["", "bare loop", "daemon", "daemon/bare"],
        [
            "polls answered / target (simulators)",
            pct(b_sim["share"], 1),
            pct(d_sim["share"], 1),
            f"{d_sim['share'] / b_sim['share']:.3f}",
        ],
        [
            "sites with >= window-1 polls",
            pct(b_sim["sites_on_schedule"], 1),
            pct(d_sim["sites_on_schedule"], 1),
            "",
        ],
        [
            "polls counted by the poller / target",
            pct(b_started, 1),
            pct(window.polls_rate / n, 1),
            "",
        ],
        [
            f"bare: started within {result['on_time_s']} s of slot",
            pct(result["on_time"], result["target"]),
            "n/a",
            "",
        ],
        [
            "bare: lateness p50 / p99 / max",
            f"{result['late_p50'] * 1000:.1f} / {result['late_p99'] * 1000:.1f} / "
            f"{result['late_max'] * 1000:.0f} ms",
            "",
            "",
        ],
        ["CPU per poll (µs)", f"{b_cpu:.0f}", f"{d_cpu:.0f}", f"{d_cpu / b_cpu:.2f}"],
        [
            "CPU (cores)",
            f"{result['cpu_s'] / result['duration']:.2f}",
            f"{window.cpu / window.elapsed:.2f}",
            "",
        ],
        [
            "peak RSS (VmHWM, MiB)",
            f"{result['hwm_kib'] / 1024:.0f}",
            f"{window.hwm_kib / 1024:.0f}",
            f"{window.hwm_kib / result['hwm_kib']:.2f}",
        ],
        ["KB per site", f"{b_kb:.1f}", f"{d_kb:.1f}", f"{d_kb / b_kb:.2f}" if b_kb > 0 else ""],
        [
            "machine busy cores / others / load",
            f"{bare_sim.machine:.2f} / {bare_sim.machine - b_cores - b_sim['sim_cores']:.2f} / "
            f"{bare_sim.load:.1f}",
            f"{window.sim.machine:.2f} / "
            f"{window.sim.machine - d_cores - d_sim['sim_cores']:.2f} / {window.sim.load:.1f}",
            "",
        ],
        [
            "simulators CPU (cores, busiest proc)",
            f"{b_sim['sim_cores']:.2f}, {b_sim['sim_busiest']:.2f}",
            f"{d_sim['sim_cores']:.2f}, {d_sim['sim_busiest']:.2f}",
            "",
        ],
    ]
    print(
        f"\nbaseline, {n} sites, same simulators, {args.duration:.0f} s windows;"
        f" bare loop on {args.bare_loop}, daemon on its configured loop (uvloop)"
    )
    table(rows)
    print(
        f"(bare KB/site: (RSS at end {result['rss_end_kib']} - before connecting "
        f"{result['rss_before_kib']} KiB) / N; daemon: (RSS at end {window.rss_kib} - "
        f"one-site daemon {one_site_kib} KiB) / N; failed bare polls: {result['failed']}, "
        f"skipped slots: {result['skipped']})"
    )


async def mode_storm(args: argparse.Namespace, db_url: str, db_name: str, workdir: Path) -> None:
    sims = Simulators()
    daemons: list[asyncio.subprocess.Process] = []
    series: list[tuple[float, int]] = []
    try:
        urls = await sims.start(args, backlog=args.backlog)
        daemons, ports = await start_daemons(workdir, db_url, urls, args.daemons, args.lease_ttl)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, ports)
        connection = await asyncpg.connect(db_url)
        try:
            warmup = await wait_warm(connection, args.sites, args.daemons)
            await asyncio.sleep(args.settle)
            before = int(await connection.fetchval("SELECT count(*) FROM alarms"))
            cpu0 = sum(cpu_seconds(d.pid) for d in daemons)
            pg0 = await backend_cpu(connection, db_name)
            sim_cpu0 = sum(sims.cpu())
            profile = None
            if args.profile:
                profile = await start_profile(daemons[0].pid, args.profile, args.storm_timeout)
            created, at, done = await sims.backlog()
            t0 = time.time()
            print(
                f"storm: {created} alarms ({args.backlog} per site, {args.sites} sites) added in "
                f"{done - at:.2f} s; the daemon had committed {before} before"
            )
            stalled = 0
            while True:
                await asyncio.sleep(1.0)
                stored = int(await connection.fetchval("SELECT count(*) FROM alarms")) - before
                series.append((time.time() - at, stored))
                # Stalled: nothing more for 60 s after the first commit (the first one may take
                # long: a batch of sites' full pages is one transaction).
                previous = series[-2][1] if len(series) > 1 else 0  # the first sample may be > 0
                stalled = stalled + 1 if stored and stored == previous else 0
                if stored >= created or stalled >= 60 or time.time() - t0 > args.storm_timeout:
                    break
            elapsed = series[-1][0]
            cpu = sum(cpu_seconds(d.pid) for d in daemons) - cpu0
            if profile is not None:
                await stop_profile(profile, args)
            # Backends that ended meanwhile are missed; new ones count from their start.
            pg_end = await backend_cpu(connection, db_name)
            pg = sum(seconds - pg0.get(pid, 0.0) for pid, seconds in pg_end.items())
            sim_cpu = sum(sims.cpu()) - sim_cpu0
            await asyncio.sleep(3)  # anything still in flight lands before the checks
            states = await sims.dump()
            checks = await connection.fetchrow(
                """
                SELECT count(*) AS total,
                       count(DISTINCT (site_id, source_id)) AS distinct_keys,
                       min(received_at) AS first, max(received_at) AS last
                FROM alarms
                """
            )
            equal = await equal_content(connection)
            per_site = {
                row["site_id"]: int(row["n"])
                for row in await connection.fetch(
                    "SELECT site_id, count(*) AS n FROM alarms GROUP BY site_id"
                )
            }
        finally:
            await connection.close()
    finally:
        stop = await terminate(daemons)
        await sims.stop()
    print(f"warm-up               {warmup:.1f} s")
    print("seconds  committed  per second")
    previous = 0
    for seconds, stored in series:
        print(f"{seconds:7.1f}  {stored:9d}  {stored - previous:10d}")
        previous = stored
    final = series[-1][1]
    first_full = next((s for s, n in series if n >= created), None)
    span = first_full if first_full is not None else elapsed
    rates = [b[1] - a[1] for a, b in itertools.pairwise(series)]
    print(
        f"storm                 {final} / {created} stored; {final / span:.0f} alarms/s from the "
        f"backlog to {'all stored' if first_full else 'the end'} ({span:.1f} s), "
        f"best second {max(rates, default=final)}"
    )
    print(
        f"CPU during the storm  daemon {cpu / elapsed:.2f} cores, PostgreSQL backends "
        f"{pg / elapsed:.2f} cores, simulators {sim_cpu / elapsed:.2f} cores"
    )
    expected = {f"s{i:05d}": int(state["alarms"]) for i, state in enumerate(states)}
    wrong = {s: (per_site.get(s, 0), n) for s, n in expected.items() if per_site.get(s, 0) != n}
    print(
        f"idempotency           rows {checks['total']}, created by the simulators "
        f"{sum(expected.values())}; duplicate (site_id, source_id): "
        f"{checks['total'] - checks['distinct_keys']}; equal-content rows: {equal}; "
        f"sites whose row count differs from the simulator's: {len(wrong)}"
    )
    for site, (have, want) in list(wrong.items())[:5]:
        print(f"  {site}: {have} stored, {want} created")
    print(f"SIGTERM to exit       {stop[0]:.2f} s (exit {', '.join(stop[1])})")
    if args.profile:
        print_profile(args.profile)


async def equal_content(connection: asyncpg.Connection) -> int:
    """Rows repeating another row's content (all but the id, source_id and receive time)."""
    return int(
        await connection.fetchval(
            """
            SELECT coalesce(sum(n - 1), 0) FROM (
                SELECT count(*) AS n FROM alarms
                GROUP BY site_id, occurred_at, camera_id, event_type, vendor_event, description
                HAVING count(*) > 1
            ) d
            """
        )
    )


async def mode_failover(args: argparse.Namespace, db_url: str, workdir: Path) -> None:
    if args.daemons < 2:
        raise SystemExit("--failover needs at least 2 daemons")
    sims = Simulators()
    daemons: list[asyncio.subprocess.Process] = []
    report: list[str] = []
    try:
        urls = await sims.start(args)
        daemons, ports = await start_daemons(workdir, db_url, urls, args.daemons, args.lease_ttl)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, ports)
        connection = await asyncpg.connect(db_url)
        try:
            warmup = await wait_warm(connection, args.sites, args.daemons)
            await asyncio.sleep(args.settle)
            owners = {
                row["site_id"]: row["owner"]
                for row in await connection.fetch("SELECT site_id, owner FROM site_leases")
            }
            first = [int(s["last_id"]) for s in await sims.dump()]
            killed, frozen = daemons[0], daemons[1]
            t_kill = time.time()
            killed.send_signal(signal.SIGKILL)
            await asyncio.sleep(args.freeze_after)
            t_stop = time.time()
            frozen.send_signal(signal.SIGSTOP)
            await asyncio.sleep(args.lease_ttl + args.failover_wait)
            leases = await connection.fetch(
                "SELECT site_id, owner, extract(epoch FROM acquired_at) AS acquired"
                " FROM site_leases"
            )
            states = await sims.dump()
            t_dump = time.time()
            await asyncio.sleep(5)  # alarms created up to the dump are stored by now
            lost_before, dup_before = await lost_and_duplicates(connection, first, states)
            equal_before = await equal_content(connection)
            latency = await alarm_latency(
                connection,
                "occurred_at >= to_timestamp($1) AND occurred_at <= to_timestamp($2)",
                t_kill,
                t_dump,
            )
            frozen.send_signal(signal.SIGCONT)
            await asyncio.sleep(args.after_cont)
            states_after = await sims.dump()
            # Lost means never stored: wait (up to 60 s) while the missing ones still arrive.
            waited = time.monotonic()
            missing: list[int] = []
            while True:
                await asyncio.sleep(5)
                lost_after, dup_after = await lost_and_duplicates(connection, first, states_after)
                missing.append(lost_after)
                done = lost_after == 0 or (len(missing) > 2 and missing[-3] == lost_after)
                if done or time.monotonic() - waited > 60:
                    break
            late_wait = time.monotonic() - waited
            equal_after = await equal_content(connection)
            rows_after = int(await connection.fetchval("SELECT count(*) FROM alarms"))
        finally:
            await connection.close()
    finally:
        stop = await terminate(daemons)
        await sims.stop()
    names = {"bench-0": "killed", "bench-1": "frozen"}
    takeover: dict[str, list[float]] = defaultdict(list)
    never: Counter[str] = Counter()
    lease_moves: dict[str, list[float]] = defaultdict(list)
    acquired = {row["site_id"]: (row["owner"], float(row["acquired"] or 0)) for row in leases}
    for index, state in enumerate(states):
        site = f"s{index:05d}"
        owner = names.get(owners.get(site, ""), "")
        for event, moment in (("killed", t_kill), ("frozen", t_stop)):
            # The pause this signal caused: for the daemon's own sites, the one spanning the
            # signal (however long before it the daemon last polled them); for sites it had
            # taken from the killed one, a pause that began after the kill.
            earliest = -math.inf if owner == event else t_kill
            spanning = [
                end - moment for start, end in state["gaps"] if earliest <= start <= moment <= end
            ]
            if spanning:
                takeover[event].append(spanning[0])
            elif owner == event:
                if state["last"] is not None and state["last"] > moment:
                    takeover[event].append(0.0)  # never paused over GAP_S: moved at once
                else:
                    never[event] += 1
        if owner in names.values():
            new_owner, at = acquired.get(site, ("", 0.0))
            moment = t_kill if owner == "killed" else t_stop
            if new_owner != f"bench-{0 if owner == 'killed' else 1}" and at >= moment:
                lease_moves[owner].append(at - moment)
    counts = Counter(names.get(o, "live") for o in owners.values())
    report.append(
        f"failover              {args.sites} sites, {args.daemons} daemons, lease_ttl "
        f"{args.lease_ttl:.0f} s, {args.rate} alarms/s per site; warm-up {warmup:.1f} s"
    )
    report.append(
        f"                      SIGKILL bench-0 ({counts['killed']} sites) at 0 s, SIGSTOP "
        f"bench-1 ({counts['frozen']} sites) at {t_stop - t_kill:.1f} s"
    )
    rows = [["sites of", "re-polled", "max", "p99", "p50", "not re-polled", "lease moved max"]]
    for event in ("killed", "frozen"):
        values = takeover[event]
        moves = lease_moves[event]
        rows.append(
            [
                f"{event} daemon (incl. sites it had just taken)",
                str(len(values)),
                f"{max(values, default=math.nan):.1f} s",
                f"{quantile(values, 0.99):.1f} s",
                f"{quantile(values, 0.5):.1f} s",
                str(never[event]),
                f"{max(moves, default=math.nan):.1f} s ({len(moves)} sites)",
            ]
        )
    for line in report:
        print(line)
    print("time until the device saw the next GET /alarms, from the signal (simulators' clocks):")
    table(rows)
    if latency["n"]:
        print(
            f"alarm latency         {latency['n']} alarms created from the kill to the dump: "
            f"p50 {latency['p50']:.2f} s, p99 {latency['p99']:.2f} s, max {latency['worst']:.2f} s"
        )
    print(
        f"lost / duplicates     frozen: not stored 5 s after the dump {lost_before}, "
        f"duplicate ids {dup_before}, "
        f"equal-content rows {equal_before}"
    )
    print(
        f"after SIGCONT         lost {lost_after}, duplicate ids {dup_after}, equal-content rows "
        f"{equal_after}, rows {rows_after} ({args.after_cont:.0f} s after SIGCONT; 'lost' = "
        f"not stored {late_wait:.0f} s after the final dump, counts seen {missing})"
    )
    print(f"SIGTERM to exit       {stop[0]:.2f} s (exit {', '.join(stop[1])}; bench-0 was killed)")


async def mode_handoff(args: argparse.Namespace, db_url: str, workdir: Path) -> None:
    """One daemon holds every site; a second joins and is handed half of them. Both
    daemons' event-loop lag over the hand-off, and how long it took."""
    sims = Simulators()
    daemons: list[asyncio.subprocess.Process] = []
    try:
        urls = await sims.start(args)
        daemons, ports = await start_daemons(
            workdir, db_url, urls, 1, args.lease_ttl, interval=args.interval
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, ports)
            connection = await asyncpg.connect(db_url)
            try:
                warmup = await wait_warm(connection, args.sites, 1)
                settled = lag_buckets(await metrics_text(session, ports[0]))
                await asyncio.sleep(args.settle)
                giver_text = await metrics_text(session, ports[0])
                giver_before = lag_buckets(giver_text)
                giver_gc_before = lag_buckets(giver_text, GC_PAUSES)
                first = await sims.dump()
                cpu_before = cpu_seconds(daemons[0].pid)
                joined_at = time.monotonic()
                joiner, joiner_ports = await start_daemons(
                    workdir,
                    db_url,
                    urls,
                    1,
                    args.lease_ttl,
                    tag="join",
                    interval=args.interval,
                    first_port=ports[0] + 1,
                )
                daemons += joiner
                await wait_ready(session, joiner_ports)
                ready_in = time.monotonic() - joined_at
                split_in = await wait_split(connection, args.sites, joined_at)
                # Every handed site's first poll at the joiner, and a few more of each.
                await asyncio.sleep(max(5.0, 3 * args.interval))
                giver_text = await metrics_text(session, ports[0])
                joiner_text = await metrics_text(session, joiner_ports[0])
                giver_after, giver_gc = lag_buckets(giver_text), lag_buckets(giver_text, GC_PAUSES)
                joiner_lag, joiner_gc = (
                    lag_buckets(joiner_text),
                    lag_buckets(joiner_text, GC_PAUSES),
                )
                cpu_giver = cpu_seconds(daemons[0].pid) - cpu_before
                cpu_joiner = cpu_seconds(daemons[1].pid)
                states = await sims.dump()
                window = time.monotonic() - joined_at
                handed = int(
                    await connection.fetchval(
                        "SELECT count(*) FROM site_leases WHERE owner = 'join-0'"
                    )
                )
            finally:
                await connection.close()
    finally:
        stop = await terminate(daemons)
        await sims.stop()
    pauses = [
        end - start
        for before, after in zip(first, states, strict=True)
        for start, end in after["gaps"][len(before["gaps"]) :]
    ]
    print(
        f"hand-off              {args.sites} sites every {args.interval:g} s held by one daemon "
        f"(warm-up {warmup:.1f} s); a second joins and is handed {handed}"
    )
    print(
        f"                      joiner ready after {ready_in:.1f} s, leases split evenly "
        f"{split_in:.1f} s after it started; measured {window:.0f} s from its start"
    )
    print(f"giver's loop lag      {lag_lines(settled, giver_before)} (alone, {args.settle:g} s)")
    print(f"                      {lag_lines(giver_before, giver_after)} (from the join on)")
    print(f"joiner's loop lag     {lag_lines({}, joiner_lag)} (its whole life)")
    print(f"GC pauses, giver      {lag_lines(giver_gc_before, giver_gc, 'collections')} (join on)")
    print(f"GC pauses, joiner     {lag_lines({}, joiner_gc, 'collections')} (its whole life)")
    print(
        f"CPU over the window   giver {cpu_giver / window:.2f} core, joiner "
        f"{cpu_joiner / window:.2f} core (incl. its start)"
    )
    print(
        f"alarm-poll pauses     {len(pauses)} over {gap_s(args):g} s (sites handed over wait "
        f"for the joiner's first poll), max {max(pauses, default=0.0):.1f} s, "
        f"p50 {quantile(pauses, 0.5):.1f} s"
    )
    print(f"SIGTERM to exit       {stop[0]:.2f} s (exit {', '.join(stop[1])})")


async def wait_split(connection: asyncpg.Connection, sites: int, since: float) -> float:
    """Seconds from `since` until both daemons hold half the sites (a lease each)."""

    async def even() -> bool:
        held = await connection.fetch(
            "SELECT owner, count(*) AS n FROM site_leases"
            " WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner"
        )
        split = [int(row["n"]) for row in held]
        return len(split) == 2 and sum(split) == sites and max(split) - min(split) <= 1

    await wait_until(even, 300, "an even split between the two daemons")
    return time.monotonic() - since


def lag_lines(before: dict[float, float], after: dict[float, float], what: str = "samples") -> str:
    """How many lag samples (or collections) passed 50 ms, and the worst bucket reached."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get(math.inf, 0.0)
    if not total:
        return f"no {what}"
    over = total - delta.get(0.05, 0.0)
    worst = min(le for le in delta if delta[le] >= total)
    bound = "past the last bucket" if worst == math.inf else f"<= {worst * 1000:g} ms"
    return f"{total:.0f} {what}, {over:.0f} over 50 ms; worst {bound}"


async def lost_and_duplicates(
    connection: asyncpg.Connection, first: list[int], states: list[dict[str, Any]]
) -> tuple[int, int]:
    """Alarms the simulators created after `first` (per site: ids above it, up to the
    dump's last id) that are not stored; and stored rows repeating a device id."""
    rows = await connection.fetch(
        """
        SELECT site_id, split_part(source_id, '@', 1)::bigint AS id, count(*) AS n
        FROM alarms GROUP BY 1, 2
        """
    )
    stored: dict[str, set[int]] = defaultdict(set)
    duplicates = 0
    for row in rows:
        stored[row["site_id"]].add(int(row["id"]))
        duplicates += int(row["n"]) - 1
    lost = 0
    for index, (low, state) in enumerate(zip(first, states, strict=True)):
        have = stored.get(f"s{index:05d}", set())
        lost += sum(1 for i in range(low + 1, int(state["last_id"]) + 1) if i not in have)
    return lost, duplicates


async def run(args: argparse.Namespace) -> None:
    nofile = raise_nofile()
    if nofile < 3 * args.sites // max(1, args.sim_procs) + 1000:
        print(f"warning: RLIMIT_NOFILE hard limit {nofile} is tight for {args.sites} sites")
    server_url = os.environ.get("CMS_INGEST_TEST_DATABASE_URL")
    embedded = None
    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-"))
    if not server_url:
        import pgserver

        embedded = pgserver.get_server(  # type: ignore[attr-defined]
            workdir / "pg", cleanup_mode="stop"
        )
        server_url = embedded.get_uri()
    db_name, db_url = await create_database(server_url)
    try:
        if args.storm:
            await mode_storm(args, db_url, db_name, workdir)
        elif args.failover:
            await mode_failover(args, db_url, workdir)
        elif args.handoff:
            await mode_handoff(args, db_url, workdir)
        else:
            await mode_default(args, server_url, db_url, workdir)
    finally:
        await drop_database(server_url, db_name)
        if embedded is not None:
            embedded.cleanup()
        print(f"(logs in {workdir})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--duration", type=float, default=30.0, help="measured window (s)")
    parser.add_argument("--rate", type=float, default=0.02, help="alarms per second per site")
    parser.add_argument("--daemons", type=int, default=None, help="default 1 (3 for --failover)")
    parser.add_argument("--sim-procs", type=int, default=2, help="simulator processes")
    parser.add_argument("--shared-port", action="store_true", help="all sites behind one port")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds between warm-up and measuring"
    )
    parser.add_argument("--lease-ttl", type=float, default=15.0)
    parser.add_argument(
        "--warmup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for every site's first poll (default mode: then measure anyway)",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--baseline", action="store_true", help="the bare loop, then the daemon")
    modes.add_argument("--storm", action="store_true", help="a backlog on every site at once")
    modes.add_argument("--failover", action="store_true", help="kill one daemon, freeze another")
    modes.add_argument("--handoff", action="store_true", help="a second daemon joins")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="poll interval (default mode, --handoff)"
    )
    parser.add_argument("--bare-warmup", type=float, default=10.0)
    parser.add_argument(
        "--bare-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="--baseline: the bare loop's event loop (the daemon's: its config, uvloop)",
    )
    parser.add_argument("--backlog", type=int, default=300, help="--storm: alarms per site")
    parser.add_argument("--storm-timeout", type=float, default=180.0)
    parser.add_argument("--freeze-after", type=float, default=12.0, help="--failover: seconds")
    parser.add_argument(
        "--failover-wait",
        type=float,
        default=10.0,
        help="--failover: seconds after freeze + lease_ttl before measuring",
    )
    parser.add_argument("--after-cont", type=float, default=10.0, help="--failover: seconds")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the daemon during the window")
    args = parser.parse_args()
    if args.daemons is None:
        args.daemons = 3 if args.failover else 1
    if args.profile and args.failover:
        parser.error("--profile goes with the default mode, --baseline or --storm")
    WARMUP_TIMEOUT[0] = args.warmup_timeout
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
