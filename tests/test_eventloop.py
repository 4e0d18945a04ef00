"""The event loop: the daemon runs on uvloop unless the config says `event_loop: asyncio`,
and the in-process tests run on the daemon's loop (CMS_INGEST_TEST_EVENT_LOOP=asyncio
runs them on asyncio's own)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from cms_ingest.eventloop import DEFAULT_EVENT_LOOP, running_loop_name
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import ENV_LOOP, eventually
from tests.support import free_port, ready, spawn_daemon


async def test_in_process_tests_run_on_the_daemons_loop() -> None:
    assert DEFAULT_EVENT_LOOP == "uvloop"
    assert running_loop_name() == os.environ.get(ENV_LOOP, DEFAULT_EVENT_LOOP)


@pytest.mark.parametrize("setting", [None, "asyncio", "uvloop"])
async def test_the_daemon_runs_on_the_configured_loop(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, setting: str | None
) -> None:
    site = DavantisSite(media_delay=0)
    async with DavantisSimulator({"default": site}) as sim:
        port = free_port()
        lines = [
            f"database_url: {database_url}",
            f"data_dir: {tmp_path / 'data'}",
            f"listen: 127.0.0.1:{port}",
            "log_format: json",
            *([f"event_loop: {setting}"] if setting else []),
            "sites:",
            f"  - {{id: e1, vendor: davantis, url: '{sim.url()}', username: cms,"
            " password: secret, poll_interval: 0.2}",
        ]
        config = tmp_path / "cms.yaml"
        config.write_text("\n".join(lines) + "\n")
        log = tmp_path / "daemon.log"
        daemon = await spawn_daemon(config, log)
        try:
            await eventually(lambda: ready(port), timeout=30, what="daemon ready")
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM site_state WHERE cursor IS NOT NULL"),
                timeout=15,
                what="first poll",  # alarms from before the first poll are history
            )
            site.add_alarm()
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM alarms"), timeout=15, what="alarm"
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), timeout=15) == 0
    started = [
        entry
        for line in log.read_text().splitlines()
        if line.startswith("{") and (entry := json.loads(line)).get("event") == "started"
    ]
    assert [entry["event_loop"] for entry in started] == [setting or "uvloop"]
