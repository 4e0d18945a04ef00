"""SIGHUP reloads the config: a real `cms-ingest run` process, Davantis simulator sites and a
real database.

The requirement: the whole new file is validated first; sites added, removed or changed are
started, stopped or restarted without touching the others; an invalid file is refused with
its problems logged and the old config kept; every reload is counted in
`cms_ingest_config_reloads_total{outcome}`.

How "not touched" is observed from outside the process:
- the site's client was not rebuilt: the simulator saw no new login and no new `GET /cameras`
  (a new client logs in and reads the camera names before its first poll);
- its lease was not given up and taken again: `site_leases.epoch` is unchanged;
- its poller was not restarted: the flood tracker lives in the poller's memory only. With
  `flood.max_per_minute: 3` a steady stream of alarms from one camera is one burst: alarms
  1-3 stand alone, alarm 4 leads the burst and every later one points at it. A restarted
  poller starts counting afresh, so its next alarms would stand alone again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import daemon_process, free_port, log_events, metric_sum, metrics, ready

PASSWORD = "secret"
INTRUSION = 11  # Davantis idevent -> event_type intrusion (built-in priority 1)


# ---------------------------------------------------------------------------- helpers


def site(site_id: str, sim: DavantisSimulator, **extra: Any) -> dict[str, Any]:
    return {"id": site_id, "vendor": "davantis", "url": sim.url(site_id), **extra}


def config_text(
    database_url: str,
    data_dir: Path,
    port: int,
    sites: list[dict[str, Any]],
    *,
    flood: dict[str, Any] | None = None,
) -> str:
    return yaml.safe_dump(
        {
            "database_url": database_url,
            "data_dir": str(data_dir),
            "listen": f"127.0.0.1:{port}",
            "log_format": "json",
            "flood": flood or {"max_per_minute": 3, "quiet_s": 600},
            "defaults": {
                "username": "cms",
                "password": "${SITE_PASSWORD}",
                "poll_interval": 0.2,
                "request_timeout_s": 2,
            },
            "sites": sites,
        },
        sort_keys=False,
    )


def write_atomically(path: Path, text: str) -> None:
    """As an operator's editor or config management does: the daemon never reads half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


class RunningDaemon:
    """A `cms-ingest run` subprocess, its JSON log and its HTTP endpoints."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def sighup(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    async def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.port}{path}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status, await response.text()

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status")
        assert code == 200, body
        return dict(json.loads(body))

    async def site_status(self) -> dict[str, dict[str, Any]]:
        return {entry["site_id"]: entry for entry in (await self.status())["sites"]}

    async def sites_up(self, *site_ids: str) -> bool:
        try:
            sites = await self.site_status()
        except aiohttp.ClientError:
            return False
        return all(sites.get(i, {}).get("owned") and sites.get(i, {}).get("up") for i in site_ids)

    async def metric(self, name: str, **labels: str) -> float | None:
        """A sample of /metrics, or None when the series does not exist."""
        return metric_sum(await metrics(self.port), name, **labels)

    async def ready(self) -> bool:
        return await ready(self.port)


@contextlib.asynccontextmanager
async def running_daemon(
    config: Path, port: int, log: Path, *site_ids: str
) -> AsyncIterator[RunningDaemon]:
    """The daemon started from `config`, ready, every named site polled once; SIGTERM after
    (and a check that it stopped cleanly)."""
    env = {**os.environ, "SITE_PASSWORD": PASSWORD}
    async with daemon_process(config, log, env) as process:  # killed if the test failed
        daemon = RunningDaemon(process, port, log)
        await eventually(daemon.ready, timeout=20, what="daemon ready")
        await eventually(lambda: daemon.sites_up(*site_ids), timeout=15, what="sites polled")
        yield daemon
        assert process.returncode is None, f"the daemon died: {log.read_text()[-3000:]}"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0


async def stored(db: asyncpg.Connection, site_id: str) -> dict[int, asyncpg.Record]:
    rows = await db.fetch(
        "SELECT id, source_id, priority, group_id FROM alarms WHERE site_id = $1", site_id
    )
    return {int(row["source_id"]): row for row in rows}


async def ingested(db: asyncpg.Connection, site_id: str, ids: set[int]) -> bool:
    return ids <= (await stored(db, site_id)).keys()


async def wait_ingested(db: asyncpg.Connection, site_id: str, ids: set[int]) -> None:
    await eventually(lambda: ingested(db, site_id, ids), timeout=10, what=f"{site_id}: {ids}")


def post(sim: DavantisSimulator, site_id: str, n: int = 1, **kw: Any) -> set[int]:
    return {alarm.id for alarm in sim.site(site_id).add_alarms(n, **kw)}


async def assert_exactly_once(db: asyncpg.Connection, sim: DavantisSimulator, site_id: str) -> None:
    """Every alarm the device has is stored once (the unique key forbids twice)."""
    expected = {alarm.id for alarm in sim.site(site_id).alarms}
    await eventually(lambda: ingested(db, site_id, expected), timeout=10, what=f"all of {site_id}")
    count = await db.fetchval("SELECT count(*) FROM alarms WHERE site_id = $1", site_id)
    assert count == len(expected)


class Stream:
    """Alarms posted to one site and camera every `every` seconds, until stopped."""

    def __init__(self, sim: DavantisSimulator, site_id: str, every: float = 0.15) -> None:
        self._site = sim.site(site_id)
        self._every = every
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._site.add_alarm(event=INTRUSION, camera=1)
            await asyncio.sleep(self._every)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()  # also when the test failed: the event loop is shared by the session


async def assert_one_uninterrupted_burst(db: asyncpg.Connection, site_id: str) -> None:
    """The site's alarms (one camera, max_per_minute 3): 1-3 alone, 4 leads, all others in
    its burst. Broken only if the site's poller (and its flood tracker) was restarted."""
    rows = [row for _, row in sorted((await stored(db, site_id)).items())]
    assert len(rows) > 10
    assert [row["group_id"] for row in rows[:4]] == [None] * 4
    head = rows[3]["id"]
    alone = [int(row["source_id"]) for row in rows[4:] if row["group_id"] != head]
    assert not alone, f"{site_id}: alarms outside the burst (poller restarted?): {alone}"


