"""The bench scripts run, each mode at a handful of sites, and print what they promise.

Not performance tests (the figures are the scripts' to print, never asserted here): a
bench that no longer starts is found by the suite, not by the next person measuring
(`bench/memory.py` failed for a session after `bench/sites.py` gained `--interval`).
Every mode runs real daemons and simulators as subprocesses against the test server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def bench(server_url: str, script: str, *args: str) -> str:
    """Run `bench/<script>` to its end; its output (the test fails on a non-zero exit)."""
    env = {**os.environ, "CMS_INGEST_TEST_DATABASE_URL": server_url}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"bench/{script} {' '.join(args)} exited {done.returncode}:\n{output[-3000:]}"
    )
    return output


def line(output: str, start: str) -> str:
    found = [text for text in output.splitlines() if text.startswith(start)]
    assert found, f"no line starting {start!r} in:\n{output[-3000:]}"
    return found[0]


def test_default_mode_measures_the_daemon_and_stops_it(pg_server_url: str) -> None:
    out = bench(pg_server_url, "sites.py", "--sites", "5", "--rate", "0.5", "--duration", "2")
    assert "NOT WARM" not in out
    assert re.search(r"polls/s \(daemon\)\s+[\d.]+ achieved / 5\.0 target", out)
    assert re.search(r"SIGTERM to exit\s+[\d.]+ s \(exit 0 ", out)


def test_baseline_mode_prints_both_loops_side_by_side(pg_server_url: str) -> None:
    out = bench(
        pg_server_url,
        "sites.py",
        *("--sites", "5", "--rate", "0", "--baseline", "--duration", "2", "--bare-warmup", "1"),
    )
    assert "bare loop" in line(out, "baseline, 5 sites")
    assert "failed bare polls: 0" in out


def test_storm_mode_stores_every_alarm_once(pg_server_url: str) -> None:
    out = bench(
        pg_server_url, "sites.py", "--sites", "5", "--rate", "0", "--storm", "--backlog", "20"
    )
    assert line(out, "storm  ").split()[1:4] == ["100", "/", "100"]
    assert "duplicate (site_id, source_id): 0" in line(out, "idempotency")


def test_failover_mode_loses_nothing(pg_server_url: str) -> None:
    out = bench(
        pg_server_url,
        "sites.py",
        *("--sites", "9", "--rate", "0.2", "--failover", "--lease-ttl", "3"),
        *("--freeze-after", "2", "--failover-wait", "2", "--after-cont", "3"),
    )
    assert re.search(r"killed daemon .* 0\s+[\d.]+ s \(\d+ sites\)", out), "not re-polled: 0"
    assert "lost 0, duplicate ids 0" in line(out, "after SIGCONT")


def test_handoff_mode_splits_the_sites(pg_server_url: str) -> None:
    out = bench(
        pg_server_url,
        "sites.py",
        *("--sites", "10", "--rate", "0", "--interval", "1", "--handoff", "--settle", "2"),
    )
    assert "leases split evenly" in out
    assert line(out, "joiner's loop lag")
    assert "collections" in line(out, "GC pauses, joiner"), "the daemon times its collections"


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_memory_script_traces_two_counts(pg_server_url: str) -> None:
    out = bench(pg_server_url, "memory.py", "--sites", "5", "10", "--settle", "1")
    assert re.search(r"traced Python memory per site\s+[\d.]+ KiB", out)
    assert "per site, by file:" in out
