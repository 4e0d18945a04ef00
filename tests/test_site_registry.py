"""The site registry as a daemon builds it: what each site holds is its own, what sites can
share (their vendor options, frozen models) is shared, and a dropped site is freed by
reference counts alone (the CLI hides the built registry from the garbage collector with
`gc.freeze`: a site in a reference cycle would then never be freed)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cms_ingest.cli import sites_frozen_once_built
from cms_ingest.runtime import sites as sites_module
from cms_ingest.runtime.daemon import Daemon, run_daemon
from cms_ingest.runtime.sites import SHARED_OPTIONS_MAX, shared_options
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.sitehttp import new_client_session
from cms_ingest.vendors.davantis import DavantisOptions
from tests.support import (
    app_config,
    camstreamer_site,
    camtrace_site,
    davantis_site,
    exacq_site,
    site_registry,
    videoloft_site,
)


async def test_sites_with_equal_options_share_one_model(tmp_path: Path) -> None:
    sites = [
        davantis_site("plain-1", "http://127.0.0.1:9"),
        davantis_site("plain-2", "http://127.0.0.1:9"),
        davantis_site("capped-1", "http://127.0.0.1:9", options={"page_cap": 50}),
        davantis_site("capped-2", "http://127.0.0.1:9", options={"page_cap": 50}),
        davantis_site("zoned", "http://127.0.0.1:9", options={"time_zone": "Europe/Madrid"}),
        camtrace_site("other-vendor", "http://127.0.0.1:9"),
    ]
    config = app_config("postgresql://nobody@127.0.0.1:9/none", tmp_path, sites)
    async with site_registry(config) as registry:
        options = {site.config.id: site.options for site in registry}
        clients = {id(site.client) for site in registry}
    assert options["plain-1"] is options["plain-2"]
    assert options["capped-1"] is options["capped-2"]
    assert isinstance(options["capped-1"], DavantisOptions) and options["capped-1"].page_cap == 50
    assert options["plain-1"].page_cap == 300
    assert options["zoned"] is not options["plain-1"] and options["zoned"].time_zone
    assert type(options["other-vendor"]) is not DavantisOptions
    assert len(clients) == len(sites), "clients are every site's own"


def test_shared_options_still_refuse_what_the_model_refuses() -> None:
    with pytest.raises(ValidationError):
        shared_options(DavantisOptions, {"page_cap": 0})
    with pytest.raises(ValidationError):
        shared_options(DavantisOptions, {"page_cap": 0})  # a refusal is not remembered as a model
    odd = shared_options(DavantisOptions, {"page_cap": 7, "time_zone": None})
    assert odd.page_cap == 7


def test_shared_options_stay_bounded_when_every_site_differs() -> None:
    first = shared_options(DavantisOptions, {"page_cap": 1})
    for cap in range(2, SHARED_OPTIONS_MAX + 10):
        assert shared_options(DavantisOptions, {"page_cap": cap}).page_cap == cap
        assert len(sites_module._SHARED_OPTIONS) <= SHARED_OPTIONS_MAX
    again = shared_options(DavantisOptions, {"page_cap": 1})
    assert again == first and again.page_cap == 1


async def test_a_dropped_site_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """Every vendor's site as the daemon builds it (on the supervisor): closed and dropped,
    nothing of it is left for the collector to find."""
    builders = [davantis_site, camtrace_site, videoloft_site, exacq_site, camstreamer_site]
    sites = [
        make(f"{make.__name__}-{i}", "http://127.0.0.1:9") for make in builders for i in (1, 2)
    ]
    config = app_config("postgresql://nobody@127.0.0.1:9/none", tmp_path, sites)
    session = new_client_session()
    supervisor = TaskSupervisor()
    gc.collect()
    gc.disable()
    try:
        registry = sites_module.SiteRegistry(config, session, supervisor)
        kept: list[weakref.ref[Any]] = []
        for site in registry:  # (options models are shared and cached on purpose)
            kept += [weakref.ref(site.client), weakref.ref(site.health.polled)]
        await registry.close()
        del registry, site
        assert [ref() for ref in kept if ref() is not None] == [], "outlived the registry"
        assert gc.collect() == 0, "a reference cycle among a site's objects"
    finally:
        gc.enable()
        await session.close()


async def test_a_site_that_polled_is_freed_by_reference_counts_too(tmp_path: Path) -> None:
    """After logins, camera lists, pages of alarms and a token in hand (what the daemon adds
    to a frozen site as it runs), closing and dropping it still frees it at once."""
    device = DavantisSite(media_delay=0)
    device.add_alarms(5)
    async with DavantisSimulator({"default": device}) as sim:
        config = app_config(
            "postgresql://nobody@127.0.0.1:9/none", tmp_path, [davantis_site("d1", sim.url())]
        )
        session = new_client_session()
        supervisor = TaskSupervisor()
        try:
            registry = sites_module.SiteRegistry(config, session, supervisor)
            site = registry.get("d1")
            assert site is not None
            first = await site.client.poll(None)
            device.add_alarms(3)
            second = await site.client.poll(first.cursor)
            assert len(second.alarms) == 3
            gc.collect()
            gc.disable()
            kept = [weakref.ref(site.client), weakref.ref(site.problems)]
            await registry.close()
            del registry, site, first, second
            assert [ref() for ref in kept] == [None, None], "held by a reference cycle"
        finally:
            gc.enable()
            await session.close()


async def test_the_daemon_builds_its_sites_within_its_hook_before_polling(
    database_url: str, tmp_path: Path
) -> None:
    seen: list[int] = []
    started: list[Daemon] = []
    daemons: asyncio.Queue[Daemon] = asyncio.Queue()
    config = app_config(database_url, tmp_path, [davantis_site("a", "http://127.0.0.1:9")])
    stop = asyncio.Event()

    @contextlib.contextmanager
    def building() -> Iterator[None]:  # how many pollers run around the build
        seen.append(sum(name.startswith("poller:") for name in started[0].supervisor.names))
        yield
        seen.append(sum(name.startswith("poller:") for name in started[0].supervisor.names))

    task = asyncio.create_task(
        run_daemon(
            config,
            stop=stop,
            on_started=lambda daemon: (started.append(daemon), daemons.put_nowait(daemon)),
            building_sites=building,
        )
    )
    try:
        daemon = await asyncio.wait_for(daemons.get(), timeout=30)
        await asyncio.wait_for(daemon.readiness.wait(), timeout=30)
        assert seen == [0, 0], "entered and left once, before any site is polled"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def test_the_cli_builds_sites_without_collections_then_hides_them_from_the_collector() -> None:
    assert gc.isenabled()
    try:
        with sites_frozen_once_built():
            assert not gc.isenabled(), "no collection while the sites are built"
            built = [[index] for index in range(1000)]
        frozen = gc.get_freeze_count()
        assert gc.isenabled() and frozen >= len(built), "what was built is frozen"
        with pytest.raises(RuntimeError), sites_frozen_once_built():
            raise RuntimeError("the build failed")
        assert gc.isenabled(), "a failed build leaves the collector on"
        assert gc.get_freeze_count() == frozen, "and freezes nothing"
    finally:
        gc.unfreeze()  # this test process's objects go back to the collector