async def lease(db: asyncpg.Connection, site_id: str) -> tuple[Any, ...]:
    row = await db.fetchrow("SELECT owner, epoch FROM site_leases WHERE site_id = $1", site_id)
    assert row is not None
    return (row["owner"], row["epoch"])


def client_footprint(sim: DavantisSimulator, site_id: str) -> tuple[int, int]:
    """(logins, camera list reads): both grow only when the daemon builds a new client."""
    device = sim.site(site_id)
    return device.logins, device.requests["GET /cameras"]


def alarm_polls(sim: DavantisSimulator, site_id: str) -> int:
    return sim.site(site_id).requests["GET /alarms"]


# ---------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
async def test_sighup_adds_removes_and_restarts_only_the_changed_sites(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    tenants = {name: DavantisSite(media_delay=0) for name in ("a", "b", "c", "d")}
    async with DavantisSimulator(tenants) as sim:
        port, config, log = free_port(), tmp_path / "cms.yaml", tmp_path / "daemon.log"
        data = tmp_path / "data"
        write_atomically(
            config,
            config_text(database_url, data, port, [site(i, sim) for i in ("a", "b", "c")]),
        )
        async with (
            running_daemon(config, port, log, "a", "b", "c") as daemon,
            Stream(sim, "a") as stream,  # A gets alarms all along, across the reload
        ):
            b_before, c_before = post(sim, "b", event=INTRUSION), post(sim, "c")
            await wait_ingested(db, "b", b_before)
            await wait_ingested(db, "c", c_before)
            assert {r["priority"] for r in (await stored(db, "b")).values()} == {1}
            a_client, a_lease = client_footprint(sim, "a"), await lease(db, "a")
            b_logins = sim.site("b").logins
            polls = alarm_polls(sim, "b")
            await asyncio.sleep(1.5)
            b_polls_before = alarm_polls(sim, "b") - polls  # poll_interval 0.2: about 7

            # A unchanged; B: new password, slower polls, its own priority; C gone; D new.
            sim.site("b").password = "b-rotated-password"
            b_new = site(
                "b",
                sim,
                password="b-rotated-password",
                poll_interval=1.0,
                priorities={"intrusion": 4},
            )
            write_atomically(
                config,
                config_text(database_url, data, port, [site("a", sim), b_new, site("d", sim)]),
            )
            daemon.sighup()

            await eventually(lambda: daemon.events("config_reloaded"), what="config_reloaded")
            [reloaded] = daemon.events("config_reloaded")
            assert reloaded["added"] == ["d"]
            assert reloaded["removed"] == ["c"]
            assert reloaded["changed"] == ["b"]
            assert reloaded["unchanged"] == 1
            assert not daemon.events("config_reload_needs_restart")

            # D: taken on, polled, ingesting (only what arrives after its first poll).
            await eventually(lambda: daemon.sites_up("a", "b", "d"), what="d polled")
            d_alarms = post(sim, "d", 2)
            await wait_ingested(db, "d", d_alarms)
            assert sim.site("d").logins == 1

            # B: a new client logged in with the new password; new priorities apply.
            b_after = post(sim, "b", event=INTRUSION)
            await wait_ingested(db, "b", b_after)
            b_rows = await stored(db, "b")
            assert [b_rows[i]["priority"] for i in sorted(b_before | b_after)] == [1, 4]
            assert sim.site("b").logins == b_logins + 1

            # C: no longer polled, its new alarm never stored; B at its new cadence.
            c_polls, b_polls = alarm_polls(sim, "c"), alarm_polls(sim, "b")
            c_late = post(sim, "c")
            await asyncio.sleep(1.5)
            assert alarm_polls(sim, "c") == c_polls
            b_polls_after = alarm_polls(sim, "b") - b_polls
            assert b_polls_before >= 4 and b_polls_after <= 3, (b_polls_before, b_polls_after)
            sites = await daemon.site_status()
            assert sorted(sites) == ["a", "b", "d"]
            assert await daemon.metric("cms_ingest_site_up", site_id="c") is None
            assert await daemon.metric("cms_ingest_sites", vendor="davantis") == 3

            # A: never touched.
            await stream.stop()
            await assert_exactly_once(db, sim, "a")
            assert client_footprint(sim, "a") == a_client
            assert await lease(db, "a") == a_lease
            await assert_one_uninterrupted_burst(db, "a")

            [released] = daemon.events("leases_released")
            assert released["reason"] == "removed from the config" and released["sites"] == 1
            applied = await daemon.metric("cms_ingest_config_reloads_total", outcome="applied")
            assert applied == 1
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="invalid") in (
                None,
                0,
            )
        assert set(await stored(db, "c")) == c_before  # c_late never stored
        assert not c_late & set(await stored(db, "c"))
        text = log.read_text()
        assert "b-rotated-password" not in text and PASSWORD not in text


