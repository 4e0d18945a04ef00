"""The daemon as a real process: signals, crashes and restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import asyncpg

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import free_port, ready, spawn_daemon


def write_config(
    path: Path, database_url: str, data_dir: Path, sites: dict[str, str], port: int
) -> Path:
    lines = [
        f"database_url: {database_url}",
        f"data_dir: {data_dir}",
        f"listen: 127.0.0.1:{port}",
        "log_format: json",
        "defaults:",
        "  username: cms",
        "  password: ${SITE_PASSWORD}",
        "  poll_interval: 0.2",
        "sites:",
    ]
    for site_id, url in sites.items():
        lines.append(f"  - {{id: {site_id}, vendor: davantis, url: '{url}'}}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    sites = {"k1": DavantisSite(media_delay=0), "k2": DavantisSite(media_delay=0)}
    async with DavantisSimulator(dict(sites)) as sim:
        port = free_port()
        config = write_config(
            tmp_path / "cms.yaml",
            database_url,
            tmp_path / "data",
            {name: sim.url(name) for name in sites},
            port,
        )
        log = tmp_path / "daemon.log"
        daemon = await spawn_daemon(config, log)
        await eventually(lambda: ready(port), timeout=30, what="daemon ready")
        await eventually(lambda: _cursor_count(db, 2), timeout=15, what="both sites have a cursor")
        sim.start_generator(40.0, events=(1, 2, 11), seed=7)  # ~80 alarms/s in total
        await eventually(lambda: _alarm_count(db, 100), timeout=20, what="100 alarms in")
        daemon.send_signal(signal.SIGKILL)  # no chance to finish anything
        assert await asyncio.wait_for(daemon.wait(), timeout=10) == -signal.SIGKILL
        await asyncio.sleep(1.0)  # alarms keep arriving while it is dead
        daemon = await spawn_daemon(config, log)
        await eventually(lambda: ready(port), timeout=30, what="daemon ready again")
        await asyncio.sleep(1.0)
        await sim.stop_generator()
        expected = {name: {a.id for a in site.alarms} for name, site in sites.items()}
        total = sum(len(ids) for ids in expected.values())
        await eventually(lambda: _alarm_count(db, total), timeout=30, what=f"all {total} alarms")
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.wait(), timeout=15) == 0
        for name, ids in expected.items():
            rows = await db.fetch("SELECT source_id FROM alarms WHERE site_id = $1", name)
            stored = {int(r["source_id"]) for r in rows}  # once each: the key says so
            missing, extra = sorted(ids - stored), sorted(stored - ids)
            assert not missing and not extra, f"{name}: lost {missing[:10]}, extra {extra[:10]}"


async def _alarm_count(db: asyncpg.Connection, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM alarms")) >= n


async def _cursor_count(db: asyncpg.Connection, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL")) >= n


async def test_sigterm_stops_cleanly_within_ten_seconds(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    site = DavantisSite(media_delay=3600)  # media stays pending: the fetcher is busy at stop
    async with DavantisSimulator({"default": site}) as sim:
        site.slow_alarm_polls(1000, delay=1.5)  # a poll is in flight when the signal comes
        port = free_port()
        config = write_config(
            tmp_path / "cms.yaml", database_url, tmp_path / "data", {"t1": sim.url()}, port
        )
        daemon = await spawn_daemon(config, tmp_path / "daemon.log")
        await eventually(lambda: ready(port), timeout=30, what="daemon ready")
        await eventually(lambda: _cursor_count(db, 1), timeout=15, what="cursor")
        site.add_alarms(3)
        await eventually(lambda: _alarm_count(db, 3), timeout=15, what="alarms")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(daemon.wait(), timeout=15)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 10, f"took {elapsed:.1f} s to stop"
        # Media rows the fetcher held were handed back, not left leased.
        leased = await db.fetchval("SELECT count(*) FROM alarm_media WHERE claimed_until > now()")
        assert leased == 0
        log = (tmp_path / "daemon.log").read_text()
        assert '"event": "stopped"' in log
        assert "secret" not in log  # the site password never reaches the log


async def test_run_refuses_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites:\n  - {id: BAD ID, vendor: nope, url: ftp://x}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "run",
        "--config",
        str(bad),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    text = err.decode()
    assert "sites[0].id" in text and "sites[0].vendor" in text and "sites[0].url" in text


async def test_check_config_prints_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: nowhere\n"
        "defaults: {poll_intervall: 1}\n"
        "sites:\n"
        "  - {id: a, vendor: davantis, url: 'http://192.0.2.1:21000', username: u, password: '${MISSING_PW}'}\n"
        "  - {id: a, vendor: davantis, url: 'http://192.0.2.2:21000', username: u, password: p}\n"
        "  - {id: c, vendor: davantis, url: 'http://192.0.2.3:21000', username: u, password: p,\n"
        "     tls: {pin_sha256: nothex}}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "check-config",
        str(bad),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "MISSING_PW"},
    )
    out, _err = await asyncio.wait_for(process.communicate(), timeout=30)
    text = out.decode()
    assert process.returncode == 2
    for path in (
        "listen",
        "defaults.poll_intervall",
        "sites[0].password",
        "sites[1].id",
        "sites[2].tls.pin_sha256",
    ):
        assert f": {path}:" in text, (path, text)
    assert "MISSING_PW" in text


async def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "check-config",
        str(example),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "ACME_NORTH_PASSWORD": "x",
            "ACME_SOUTH_PASSWORD": "y",
            "DEPOT_EAST_PASSWORD": "z",
            "ACME_CLOUD_PASSWORD": "w",
            "MALL_WEST_PASSWORD": "v",
            "ACME_CAMSTREAMER_TOKEN": "u",
        },
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out.decode() + err.decode()
