"""The demo and probe commands as a user runs them, and supervision of dying tasks."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.support import free_port


async def test_demo_shows_alarms_media_and_stops_by_itself(outside_pytest_tmp: Path) -> None:
    """The README's first command, minus the install: embedded PostgreSQL and all."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        "demo",
        "--duration",
        "16",
        "--data-dir",
        str(outside_pytest_tmp / "demo"),
        "--listen",
        f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert "READY" in text
    assert re.search(r"ALARM +#\d+ demo-davantis p1 intrusion", text)
    assert "demo-camtrace p5 motion" in text
    assert "video ready: demo-camtrace/" in text and ".mkv" in text
    assert "demo-videoloft p5 motion" in text
    assert re.search(r"demo-exacq p5 motion +camera 'Gate cam': Video motion on Gate cam", text)
    assert re.search(r"demo-camstreamer p4 camera_offline +camera 'Yard'", text)
    assert "Warning" not in err.decode()
    assert "snapshot ready" in text
    assert list((outside_pytest_tmp / "demo" / "media" / "demo-davantis").rglob("*-snapshot.jpg"))


async def test_probe_reports_each_step(tmp_path: Path) -> None:
    site = DavantisSite(media_delay=0)
    site.add_alarms(2)
    async with DavantisSimulator({"default": site}) as sim:
        config = tmp_path / "cms.yaml"
        config.write_text(
            "sites:\n"
            f"  - {{id: p1, vendor: davantis, url: '{sim.url()}', username: cms, password: secret}}\n"
            f"  - {{id: p2, vendor: davantis, url: '{sim.url()}', username: cms, password: wrong}}\n"
        )
        ok = await _run("probe", "--config", str(config), "p1")
        assert ok[0] == 0, ok[1]
        assert "[PASS] authentication and first poll" in ok[1]
        assert "cameras:" in ok[1] and "relays:" in ok[1]
        assert "[PASS] one snapshot" in ok[1] and "image/jpeg" in ok[1]
        bad = await _run("probe", "--config", str(config), "p2")
        assert bad[0] == 1
        assert "[FAIL] authentication and first poll" in bad[1]
        assert "wrong" not in bad[1]  # the password is never echoed


async def test_probe_camtrace_lists_what_operators_target(tmp_path: Path) -> None:
    from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite

    site = CamTraceSite(media_delay=0, clock_offset_s=12.0)
    site.add_alarms(2)
    async with CamTraceSimulator({"default": site}) as sim:
        config = tmp_path / "cms.yaml"
        config.write_text(
            "sites:\n"
            f"  - {{id: ct, vendor: camtrace, url: '{sim.url()}', username: cms, password: secret}}\n"
        )
        code, out = await _run("probe", "--config", str(config), "ct")
        assert code == 0, out
        assert "commands (exturls):" in out and "scenarios:" in out
        assert "clock skew (s): 1" in out  # about 12 s ahead
        assert "[PASS] clock" in out and "device clock +1" in out
        assert "[PASS] one snapshot" in out


async def test_probe_every_other_vendor(tmp_path: Path) -> None:
    from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
    from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
    from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator

    account = VideoloftAccount(media_delay=0)
    account.add_alert("12345.1", duration_s=1.0)
    async with (
        VideoloftSimulator(account) as vl,
        ExacqSimulator({"default": ExacqSite()}) as ex,
        CamStreamerSimulator({"default": CamStreamerAccount()}) as cs,
    ):
        config = tmp_path / "cms.yaml"
        config.write_text(
            "sites:\n"
            f"  - {{id: vl, vendor: videoloft, url: '{vl.url}', username: cms@example.com, password: secret}}\n"
            f"  - {{id: ex, vendor: exacq, url: '{ex.url()}', username: cms, password: secret}}\n"
            f"  - {{id: cs, vendor: camstreamer, url: '{cs.url()}', token: api-token,\n"
            f"      options: {{device_url_template: '{cs.device_url_template()}'}}}}\n"
            f"  - {{id: exbad, vendor: exacq, url: '{ex.url()}', username: cms, password: wrong}}\n"
        )
        for site_id, expect in (("vl", "12345.1"), ("ex", "soft triggers"), ("cs", "ACCC8EE8A9CA")):
            code, out = await _run("probe", "--config", str(config), site_id)
            assert code == 0, out
            assert "PASS: all checks passed" in out and expect in out, out
        code, out = await _run("probe", "--config", str(config), "exbad")
        assert code == 1 and "[FAIL] authentication and first poll" in out
        assert "Invalid username or password" in out and "wrong" not in out