INVALID_SITES = """\
database_url: {database_url}
data_dir: {data_dir}
listen: 127.0.0.1:{port}
log_format: json
defaults: {{username: cms, poll_interval: 0.2}}
sites:
  - {{id: a, vendor: davantis, url: '{url_a}', password: canary-pass-a}}
  - {{id: b, vendor: nope, url: '{url_b}', password: canary-pass-b}}
  - {{id: e, vendor: davantis, url: '{url_e}'}}
  - {{id: a, vendor: davantis, url: '{url_e}', password: canary-pass-c}}
"""

INVALID_YAML = """\
database_url: {database_url}
sites:
  - {{id: a, vendor: davantis, url: '{url_a}'
"""


@pytest.mark.timeout(60)
async def test_an_invalid_file_is_refused_and_the_running_config_kept(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    tenants = {name: DavantisSite(media_delay=0) for name in ("a", "b", "e")}
    async with DavantisSimulator(tenants) as sim:
        port, config, log = free_port(), tmp_path / "cms.yaml", tmp_path / "daemon.log"
        data = tmp_path / "data"
        valid = [site("a", sim), site("b", sim)]
        write_atomically(config, config_text(database_url, data, port, valid))
        async with running_daemon(config, port, log, "a", "b") as daemon:
            footprints = {i: client_footprint(sim, i) for i in ("a", "b")}
            urls = {f"url_{i}": sim.url(i) for i in ("a", "b", "e")}

            # An unknown vendor, a missing password, a duplicate id: all reported at once.
            write_atomically(
                config,
                INVALID_SITES.format(database_url=database_url, data_dir=data, port=port, **urls),
            )
            daemon.sighup()
            await eventually(lambda: daemon.events("config_reload_refused"), what="refused")
            [refused] = daemon.events("config_reload_refused")
            assert refused["level"] == "error"
            problems = "\n".join(refused["problems"])
            for path in ("sites[1].vendor", "sites[2].password", "sites[3].id"):
                assert path in problems, problems
            assert len(refused["problems"]) == 3, problems
            assert "canary-pass" not in log.read_text()
            assert not daemon.events("config_reloaded")
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="invalid") == 1
            await still_running_as_before(daemon, db, sim, footprints)

            # A file that is not even YAML.
            write_atomically(config, INVALID_YAML.format(database_url=database_url, **urls))
            daemon.sighup()
            await eventually(
                lambda: len(daemon.events("config_reload_refused")) == 2, what="refused again"
            )
            problems = "\n".join(daemon.events("config_reload_refused")[1]["problems"])
            assert "invalid YAML" in problems and "line " in problems, problems
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="invalid") == 2
            await still_running_as_before(daemon, db, sim, footprints)

            # Fixed: applied, and only the new site is new.
            write_atomically(
                config, config_text(database_url, data, port, [*valid, site("e", sim)])
            )
            daemon.sighup()
            await eventually(lambda: daemon.events("config_reloaded"), what="config_reloaded")
            [reloaded] = daemon.events("config_reloaded")
            assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (["e"], [], [])
            await eventually(lambda: daemon.sites_up("a", "b", "e"), what="e polled")
            await wait_ingested(db, "e", post(sim, "e"))
            await still_running_as_before(daemon, db, sim, footprints)
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="applied") == 1
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="invalid") == 2
            assert len(daemon.events("config_reload_refused")) == 2


