"""Each daemon counts on its own `Metrics`: two daemons in one process keep their figures apart.

Metrics used to be module-level collectors on one registry: two daemons in one process (as
tests run them) added to the same counters, and the lease keeper's gauges (`sites_owned`,
`daemons_live`) read whichever keeper was built last. Here two daemons' parts, assembled as
`Daemon` assembles them over one in-memory storage and real Davantis simulator sites, split
the sites, and each one's metrics show its own share, its own polls and its own hand-off;
and each one's `/metrics` endpoint serves its own registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.samples import Sample

from cms_ingest.config import SiteConfig
from cms_ingest.db.memory import MemoryStorage
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.httpserver import Readiness, make_app, serve
from cms_ingest.runtime.leases import LeaseKeeper
from cms_ingest.runtime.pollers import PollerSet
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import app_config, davantis_site, free_port, metric_sum, ready
from tests.support import metrics as scrape
from tests.support import node as daemon_parts

TTL_S = 3.0  # the keepers tick every second
SITES = ("a", "b", "c")


@dataclass
class Node:
    """One daemon's parts that count, sharing its `metrics`."""

    name: str
    metrics: Metrics
    pollers: PollerSet
    keeper: LeaseKeeper
    tasks: TaskSupervisor

    def held(self) -> set[str]:
        return set(self.pollers.held)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.sample(name, **labels)


@contextlib.asynccontextmanager
async def node(
    name: str, storage: MemoryStorage, sim: DavantisSimulator, tmp_path: Path
) -> AsyncIterator[Node]:
    """One daemon's parts as `Daemon` wires them (`tests.support.node`), on `metrics` of
    their own, its lease keeper running."""
    config = app_config("postgresql://unused@127.0.0.1/none", tmp_path / name, _sites(sim))
    metrics = Metrics()
    async with daemon_parts(name, storage, config, ttl_s=TTL_S, metrics=metrics) as parts:
        parts.run_keeper()
        yield Node(name, metrics, parts.pollers, parts.keeper, parts.tasks)


def _sites(sim: DavantisSimulator) -> list[SiteConfig]:
    return [davantis_site(site_id, sim.url(site_id)) for site_id in SITES]


@pytest.mark.timeout(60)
async def test_two_daemons_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    storage = MemoryStorage()
    tenants = {site_id: DavantisSite(media_delay=0) for site_id in SITES}
    async with DavantisSimulator(tenants) as sim, node("d1", storage, sim, tmp_path) as d1:
        await eventually(lambda: d1.held() == set(SITES), what="d1 holds every site")
        async with node("d2", storage, sim, tmp_path) as d2:
            # Three sites over two daemons: the first id takes the extra one.
            await eventually(lambda: len(d1.held()) == 2, what="d1 hands one over")
            await eventually(lambda: len(d2.held()) == 1, what="d2 takes it")
            (moved,) = d2.held()
            await eventually(
                lambda: d2.sample(
                    "cms_ingest_polls_total", site_id=moved, vendor="davantis", outcome="ok"
                ),
                what="d2 polls its site",
            )

            # The keepers' gauges: each daemon's own share, both seeing two daemons.
            assert d1.sample("cms_ingest_sites_owned") == 2
            assert d2.sample("cms_ingest_sites_owned") == 1
            assert d1.sample("cms_ingest_daemons_live") == 2
            assert d2.sample("cms_ingest_daemons_live") == 2
            assert d1.sample("cms_ingest_lease_handoffs_total") == 1
            assert d2.sample("cms_ingest_lease_handoffs_total") == 0

            # A site handed over: its per-site series withdrawn by d1, exported by d2.
            up = "cms_ingest_site_up"
            labels = {"site_id": moved, "vendor": "davantis"}
            assert d1.metrics.registry.get_sample_value(up, labels) is None
            assert d2.metrics.registry.get_sample_value(up, labels) == 1
            for site_id in d1.held():
                assert d1.sample(up, site_id=site_id, vendor="davantis") == 1

            # Each daemon's /metrics serves its own registry.
            served = await asyncio.gather(_scrape(d1.metrics), _scrape(d2.metrics))
            assert [metric_sum(s, "cms_ingest_sites_owned") for s in served] == [2, 1]


async def _scrape(own: Metrics) -> list[Sample]:
    """The samples `/metrics` serves for an app built with `own` metrics."""
    port = free_port()
    stop = asyncio.Event()
    readiness = Readiness()
    readiness.mark_ready()
    app = make_app(readiness, lambda: {}, metrics=own)
    server = asyncio.create_task(serve(app, "127.0.0.1", port, stop))
    try:
        await eventually(lambda: ready(port), what="the endpoint")
        return await scrape(port)
    finally:
        stop.set()
        await server


def test_forgetting_sites_withdraws_exactly_their_per_site_series() -> None:
    metrics = Metrics()
    for site_id in ("a", "b", "c"):
        metrics.poll_series(site_id, "davantis").up = True
        metrics.clock_skew.labels(site_id=site_id, vendor="davantis").set(2.5)
        for component in ("recorder", "cameras"):
            metrics.device_health.labels(
                site_id=site_id, vendor="davantis", component=component
            ).set(1)
        metrics.api_budget_remaining.labels(site_id=site_id, vendor="camstreamer").set(9)
    metrics.forget_sites(["a", "c"])
    metrics.forget_site("nobody")
    left = {
        (sample.name, sample.labels["site_id"])
        for family in metrics.registry.collect()
        for sample in family.samples
        if "site_id" in sample.labels
    }
    assert {site for _name, site in left} == {"b"}
    # up and consecutive failures (once polled), skew, health (its two components are one
    # name), budget
    assert len(left) == 5
    assert (
        metrics.sample(
            "cms_ingest_device_health", site_id="b", vendor="davantis", component="cameras"
        )
        == 1
    )


async def test_forgetting_sites_withdraws_their_gauges_only_and_in_slices() -> None:
    """Enough series for several slices: every per-site series of the forgotten sites goes
    (their polls too: the next holder counts them), those of the others stay."""
    metrics = Metrics()
    sites = [f"s{i:04d}" for i in range(1500)]
    for site in sites:
        series = metrics.poll_series(site, "davantis")
        series.up = True
        series.count("ok")
        metrics.device_health.labels(site_id=site, vendor="davantis", component="disk").set(1)
    gone, kept = set(sites[:1200]), sites[1200:]
    await metrics.forget_sites_in_slices(gone)
    text = metrics.exposition().decode()
    up = {line.split('site_id="')[1][:5] for line in text.splitlines() if "site_up{" in line}
    health = {
        line.split('site_id="')[1][:5] for line in text.splitlines() if "device_health{" in line
    }
    assert up == health == set(kept)
    polls = {line.split('site_id="')[1][:5] for line in text.splitlines() if "polls_total{" in line}
    assert polls == set(kept)
    metrics.forget_sites(kept[:10])
    assert metrics.sample("cms_ingest_site_up", site_id=kept[0], vendor="davantis") == 0
    assert metrics.sample("cms_ingest_site_up", site_id=kept[-1], vendor="davantis") == 1