async def _run(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cms_ingest.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return int(process.returncode or 0), out.decode()


async def test_a_dying_task_is_restarted_and_others_keep_running() -> None:
    metrics = Metrics()
    supervisor = TaskSupervisor(metrics=metrics)
    runs = 0
    healthy_ticks = 0
    recovered = asyncio.Event()

    async def flaky(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"crash {runs}")
        recovered.set()
        await stop.wait()

    async def steady(stop: asyncio.Event) -> None:
        nonlocal healthy_ticks
        while not stop.is_set():
            healthy_ticks += 1
            await asyncio.sleep(0.01)

    fast = RetryPolicy(base=0.05, factor=2, cap=0.2, jitter=0)
    supervisor.start("flaky", flaky, policy=fast)
    supervisor.start("steady", steady)
    await asyncio.wait_for(recovered.wait(), timeout=5)
    assert runs == 3
    assert metrics.sample("cms_ingest_task_restarts_total", task="flaky") == 2
    assert metrics.sample("cms_ingest_task_restarts_total", task="steady") == 0
    assert supervisor.names == ["flaky", "steady"]
    ticks = healthy_ticks
    await asyncio.sleep(0.05)
    assert healthy_ticks > ticks  # the other task never noticed
    await supervisor.stop_all(timeout=2)
    assert supervisor.names == []


async def test_status_one_line_per_site(database_url: str, tmp_path: Path) -> None:
    from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
    from tests.conftest import eventually
    from tests.support import app_config, camtrace_site, davantis_site, running_daemon

    ahead = CamTraceSite(media_delay=0, clock_offset_s=40.0)  # skew warned past 30 s
    down = DavantisSite()
    down.offline = True
    async with (
        CamTraceSimulator({"default": ahead}) as ct,
        DavantisSimulator({"default": down}) as dv,
    ):
        port = free_port()
        sites = [camtrace_site("depot", ct.url()), davantis_site("gate", dv.url())]
        config = app_config(database_url, tmp_path, sites, listen=f"127.0.0.1:{port}")
        config_file = tmp_path / "cms.yaml"
        config_file.write_text(
            f"database_url: {database_url}\nlisten: 127.0.0.1:{port}\nsites:\n"
            f"  - {{id: depot, vendor: camtrace, url: '{ct.url()}', username: cms, password: secret}}\n"
            f"  - {{id: gate, vendor: davantis, url: '{dv.url()}', username: cms, password: secret}}\n"
        )
        async with running_daemon(config) as daemon:
            assert daemon.sites is not None
            await eventually(
                lambda: daemon.sites.by_id["gate"].health.up is False, what="gate down"
            )
            ahead.add_alarm(recording=False)
            code, out = await _run("status", "--config", str(config_file))
            owner = daemon.identity.daemon_id
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert code == 1, out  # a site is down
    header = lines["site"].split()
    depot = lines["depot"].split()
    assert depot[header.index("state")] == "up"
    assert depot[header.index("owner")] == owner  # the daemon holding the lease
    skew = float(depot[header.index("skew")].rstrip("s"))
    assert 38 <= skew <= 42
    assert "DOWN" in lines["gate"].split()
    assert header[:4] == ["site", "vendor", "owner", "state"]