async def still_running_as_before(
    daemon: RunningDaemon,
    db: asyncpg.Connection,
    sim: DavantisSimulator,
    footprints: dict[str, tuple[int, int]],
) -> None:
    """Every old site is still polled by its old client and ingests new alarms."""
    polls = {site_id: alarm_polls(sim, site_id) for site_id in footprints}
    for site_id in footprints:
        await wait_ingested(db, site_id, post(sim, site_id))
    await eventually(
        lambda: all(alarm_polls(sim, i) > polls[i] for i in polls), what="polls continue"
    )
    assert {i: client_footprint(sim, i) for i in footprints} == footprints
    assert await daemon.sites_up(*footprints)


@pytest.mark.timeout(60)
async def test_restart_only_settings_are_reported_and_kept(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    tenants = {name: DavantisSite(media_delay=0) for name in ("a", "e")}
    async with DavantisSimulator(tenants) as sim:
        port, new_port = free_port(), free_port()
        config, log, data = tmp_path / "cms.yaml", tmp_path / "daemon.log", tmp_path / "data"
        flood = {"max_per_minute": 20, "quiet_s": 60}
        write_atomically(
            config, config_text(database_url, data, port, [site("a", sim)], flood=flood)
        )
        async with running_daemon(config, port, log, "a") as daemon:
            # listen and flood changed (restart only), and a site added (applied live).
            write_atomically(
                config,
                config_text(
                    database_url,
                    data,
                    new_port,
                    [site("a", sim), site("e", sim)],
                    flood={"max_per_minute": 2, "quiet_s": 60},
                ),
            )
            daemon.sighup()
            await eventually(lambda: daemon.events("config_reloaded"), what="config_reloaded")
            [needs_restart] = daemon.events("config_reload_needs_restart")
            assert needs_restart["settings"] == ["listen", "flood"]
            assert needs_restart["level"] == "warning"
            [reloaded] = daemon.events("config_reloaded")
            assert reloaded["added"] == ["e"]

            # Still served on the old address only.
            assert await daemon.ready()
            with pytest.raises(aiohttp.ClientConnectionError):
                await daemon.get("/healthz", port=new_port)
            # The old flood limit (20) still applies: with the new one (2) the third alarm
            # would lead a burst and the fourth join it.
            await eventually(lambda: daemon.sites_up("a", "e"), what="e polled")
            burst = post(sim, "e", 4, camera=1)
            await wait_ingested(db, "e", burst)
            assert [r["group_id"] for r in (await stored(db, "e")).values()] == [None] * 4
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="applied") == 1


