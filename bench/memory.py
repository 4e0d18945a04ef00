"""Where an idle site's memory goes: the daemon traced by tracemalloc at two site counts.

    export CMS_INGEST_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/memory.py [--sites 500 1000] [--settle 10] [--interval 1]

Tracing makes the daemon several times slower: keep the counts where it still keeps up
(it warms up; at 2,000 sites here it did not, and its figures were those of an overloaded
daemon).

For each count: the Davantis simulators of bench/sites.py (every site on its own port), a
daemon (`cms-ingest run`, idle sites at 1 Hz) started under `tracemalloc` (4 frames), warmed
up (every site polled once and held, as bench/sites.py waits), `--settle` s more, a snapshot
(SIGUSR1 in the traced wrapper), then SIGTERM. Printed: the traced Python memory per site
(difference between the two counts / difference in sites) and the RSS per site beside it,
then the per-site difference by file, by line, and for the biggest lines by caller.

The snapshot also holds the polls in flight at that moment (aiohttp requests, timeouts, the
vendor's coroutine): those lines move from run to run, the lasting ones (config, connections,
tasks) do not; `--interval 10` leaves few polls in flight, so what a site holds between its
polls shows. What tracemalloc does not see (uvloop and libuv in C, malloc's own overhead) is
the gap between the two per-site figures. Tracing slows the daemon down: read the sizes, not
the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sites import (
    WARMUP_TIMEOUT,
    Simulators,
    create_database,
    drop_database,
    raise_nofile,
    status_kib,
    wait_warm,
    write_config,
)

# Runs inside the daemon's process: tracing from the first import, a snapshot on SIGUSR1.
TRACED_DAEMON = """
import signal, sys, tracemalloc
snapshot_path, config = sys.argv[1], sys.argv[2]
tracemalloc.start(4)
def dump(*_):
    tracemalloc.take_snapshot().dump(snapshot_path)
    sys.stderr.write("SNAPSHOT\\n")
    sys.stderr.flush()
signal.signal(signal.SIGUSR1, dump)
from cms_ingest.cli import main
sys.argv = ["cms-ingest", "run", "--config", config]
main()
"""

PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}/"
PREFIXES = (
    str(Path(sys.prefix) / "lib"),
    str(Path(sys.base_prefix) / "lib"),
    str(Path(__file__).resolve().parent.parent) + "/",
)


def short(location: str) -> str:
    for prefix in PREFIXES:
        location = location.replace(prefix, "")
    return location.lstrip("/").removeprefix(PYTHON).removeprefix("site-packages/")


async def traced_daemon(
    server_url: str, sites: int, settle: float, workdir: Path, interval: float
) -> tuple[tracemalloc.Snapshot, int]:
    """A daemon polling `sites` idle sites, warmed up: its snapshot `settle` s later and its
    RSS (KiB)."""
    sims = Simulators()
    args = argparse.Namespace(
        shared_port=False, sim_procs=2, sites=sites, rate=0, interval=interval
    )
    urls = await sims.start(args)
    db_name, db_url = await create_database(server_url)
    config = workdir / f"memory-{sites}.yaml"
    port = 19000 + os.getpid() % 900
    write_config(config, db_url, urls, port, workdir / "data", "mem", 15.0, interval)
    snapshot = workdir / f"memory-{sites}.snapshot"
    log = (workdir / f"memory-{sites}.log").open("wb")
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRACED_DAEMON, str(snapshot), str(config), stdout=log, stderr=log
    )
    try:
        connection = await asyncpg.connect(db_url)
        try:
            # Not strict: a traced daemon is slow, and one that cannot warm up is measured
            # anyway (the line printed says how far it got).
            await wait_warm(connection, sites, daemons=1, strict=False)
        finally:
            await connection.close()
        await asyncio.sleep(settle)  # a few polls of every site after its first
        daemon.send_signal(signal.SIGUSR1)
        for _ in range(120):  # a snapshot of a big heap takes a few seconds to write
            await asyncio.sleep(0.5)
            if b"SNAPSHOT" in (workdir / f"memory-{sites}.log").read_bytes():
                break
        rss = status_kib(daemon.pid, "VmRSS")
    finally:
        daemon.terminate()
        await daemon.wait()
        await sims.stop()
        await drop_database(server_url, db_name)
    return tracemalloc.Snapshot.load(str(snapshot)), rss


def by_key(snapshot: tracemalloc.Snapshot, key: str) -> dict[str, int]:
    """Sizes by file or by `file:line` (the allocating frame)."""

    def name(frame: tracemalloc.Frame) -> str:
        return short(frame.filename if key == "filename" else str(frame))

    return {name(s.traceback[0]): s.size for s in snapshot.statistics(key)}


def per_site_diff(
    small: dict[str, int], large: dict[str, int], sites: int, top: int
) -> list[tuple[float, str]]:
    diffs = [((large.get(k, 0) - small.get(k, 0)) / sites, k) for k in set(small) | set(large)]
    return sorted(diffs, reverse=True)[:top]


def callers(snapshot: tracemalloc.Snapshot, line: str, sites: int) -> list[tuple[float, str]]:
    """Where the allocations of one line come from (the frames above it), per site."""
    groups: collections.Counter[str] = collections.Counter()
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)
        if short(str(frames[-1])) == line:
            groups[" <- ".join(short(str(f)) for f in frames[-2::-1])] += stat.size
    return [(size / sites, where) for where, size in groups.most_common(2)]


async def run(args: argparse.Namespace) -> None:
    raise_nofile()
    server_url = os.environ.get("CMS_INGEST_TEST_DATABASE_URL")
    if not server_url:
        raise SystemExit("set CMS_INGEST_TEST_DATABASE_URL (a PostgreSQL server)")
    workdir = Path(tempfile.mkdtemp(prefix="cms-memory-"))
    small_n, large_n = sorted(args.sites)
    small, small_rss = await traced_daemon(server_url, small_n, args.settle, workdir, args.interval)
    large, large_rss = await traced_daemon(server_url, large_n, args.settle, workdir, args.interval)
    sites = large_n - small_n
    traced = (
        sum(s.size for s in large.statistics("filename"))
        - sum(s.size for s in small.statistics("filename"))
    ) / sites
    print(
        f"idle sites {small_n} -> {large_n} polled every {args.interval:g} s, "
        f"warm + {args.settle:.0f} s, traced daemon"
    )
    print(f"traced Python memory per site   {traced / 1024:6.1f} KiB")
    print(f"RSS per site (traced daemon)    {(large_rss - small_rss) / sites:6.1f} KiB")
    print("\nper site, by file:")
    files = per_site_diff(by_key(small, "filename"), by_key(large, "filename"), sites, 15)
    for size, where in files:
        print(f"  {size:7.0f} B  {where}")
    print("\nper site, by line (and the two biggest callers of the top lines):")
    lines = per_site_diff(by_key(small, "lineno"), by_key(large, "lineno"), sites, args.top)
    for rank, (size, where) in enumerate(lines):
        print(f"  {size:7.0f} B  {where}")
        if rank < 6:
            for caller_size, chain in callers(large, where, large_n):
                print(f"           {caller_size:6.0f} B from {chain}")
    print(f"(logs and snapshots in {workdir})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs=2, default=[500, 1000])
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after the warm-up, then the snapshot"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="poll interval (s); a long one leaves few polls in flight: the lasting memory shows",
    )
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--warmup-timeout", type=float, default=120.0)
    args = parser.parse_args()
    WARMUP_TIMEOUT[0] = args.warmup_timeout
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
