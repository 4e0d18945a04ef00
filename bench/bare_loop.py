"""The bare poll loop: the least any poller of these sites must do, to compare the daemon with.

    .venv/bin/python bench/bare_loop.py --urls FILE [--warmup 10] [--duration 30]

`FILE` holds one Davantis site URL a line (what the simulator prints). One aiohttp
ClientSession (connector limit sized for every site, so each site keeps its keep-alive
connection), a bearer token obtained once per site (password grant), then one task per site
on a fixed schedule: site i's slots are start + i/N * interval + k * interval (staggered),
and at each slot exactly the request an idle Davantis poll makes
(`GET <url>/alarms?cra=yes&min_id=0` with `Authorization: Bearer <token>`, body read).
Nothing else: no parsing, no database.

A slot missed entirely (the previous request still running past it) is not made up: the
next request starts at once for the latest slot already due. Counted for the slots inside
the window (after `--warmup`): target = sites * duration / interval; started = requests
started for them; ok = answered 200/204; on time = started within `--on-time` seconds
(default 0.5) of their slot; lateness percentiles of the started ones.

Prints `READY` once every site has its token, `WINDOW <unix time>` when the window starts,
then one JSON line with the figures (CPU from `time.process_time()`, i.e. user + system of
the whole process, RSS from /proc/self/status), polls on for `--tail` seconds (so whoever
reads the figures can close its own window while the load is still on), and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from yarl import URL

from cms_ingest.sitehttp import raise_open_files_limit


def rss_kib(field_name: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def raise_nofile() -> int:
    return raise_open_files_limit(sys.maxsize)[0]


@dataclass
class Tally:
    window_start: float = math.inf
    window_end: float = math.inf
    started: int = 0
    ok: int = 0
    failed: int = 0
    on_time: int = 0
    skipped: int = 0
    lateness: list[float] = field(default_factory=list)


async def token(session: aiohttp.ClientSession, url: str, username: str, password: str) -> str:
    form = {"grant_type": "password", "username": username, "password": password}
    async with session.post(f"{url}/oauth/token", data=form) as response:
        response.raise_for_status()
        return str((await response.json())["access_token"])


async def poll_site(
    session: aiohttp.ClientSession,
    url: URL,
    headers: dict[str, str],
    first_slot: float,
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    loop = asyncio.get_running_loop()
    interval = args.interval
    slot = first_slot
    while slot < tally.window_end + args.tail:
        now = loop.time()
        if now < slot:
            await asyncio.sleep(slot - now)
            now = loop.time()
        elif now >= slot + interval:  # whole slots went by: start at once for the latest
            missed = math.floor((now - slot) / interval)
            if tally.window_start <= slot < tally.window_end:
                tally.skipped += min(missed, math.ceil((tally.window_end - slot) / interval))
            slot += missed * interval
        counted = tally.window_start <= slot < tally.window_end
        if counted:
            late = now - slot
            tally.started += 1
            tally.lateness.append(late)
            if late <= args.on_time:
                tally.on_time += 1
        try:
            async with session.get(url, headers=headers) as response:
                await response.read()
                good = response.status in (200, 204)
        except (aiohttp.ClientError, TimeoutError):
            good = False
        if counted:
            if good:
                tally.ok += 1
            else:
                tally.failed += 1
        slot += interval


def percentile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


async def run(args: argparse.Namespace) -> None:
    text = Path(args.urls).read_text()  # noqa: ASYNC240 - once, before anything runs
    urls = [line.strip() for line in text.splitlines() if line.strip()]
    nofile = raise_nofile()
    connector = aiohttp.TCPConnector(limit=len(urls) + 100, limit_per_host=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        rss_before = rss_kib()
        gate = asyncio.Semaphore(100)

        async def login(url: str) -> str:
            async with gate:
                return await token(session, url, args.username, args.password)

        tokens = await asyncio.gather(*(login(url) for url in urls))
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        tally = Tally()
        start = loop.time() + 1.0
        tally.window_start = start + args.warmup
        tally.window_end = tally.window_start + args.duration
        n = len(urls)
        tasks = [
            asyncio.create_task(
                poll_site(
                    session,
                    URL(f"{url}/alarms").with_query({"cra": "yes", "min_id": "0"}),
                    {"Authorization": f"Bearer {tok}"},
                    start + i * args.interval / n,
                    args,
                    tally,
                )
            )
            for i, (url, tok) in enumerate(zip(urls, tokens, strict=True))
        ]
        await asyncio.sleep(tally.window_start - loop.time())
        cpu_start = time.process_time()
        print(f"WINDOW {time.time()}", flush=True)
        await asyncio.sleep(tally.window_end - loop.time())
        cpu = time.process_time() - cpu_start
        rss_end = rss_kib()
        hwm = rss_kib("VmHWM")
        print(
            json.dumps(figures(args, tally, n, cpu, rss_before, rss_end, hwm, nofile)), flush=True
        )
        await asyncio.gather(*tasks)


def figures(
    args: argparse.Namespace,
    tally: Tally,
    n: int,
    cpu: float,
    rss_before: int,
    rss_end: int,
    hwm: int,
    nofile: int,
) -> dict[str, float]:
    target = n * args.duration / args.interval
    return {
        "sites": n,
        "duration": args.duration,
        "interval": args.interval,
        "target": target,
        "started": tally.started,
        "ok": tally.ok,
        "failed": tally.failed,
        "skipped": tally.skipped,
        "on_time": tally.on_time,
        "on_time_s": args.on_time,
        "late_p50": percentile(tally.lateness, 0.5),
        "late_p99": percentile(tally.lateness, 0.99),
        "late_max": max(tally.lateness, default=math.nan),
        "cpu_s": cpu,
        "rss_before_kib": rss_before,
        "rss_end_kib": rss_end,
        "hwm_kib": hwm,
        "nofile": nofile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="file with one site URL a line")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument(
        "--tail", type=float, default=5.0, help="seconds polling on after the figures"
    )
    parser.add_argument("--on-time", type=float, default=0.5, help="seconds after the slot")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request")
    parser.add_argument("--username", default="cms")
    parser.add_argument("--password", default="secret")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop (asyncio: the bare aiohttp loop of issue 17's table)",
    )
    args = parser.parse_args()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(args))


if __name__ == "__main__":
    main()