@pytest.mark.timeout(60)
async def test_sighups_in_quick_succession_are_coalesced(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    tenants = {name: DavantisSite(media_delay=0) for name in ("a", "b", "d")}
    async with DavantisSimulator(tenants) as sim:
        port, config, log = free_port(), tmp_path / "cms.yaml", tmp_path / "daemon.log"
        data = tmp_path / "data"
        write_atomically(
            config, config_text(database_url, data, port, [site("a", sim), site("b", sim)])
        )
        async with running_daemon(config, port, log, "a", "b") as daemon:
            a_client, b_logins = client_footprint(sim, "a"), sim.site("b").logins
            # B's next poll hangs 1.8 s (under its 2 s request timeout): restarting B keeps the first reload busy that long,
            # so the later SIGHUPs arrive while it runs.
            sim.site("b").slow_alarm_polls(1, delay=1.8)
            await eventually(
                lambda: sim.site("b").state()["faults"]["slow"] == 0, what="slow poll in flight"
            )
            b_new = site("b", sim, priorities={"intrusion": 4})
            write_atomically(
                config,
                config_text(database_url, data, port, [site("a", sim), b_new, site("d", sim)]),
            )
            for _ in range(5):
                daemon.sighup()
                await asyncio.sleep(0.05)

            def settled() -> bool:
                started = len(daemon.events("config_reloading"))
                return started > 0 and started == len(daemon.events("config_reloaded"))

            await eventually(settled, timeout=15, what="reloads done")
            await eventually(lambda: daemon.sites_up("a", "b", "d"), what="d polled")
            starts = daemon.events("config_reloading")
            first, *rest = daemon.events("config_reloaded")
            assert 1 <= len(starts) <= 2, f"5 SIGHUPs, {len(starts)} reloads"
            assert (first["added"], first["removed"], first["changed"]) == (["d"], [], ["b"])
            for later in rest:  # the coalesced one finds nothing left to do
                assert (later["added"], later["removed"], later["changed"]) == ([], [], [])
            assert not daemon.events("config_reload_failed")
            assert not daemon.events("task_crashed")
            applied = await daemon.metric("cms_ingest_config_reloads_total", outcome="applied")
            assert applied == len(starts)

            # Applied once: one new client for B and one for D, A untouched.
            b_alarm, d_alarms = post(sim, "b", event=INTRUSION), post(sim, "d", 2)
            await wait_ingested(db, "b", b_alarm)
            await wait_ingested(db, "d", d_alarms)
            assert (await stored(db, "b"))[min(b_alarm)]["priority"] == 4
            assert sim.site("b").logins == b_logins + 1
            assert sim.site("d").logins == 1
            assert client_footprint(sim, "a") == a_client
            status = await daemon.status()
            assert [t for t in status["tasks"] if t.startswith("poller:")] == [
                "poller:a",
                "poller:b",
                "poller:d",
            ]


# Files that are valid YAML but make the loader raise something other than ConfigError:
# a vendor given as a list (`vendor in <frozenset>` raises TypeError), a recursive alias.
UNHASHABLE_VENDOR = {"id": "b", "vendor": ["davantis"], "url": "http://192.0.2.1:21000"}
RECURSIVE_ALIAS = "x: &x [*x]\n"


@pytest.mark.parametrize("broken", ["vendor", "alias"])
@pytest.mark.timeout(60)
async def test_a_file_the_loader_chokes_on_is_refused_too(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, broken: str
) -> None:
    async with DavantisSimulator({"a": DavantisSite(media_delay=0)}) as sim:
        port, config, log = free_port(), tmp_path / "cms.yaml", tmp_path / "daemon.log"
        data = tmp_path / "data"
        valid = config_text(database_url, data, port, [site("a", sim)])
        write_atomically(config, valid)
        async with running_daemon(config, port, log, "a") as daemon:
            footprint = client_footprint(sim, "a")
            if broken == "vendor":
                sites = [site("a", sim), UNHASHABLE_VENDOR]
                write_atomically(config, config_text(database_url, data, port, sites))
            else:
                write_atomically(config, RECURSIVE_ALIAS + valid)
            daemon.sighup()
            await eventually(
                lambda: daemon.events("config_reload_refused"), timeout=5, what="refused"
            )
            [refused] = daemon.events("config_reload_refused")
            if broken == "vendor":
                assert any("sites[1].vendor" in p for p in refused["problems"]), refused
            assert await daemon.metric("cms_ingest_config_reloads_total", outcome="invalid") == 1
            await still_running_as_before(daemon, db, sim, {"a": footprint})
