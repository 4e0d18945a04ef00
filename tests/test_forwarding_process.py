"""End to end: the daemon as a real process forwards to pysiaalarm's receiver, over
PostgreSQL, through a SIGKILL mid-stream and a receiver outage. Prints the figures
(delivered/attempted, repeats at the receiver, commit->ACK latency p50/p99)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.sia_receiver import sia_receiver
from tests.support import free_port, log_events, ready, spawn_daemon

KEY = "0123456789ABCDEF"  # pysiaalarm's convention: the characters are the AES-128 key


def write_config(
    path: Path,
    database_url: str,
    data_dir: Path,
    sites: dict[str, str],
    port: int,
    receiver_port: int,
) -> Path:
    lines = [
        f"database_url: {database_url}",
        f"data_dir: {data_dir}",
        f"listen: 127.0.0.1:{port}",
        "log_format: json",
        "lease_ttl: 3",
        "defaults:",
        "  username: cms",
        "  password: ${SITE_PASSWORD}",
        "  poll_interval: 0.2",
        "sites:",
        *(f"  - {{id: {s}, vendor: davantis, url: '{u}'}}" for s, u in sites.items()),
        "forwarders:",
        "  - name: cms",
        f"    primary: 127.0.0.1:{receiver_port}",
        "    account: 'A1234'",
        "    receiver: 1",
        "    line: 1",
        "    aes_key: ${DC09_KEY}",
        "    aes_key_encoding: text",
        "    ack_timeout_s: 1",
        "    connect_timeout_s: 0.5",
        "    retry_base_s: 0.05",
        "    retry_max_s: 0.3",
        "    media_base_url: https://media.example.com/alarms",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_sigkill_and_a_receiver_outage_lose_nothing_and_repeat_nothing(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    sites = {"k1": DavantisSite(media_delay=0), "k2": DavantisSite(media_delay=0)}
    receiver_port = free_port()
    env = {**os.environ, "SITE_PASSWORD": "secret", "DC09_KEY": KEY}
    processes: list[asyncio.subprocess.Process] = []
    async with (
        DavantisSimulator(dict(sites)) as sim,
        sia_receiver(receiver_port, [("A1234", KEY)]) as receiver,
    ):
        port = free_port()
        config = write_config(
            tmp_path / "cms.yaml",
            database_url,
            tmp_path / "data",
            {name: sim.url(name) for name in sites},
            port,
            receiver_port,
        )
        log = tmp_path / "daemon.log"
        try:
            processes.append(await spawn_daemon(config, log, env))
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(lambda: _cursors(db, 2), timeout=15, what="both sites have a cursor")
            sim.start_generator(15.0, events=(1, 2, 11), seed=7)  # ~30 alarms/s in total
            await eventually(lambda: len(receiver.raw) >= 40, timeout=20, what="40 forwarded")
            killed_at = time.time()
            processes[-1].send_signal(signal.SIGKILL)  # mid-stream: maybe ACKed, not marked
            assert await asyncio.wait_for(processes[-1].wait(), timeout=10) == -signal.SIGKILL
            await asyncio.sleep(0.5)
            processes.append(await spawn_daemon(config, log, env))
            await eventually(lambda: ready(port), timeout=30, what="daemon ready again")
            seen = len(receiver.raw)
            await eventually(lambda: len(receiver.raw) > seen + 10, timeout=20, what="flowing")
            await receiver.stop()  # the alarm-handling software goes away for a while
            await asyncio.sleep(1.0)
            await receiver.start()
            await asyncio.sleep(0.5)
            await sim.stop_generator()
            total = sum(len(site.alarms) for site in sites.values())
            await eventually(lambda: _alarms(db, total), timeout=30, what=f"all {total} alarms")
            await eventually(lambda: _delivered(db, total), timeout=30, what="all delivered")
            status = await _status(port)
            assert [(f["forwarder"], f["holding"], f["link_up"]) for f in status["forwarders"]] == [
                ("cms", True, True)
            ]
            processes[-1].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(processes[-1].wait(), timeout=15) == 0
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    rows_by_id = await db.fetch("SELECT id, site_id FROM alarms ORDER BY id")
    stored = [r["id"] for r in rows_by_id]
    assert len(stored) == total
    # Each once; each site's in its own order (two sites' commits may finish in either
    # order: the writer keeps two transactions in flight).
    assert sorted(receiver.alarm_ids()) == stored
    site_of = {r["id"]: r["site_id"] for r in rows_by_id}
    for name in sites:
        sent = [i for i in receiver.alarm_ids() if site_of[i] == name]
        assert sent == sorted(sent), f"{name}: forwarded out of its own order"
    rows = await db.fetch(
        "SELECT d.attempts, d.state, extract(epoch FROM d.finished_at - a.received_at) AS s, "
        "extract(epoch FROM a.received_at) AS committed "
        "FROM deliveries d JOIN alarms a ON a.id = d.alarm_id"
    )
    assert {r["state"] for r in rows} == {"delivered"}
    attempts = sum(r["attempts"] for r in rows)
    latencies = [float(r["s"]) for r in rows]
    steady = [float(r["s"]) for r in rows if float(r["committed"]) < killed_at - 1]
    figures = (
        f"FIGURES delivered/attempted={len(rows)}/{attempts} "
        f"receiver_raw={len(receiver.raw)} repeats_dropped_by_seq={receiver.repeats()} "
        f"duplicates_after_seq={len(receiver.alarm_ids()) - len(set(receiver.alarm_ids()))} "
        f"latency_all_p50={_percentile(latencies, 0.5):.3f}s "
        f"p99={_percentile(latencies, 0.99):.3f}s "
        f"latency_steady_p50={_percentile(steady, 0.5):.3f}s "
        f"p99={_percentile(steady, 0.99):.3f}s (n={len(steady)})"
    )
    print(figures)
    # The outage is logged once each way; the key is in no log line.
    assert len(log_events(log, "forward_link_lost")) == 1
    assert len(log_events(log, "forward_link_restored")) == 1
    assert KEY not in log.read_text()
    assert receiver.repeats() <= 2  # at most the message in flight at the kill, and at the stop


async def _status(port: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/status") as response,
    ):
        payload: dict[str, Any] = await response.json()
    return payload


async def _cursors(db: asyncpg.Connection, n: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL")
    return int(count) >= n


async def _alarms(db: asyncpg.Connection, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms")) >= n


async def _delivered(db: asyncpg.Connection, n: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
    return int(count) >= n
