"""The poller set and the lease keeper, driven directly: no daemon, no subprocess, no SQL.

The parts are assembled here as the daemon assembles them (a real alarm writer, Davantis
simulator sites over HTTP), over one in-memory storage adapter shared by the daemons as they
would share one database (`test_storage_conformance.py` shows it behaves as PostgreSQL does;
`test_leases.py` keeps what only PostgreSQL and real processes show). Its clock is a manual
one, so no lease expires unless a test says so. Each behaviour is seen at the part that owns
it:
- the poller set: which sites are held, their pollers started and stopped;
- the lease keeper: the even split and hand-off between daemons, a lost lease, the order of
  a hand-off (poller stopped and its last commit done before the lease is released);
- the reloader: only the sites that changed are restarted, under the leases they hold.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from cms_ingest.config import load_checked
from cms_ingest.db.memory import MemoryStorage
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.reload import ConfigReloader
from cms_ingest.runtime.sdnotify import SystemdNotifier
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.runtime.writer import AlarmWriter
from cms_ingest.simulators.davantis import DavantisSimulator
from tests.conftest import eventually
from tests.support import (
    KEEPER_TTL_S,
    NO_DATABASE,
    app_config,
    davantis_site,
    first_polls,
    holding,
    memory_storage,
    node,
    owner,
    pollers_running,
    sites_of,
    stored_ids,
    take,
    tenants,
)

# ---------------------------------------------------------------------------- poller set


@pytest.mark.timeout(30)
async def test_started_sites_are_held_and_polled_until_stopped(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            leases = await take(d1, "a", "b")
            started = await d1.pollers.start({**leases, "unknown": 7})

            assert started == {"a", "b"}  # a site not configured is not started
            assert dict(d1.pollers.held) == leases
            assert pollers_running(d1) == {"a", "b"}
            await first_polls(d1, "a", "b")
            posted = {alarm.id for alarm in sim.site("a").add_alarms(2)}
            await eventually(lambda: _has(store, "a", posted), what="a's alarms stored")

            await d1.pollers.stop(["a"])
            assert dict(d1.pollers.held) == {"b": leases["b"]}
            assert pollers_running(d1) == {"b"}
            assert store.site_state["a"].last_success_at is not None  # its health written down

            late = {alarm.id for alarm in sim.site("a").add_alarms(1)}
            sim.site("b").add_alarm()
            await eventually(lambda: _count(store, "b", 1), what="b still polled")
            assert not late & stored_ids(store, "a")  # a is not polled any more


def _has(store: MemoryStorage, site_id: str, ids: set[int]) -> bool:
    return ids <= stored_ids(store, site_id)


def _count(store: MemoryStorage, site_id: str, n: int) -> bool:
    return len(stored_ids(store, site_id)) >= n


@pytest.mark.timeout(30)
async def test_a_halted_poller_set_starts_no_more_pollers(tmp_path: Path) -> None:
    """Shutdown halts the pollers while the lease keeper's last tick may still be taking
    leases: what it takes then is not started (the keeper gives such leases back)."""
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            assert await d1.pollers.start(await take(d1, "a")) == {"a"}
            await d1.pollers.halt()
            assert await d1.pollers.start(await take(d1, "b")) == set()
            assert d1.held() == {"a"}, "held until the leases are released at shutdown"
            assert pollers_running(d1) == set()


@pytest.mark.timeout(30)
async def test_a_poll_waiting_for_a_silent_device_does_not_hold_up_a_stop(
    tmp_path: Path,
) -> None:
    """A device that accepts the connection and never answers: stopping its poller (a
    hand-off, a shutdown) cuts that poll short instead of waiting for its request timeout
    or the stop timeout; nothing was committed for it, so nothing is lost."""
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = memory_storage()
    async with DavantisSimulator(tenants("a")) as sim:
        sites = [*sites_of(sim, ["a"]), davantis_site("mute", f"http://127.0.0.1:{port}")]
        config = app_config(NO_DATABASE, tmp_path, sites)
        async with node("d1", store, config) as d1:
            await d1.pollers.start(await take(d1, "a", "mute"))
            await first_polls(d1, "a")
            await eventually(lambda: silent, what="the silent device's connection")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with capture_logs() as logs:
                await d1.pollers.stop(["mute", "a"])
            took = loop.time() - started
            assert took < 1.5, f"{took:.2f} s: the stop waited for the silent device"
            assert d1.held() == set()
            cut = [e for e in logs if e["event"] == "tasks_interrupted"]
            assert [e["count"] for e in cut] == [1], logs
    server.close()
    for writer in silent:
        writer.close()


@pytest.mark.timeout(30)
async def test_a_site_whose_stored_state_cannot_be_read_is_not_started(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a"]))
        async with node("d1", store, config) as d1:
            leases = await take(d1, "a")
            broken = MemoryStorage(unavailable=True)
            unreadable = PollerSet(
                d1.tasks,
                d1.sites,
                broken,
                AlarmWriter(broken, media_deadline_of=lambda _site: 60.0),
                daemon_id="d1",
                media_deadline_s=60.0,
                flood=config.flood,
            )
            assert await unreadable.start(leases) == set()
            assert dict(unreadable.held) == {}
            assert pollers_running(d1) == set()


# ---------------------------------------------------------------------------- lease keeper


@pytest.mark.timeout(40)
async def test_two_keepers_split_the_sites_evenly_and_never_share_one(tmp_path: Path) -> None:
    store = memory_storage()
    names = ["a", "b", "c", "d"]
    async with DavantisSimulator(tenants(*names)) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, names))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == set(names), what="d1 takes every site")
            async with node("d2", store, config) as d2:
                d2.run_keeper()

                def split() -> bool:
                    return all(
                        len(node.held()) == 2 and pollers_running(node) == node.held()
                        for node in (d1, d2)
                    )

                await eventually(split, timeout=15, what="a 2/2 split")
                assert not d1.held() & d2.held()
                for site_id in d2.held():
                    assert owner(store, site_id)[0] == "d2"
                # Handed over, never taken: d1 released the leases d2 then acquired.
                handed = {site for released, _, _ in d1.leases.releases for site in released}
                assert handed == d2.held()
            # d2 leaving hands its sites back to d1.
            await eventually(lambda: d1.held() == set(names), timeout=15, what="d1 takes all")


@pytest.mark.timeout(30)
async def test_a_hand_off_stops_the_poller_before_the_lease_is_released(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="both sites taken")
            await first_polls(d1, "a")
            posted = {alarm.id for alarm in sim.site("a").add_alarms(3)}
            await eventually(lambda: _has(store, "a", posted), what="a's alarms stored")
            _, epoch = owner(store, "a")

            await d1.keeper.release(["a"], reason="test")

            released, running, held = d1.leases.releases[-1]
            assert released == {"a"}
            assert "a" not in running  # its poller had ended: its last commit was done
            assert "a" not in held
            assert "b" in running  # the other site was not touched
            # Given up at the epoch it was held under; the keeper takes it again later.
            await eventually(lambda: d1.held() == {"a", "b"}, what="a taken again")
            assert owner(store, "a")[1] > epoch


@pytest.mark.timeout(30)
async def test_a_lease_taken_by_another_daemon_stops_its_poller(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="both sites taken")
            # Another daemon takes "a" as if d1 had been paused past its lease.
            store.leases["a"].expires_at = store.clock()
            [taken] = await d1.leases.acquire("thief", 60.0, ["a"], 1)

            await eventually(holding(d1, {"b"}), what="a dropped, its poller ended")
            assert owner(store, "a") == ("thief", taken.epoch)  # not released by d1
            # d1 alone, its share is both sites, but "a" is not free: it is not taken back.
            await asyncio.sleep(KEEPER_TTL_S)  # three ticks of its keeper
            assert d1.held() == {"b"}


# ---------------------------------------------------------------------------- reload


def write_config(
    path: Path, database_url: str, data_dir: Path, sites: list[dict[str, Any]]
) -> None:
    text = yaml.safe_dump(
        {
            "database_url": database_url,
            "data_dir": str(data_dir),
            "defaults": {
                "username": "cms",
                "password": "secret",
                "poll_interval": 0.1,
                "request_timeout_s": 2,
            },
            "sites": sites,
        }
    )
    path.write_text(text)


@pytest.mark.timeout(40)
async def test_a_reload_restarts_only_the_changed_sites_under_their_leases(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b", "c", "d")) as sim:

        def site(site_id: str, **extra: Any) -> dict[str, Any]:
            return {"id": site_id, "vendor": "davantis", "url": sim.url(site_id), **extra}

        path = tmp_path / "cms.yaml"
        write_config(path, NO_DATABASE, tmp_path, [site("a"), site("b"), site("c")])
        config = load_checked(path)
        async with node("d1", store, config) as d1:
            reloader = ConfigReloader(config, SystemdNotifier(None, None), lambda: "")
            reloader.sites_running(d1.sites, d1.keeper)
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b", "c"}, what="every site taken")
            a_client, b_client = d1.sites.by_id["a"].client, d1.sites.by_id["b"].client
            leases_before = dict(d1.pollers.held)

            # A unchanged, B polled slower, C removed, D added.
            b_changed = site("b", poll_interval=0.5)
            write_config(path, NO_DATABASE, tmp_path, [site("a"), b_changed, site("d")])
            assert await reloader.reload()

            assert reloader.config.sites[1].poll_interval == 0.5
            assert d1.sites.by_id["a"].client is a_client  # A not restarted
            assert d1.sites.by_id["b"].client is not b_client  # B rebuilt from its new config
            assert d1.sites.by_id["b"].config.poll_interval == 0.5
            assert d1.pollers.held["b"] == leases_before["b"]  # restarted under its lease
            assert d1.pollers.held["a"] == leases_before["a"]
            assert "c" not in d1.pollers.held and "c" not in d1.sites.by_id
            assert owner(store, "c")[0] is None  # released for the others
            await eventually(lambda: d1.held() == {"a", "b", "d"}, what="d taken on")
            await first_polls(d1, "b")
            posted = {alarm.id for alarm in sim.site("b").add_alarms(2)}
            await eventually(lambda: _has(store, "b", posted), what="b polled again")


@pytest.mark.timeout(30)
async def test_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a")) as sim:
        path = tmp_path / "cms.yaml"
        sites = [{"id": "a", "vendor": "davantis", "url": sim.url("a")}]
        write_config(path, NO_DATABASE, tmp_path, sites)
        config = load_checked(path)
        async with node("d1", store, config) as d1:
            reloader = ConfigReloader(config, SystemdNotifier(None, None), lambda: "")
            reloader.sites_running(d1.sites, d1.keeper)
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a"}, what="a taken")
            client = d1.sites.by_id["a"].client
            path.write_text("sites: [{id: a, vendor: nobody}]\n")
            assert not await reloader.reload()
            assert reloader.config is config
            assert d1.sites.by_id["a"].client is client
            assert d1.held() == {"a"}


@pytest.mark.timeout(30)
async def test_reload_requests_coalesce_into_one_more_reload(tmp_path: Path) -> None:
    """The reload task: requests made before it ran are one reload; requests made while a
    reload runs are one more reload after it, not one each."""
    async with DavantisSimulator(tenants("a")) as sim:
        path = tmp_path / "cms.yaml"
        sites = [{"id": "a", "vendor": "davantis", "url": sim.url("a")}]
        write_config(path, NO_DATABASE, tmp_path, sites)
        reloads = 0

        def status_line() -> str:  # read at the end of every reload, while it still runs
            nonlocal reloads
            reloads += 1
            if reloads == 1:
                reloader.request()
                reloader.request()
            return ""

        reloader = ConfigReloader(load_checked(path), SystemdNotifier(None, None), status_line)
        reloader.request()
        reloader.request()
        tasks = TaskSupervisor()
        tasks.start("reload", reloader.run)
        try:
            await eventually(lambda: reloads == 2, what="the reload, then one more")
            await asyncio.sleep(0.5)
            assert reloads == 2
        finally:
            await tasks.stop_all(timeout=2.0)
        assert tasks.names == []


@pytest.mark.timeout(30)
async def test_a_reload_before_the_sites_run_keeps_restart_only_settings(tmp_path: Path) -> None:
    """Reloaded while the daemon still waits for its database: the new sites are taken for
    when they start; a setting that applies only at start is reported and kept."""
    path = tmp_path / "cms.yaml"
    site_a = {"id": "a", "vendor": "davantis", "url": "http://127.0.0.1:9"}
    write_config(path, NO_DATABASE, tmp_path, [site_a])
    reloader = ConfigReloader(load_checked(path), SystemdNotifier(None, None), lambda: "")
    workers = reloader.config.media.workers

    changed = yaml.safe_load(path.read_text())
    changed["media"] = {"workers": workers + 4}
    changed["sites"].append({**site_a, "id": "b"})
    path.write_text(yaml.safe_dump(changed))
    with capture_logs() as logs:
        assert await reloader.reload()

    assert [site.id for site in reloader.config.sites] == ["a", "b"]
    assert reloader.config.media.workers == workers
    [kept] = [entry for entry in logs if entry["event"] == "config_reload_needs_restart"]
    assert kept["settings"] == ["media"]
    [reloaded] = [entry for entry in logs if entry["event"] == "config_reloaded"]
    assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (["b"], [], [])
