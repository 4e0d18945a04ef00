"""Benchmark: N simulated Davantis sites polled at 1 Hz by one or more daemon processes.

    .venv/bin/python bench/sites.py [--sites 500] [--duration 60] [--rate 0.02] [--daemons 1]

Runs the simulator (one process, all sites behind one port) and `--daemons` processes of
`cms-ingest run` with the same config (they split the sites through their leases) against
PostgreSQL ($CMS_INGEST_TEST_DATABASE_URL, else an embedded one), warms up until every site
has its cursor and a holder, then measures for `--duration` seconds and prints: achieved
polls/s against the target, alarm latency from the device's creation time to commit
(p50/p99), the daemons' CPU (cores used, summed) and peak memory. Nothing here asserts a
threshold; the figures go into notes and are compared by people.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from cms_ingest.db.engine import plain_url

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def polls_total(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cms_ingest_polls_total{")
    )


async def start_simulator(sites: int, rate: float) -> tuple[asyncio.subprocess.Process, list[str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.simulators.davantis",
        "--sites",
        str(sites),
        "--port",
        "0",
        "--rate",
        str(rate),
        "--media-delay",
        "1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    urls: list[str] = []
    while True:
        line = (await process.stdout.readline()).decode().strip()
        if line == "READY" or not line:
            break
        urls.append(line)
    return process, urls


def write_config(
    path: Path, database_url: str, urls: list[str], port: int, data_dir: Path, instance: str
) -> None:
    lines = [
        f"database_url: {database_url}",
        f"data_dir: {data_dir}",
        f"listen: 127.0.0.1:{port}",
        f"instance_id: {instance}",
        "log_level: warning",
        "log_format: json",
        "defaults: {username: cms, password: secret, poll_interval: 1.0}",
        "sites:",
    ]
    lines += [f"  - {{id: s{i:05d}, vendor: davantis, url: '{url}'}}" for i, url in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n")


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


async def database(server_url: str) -> tuple[str, str]:
    name = f"cms_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(plain_url(server_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base = plain_url(server_url).rsplit("/", 1)[0]
    query = ""
    if "?" in server_url:
        base, query = plain_url(server_url).split("?", 1)
        base = base.rsplit("/", 1)[0]
        query = "?" + query
    return name, f"{base}/{name}{query}"


async def run(args: argparse.Namespace) -> None:
    server_url = os.environ.get("CMS_INGEST_TEST_DATABASE_URL")
    embedded = None
    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-"))
    if not server_url:
        import pgserver

        embedded = pgserver.get_server(workdir / "pg", cleanup_mode="stop")
        server_url = embedded.get_uri()
    db_name, db_url = await database(server_url)
    simulator, urls = await start_simulator(args.sites, args.rate)
    ports = [19000 + (os.getpid() % 900) + i for i in range(args.daemons)]
    daemons = []
    for i, port in enumerate(ports):
        config = workdir / f"bench-{i}.yaml"
        write_config(config, db_url, urls, port, workdir / "data", f"bench-{i}")
        log = (workdir / f"daemon-{i}.log").open("wb")
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
    connection: asyncpg.Connection | None = None  # connected once migrated
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def ready() -> bool:
                for port in ports:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status != 200:
                            return False
                return True

            await wait_until(ready, 120, "daemons ready")
            connection = await asyncpg.connect(db_url)

            async def warmed() -> bool:
                count = await connection.fetchval(
                    "SELECT count(*) FROM site_state WHERE cursor IS NOT NULL"
                )
                held = await connection.fetch(
                    "SELECT owner, count(*) AS n FROM site_leases"
                    " WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner"
                )
                split = [int(row["n"]) for row in held]
                even = len(split) == args.daemons and max(split) - min(split) <= 1
                return int(count) >= args.sites and sum(split) == args.sites and even

            started = time.monotonic()
            await wait_until(warmed, 180, "every site's first poll and an even split")
            warmup = time.monotonic() - started
            # Alarms raised while sites were still moving between daemons land late; measure
            # the steady state only.
            await asyncio.sleep(args.settle)
            polls_before = sum([await polls_total(session, port) for port in ports])
            cpu_before = sum(cpu_seconds(d.pid) for d in daemons)
            window_start = await connection.fetchval("SELECT now()")
            t0 = time.monotonic()
            await asyncio.sleep(args.duration)
            elapsed = time.monotonic() - t0
            polls_after = sum([await polls_total(session, port) for port in ports])
            cpu_after = sum(cpu_seconds(d.pid) for d in daemons)
            peak = max(peak_rss_mib(d.pid) for d in daemons)
            latency = await connection.fetchrow(
                """
                WITH l AS (
                    SELECT extract(epoch FROM received_at - occurred_at) AS s
                    FROM alarms WHERE received_at > $1
                )
                SELECT count(*) AS n,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
                       max(s) AS worst
                FROM l
                """,
                window_start,
            )
    finally:
        for daemon in daemons:
            daemon.terminate()
        stop_started = time.monotonic()
        codes = [await daemon.wait() for daemon in daemons]
        stop_time = time.monotonic() - stop_started
        simulator.terminate()
        await simulator.wait()
        if connection is not None:
            await connection.close()
        admin = await asyncpg.connect(plain_url(server_url))
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            embedded.cleanup()
    target = args.sites / 1.0
    achieved = (polls_after - polls_before) / elapsed
    print(
        f"sites                 {args.sites} at 1 Hz, {args.rate} alarms/s per site, "
        f"{args.daemons} daemon(s), {elapsed:.0f} s measured"
    )
    print(f"warm-up               {warmup:.1f} s until every site had its first poll committed")
    share = 100 * achieved / target
    print(f"polls/s               {achieved:.1f} achieved / {target:.1f} target ({share:.1f} %)")
    print(f"alarms in window      {latency['n']}")
    if latency["n"]:
        print(
            f"latency device->commit p50 {latency['p50'] * 1000:.0f} ms, "
            f"p99 {latency['p99'] * 1000:.0f} ms, max {latency['worst'] * 1000:.0f} ms"
        )
    print(f"daemon CPU            {(cpu_after - cpu_before) / elapsed:.2f} cores (all daemons)")
    print(f"daemon peak memory    {peak:.0f} MiB (VmHWM, the largest daemon)")
    print(f"SIGTERM to exit       {stop_time:.1f} s (exit codes {codes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=0.02, help="alarms per second per site")
    parser.add_argument("--daemons", type=int, default=1, help="daemon processes sharing the sites")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds between warm-up and measuring"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
