"""The lease keeper, driven directly on the in-memory storage adapter, with time in hand.

Each daemon is its runtime parts as the daemon wires them (`tests.support.node`: poller set,
alarm writer, lease keeper) over one `MemoryStorage` standing for the shared database, and
simulated Davantis sites over HTTP. The storage's clock is a manual one: a lease expires when
the test moves the clock past it, so renewal, fencing and take-over are shown without waiting
for a TTL. (`test_pollers.py` has the even split, the order of a hand-off and reloads;
`test_leases.py` the lease SQL and real processes.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cms_ingest.db.memory import ManualClock, MemoryStorage
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from tests.conftest import eventually
from tests.support import (
    KEEPER_TTL_S,
    NO_DATABASE,
    Node,
    app_config,
    first_polls,
    holding,
    memory_storage,
    node,
    owner,
    pollers_running,
    sites_of,
    stored_ids,
    tenants,
)


def clock_of(store: MemoryStorage) -> ManualClock:
    assert isinstance(store.clock, ManualClock)
    return store.clock


async def polls_ended(site: DavantisSite) -> bool:
    """No poll of `site` for three poll intervals (0.1 s each)."""
    before = site.requests["GET /alarms"]
    await asyncio.sleep(0.3)
    return site.requests["GET /alarms"] == before


@pytest.mark.timeout(30)
async def test_leases_are_taken_then_renewed_at_the_same_epoch(tmp_path: Path) -> None:
    store = memory_storage()
    clock = clock_of(store)
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="both sites taken")
            epochs = dict(d1.pollers.held)
            assert {site: owner(store, site) for site in epochs} == {
                site: ("d1", epoch) for site, epoch in epochs.items()
            }

            for _ in range(4):  # 3.2 TTLs in all: held only because each step renews them
                clock.advance(KEEPER_TTL_S * 0.8)
                renewed_until = clock.now + timedelta(seconds=KEEPER_TTL_S)

                def renewed(until: datetime = renewed_until) -> bool:
                    return all(store.leases[site].expires_at == until for site in epochs)

                await eventually(renewed, what="renewed from the clock's now")
            assert dict(d1.pollers.held) == epochs  # renewed, never taken afresh
            assert await store.acquire("d2", KEEPER_TTL_S, ["a", "b"], 2) == []


@pytest.mark.timeout(30)
async def test_a_commit_after_the_lease_moved_is_refused_and_the_poller_stops(
    tmp_path: Path,
) -> None:
    """A daemon paused past its leases: another takes one of its sites. Whatever the paused
    one polls of that site afterwards is refused in the commit (fencing) and it polls the
    site no more; its other site, expired but taken by nobody, still commits."""
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="both sites taken")
            await first_polls(d1, "a", "b")
            await d1.tasks.stop_tasks(["leases"], timeout=2)  # paused: nothing renewed
            clock_of(store).advance(KEEPER_TTL_S * 2)
            [taken] = await store.acquire("thief", 60.0, ["a"], 1)
            cursor = (await store.load_cursors(["a"]))["a"]

            late = {alarm.id for alarm in sim.site("a").add_alarms(2)}
            kept = {alarm.id for alarm in sim.site("b").add_alarms(2)}
            await eventually(lambda: kept <= stored_ids(store, "b"), what="b still committed")
            await eventually(lambda: polls_ended(sim.site("a")), what="a polled no more")
            assert not late & stored_ids(store, "a")
            assert (await store.load_cursors(["a"]))["a"] == cursor
            assert "a" in pollers_running(d1)  # until its keeper stops it

            d1.run_keeper()  # resumed: its heartbeat finds the lease gone
            await eventually(holding(d1, {"b"}), what="a dropped, its poller ended")
            assert owner(store, "a") == ("thief", taken.epoch)


@pytest.mark.timeout(30)
async def test_a_dead_daemons_sites_are_taken_over_once_its_leases_expire(
    tmp_path: Path,
) -> None:
    store = memory_storage()
    clock = clock_of(store)
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1, node("d2", store, config) as d2:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="d1 takes both")
            await first_polls(d1, "a")
            epoch = owner(store, "a")[1]
            await d1.tasks.stop_all(timeout=2)  # d1 dies: nothing handed back
            missed = {alarm.id for alarm in sim.site("a").add_alarms(3)}

            d2.run_keeper()
            await asyncio.sleep(KEEPER_TTL_S)  # three ticks: d1 still counts as alive
            assert d2.held() == set()
            clock.advance(KEEPER_TTL_S + 0.1)
            await eventually(lambda: d2.held() == {"a", "b"}, what="taken over")
            assert owner(store, "a") == ("d2", epoch + 1)
            # Resumed from d1's committed cursor: what came while nobody polled is stored.
            await eventually(lambda: missed <= stored_ids(store, "a"), what="the gap polled")


SIX = ["a", "b", "c", "d", "e", "f"]


@contextlib.asynccontextmanager
async def three_daemons_two_sites_each(
    tmp_path: Path,
) -> AsyncIterator[tuple[MemoryStorage, Node, Node, Node]]:
    """d1, d2 and d3 over one storage, each holding two of six sites."""
    store = memory_storage()
    async with DavantisSimulator(tenants(*SIX)) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, SIX))
        async with (
            node("d1", store, config) as d1,
            node("d2", store, config) as d2,
            node("d3", store, config) as d3,
        ):
            for daemon in (d1, d2, d3):
                daemon.run_keeper()
            await eventually(
                lambda: [len(n.held()) for n in (d1, d2, d3)] == [2, 2, 2], what="2/2/2"
            )
            yield store, d1, d2, d3


async def beaten_now(store: MemoryStorage, *names: str) -> None:
    """Until each of these daemons has heartbeated at the storage's current (manual) time."""
    now = clock_of(store).now
    await eventually(
        lambda: all(store.daemons[name].heartbeat_at == now for name in names),
        what=f"{names} beat at the new time",
    )


@pytest.mark.timeout(30)
async def test_a_daemon_frozen_after_another_died_keeps_no_share_of_the_dead_ones_sites(
    tmp_path: Path,
) -> None:
    """d1 dies; a moment later d2 stops renewing (frozen, or dying too) while its own leases
    still run. d3 takes all of d1's sites as soon as they expire, not only a third of the
    sites as if d2 would take the rest: d2 is counted out once its heartbeat is stale."""
    async with three_daemons_two_sites_each(tmp_path) as (store, d1, d2, d3):
        clock = clock_of(store)
        dead, frozen, own = d1.held(), d2.held(), d3.held()
        await d1.tasks.stop_all(timeout=2)  # d1 dies: nothing handed back
        clock.advance(KEEPER_TTL_S / 2)
        await beaten_now(store, "d2", "d3")
        await d2.tasks.stop_all(timeout=2)  # d2 stops renewing: its leases still run
        # d2's last beat now older than fresh_s, its leases (renewed then) not yet
        # expired; d1's expired.
        assert d3.keeper.fresh_s < KEEPER_TTL_S
        clock.advance((d3.keeper.fresh_s + KEEPER_TTL_S) / 2)
        await eventually(lambda: d3.held() == own | dead, what="all of d1's sites taken")
        assert all(owner(store, site)[0] == "d2" for site in frozen), "d2's still run"
        clock.advance(KEEPER_TTL_S)
        await eventually(lambda: d3.held() == set(SIX), what="then d2's too")


@pytest.mark.timeout(30)
async def test_a_dead_daemons_sites_do_not_wait_for_one_that_still_looks_alive(
    tmp_path: Path,
) -> None:
    """d1 dies; d2 freezes a moment before d1's leases expire, so it still counts as live
    when they do and the split gives d3 no more sites. d3 takes all of d1's expired leases
    anyway, at its next tick: they are nobody's, and d2 will never take them."""
    async with three_daemons_two_sites_each(tmp_path) as (store, d1, d2, d3):
        clock = clock_of(store)
        dead, frozen, own = d1.held(), d2.held(), d3.held()
        await d1.tasks.stop_all(timeout=2)  # d1 dies: nothing handed back
        fresh_s = d3.keeper.fresh_s
        clock.advance(KEEPER_TTL_S - fresh_s / 2)
        await beaten_now(store, "d2", "d3")
        await d2.tasks.stop_all(timeout=2)  # d2 freezes, its heartbeat still fresh
        clock.advance(fresh_s / 2 + 0.1)  # d1's leases expired; d2 still counts as live
        await eventually(
            lambda: d3.held() == own | dead,
            timeout=3 * d3.keeper.interval_s,
            what="all of d1's sites taken at once",
        )
        assert d3.keeper.live == ["d2", "d3"], "d2 still counted as live"
        assert all(owner(store, site)[0] == "d2" for site in frozen), "d2's still run"


@pytest.mark.timeout(30)
async def test_unrenewable_leases_stop_their_pollers_before_they_could_be_taken(
    tmp_path: Path,
) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            d1.run_keeper()
            await eventually(lambda: d1.held() == {"a", "b"}, what="both sites taken")
            loop = asyncio.get_running_loop()
            store.unavailable = True
            lost_at = loop.time()
            await eventually(lambda: d1.held() == set(), what="no site held")
            # Past 80 % of the TTL without a renewal (the keeper's own, monotonic clock).
            assert loop.time() - lost_at >= 0.8 * KEEPER_TTL_S - 0.25
            await eventually(holding(d1, set()), what="their pollers ended")

            store.unavailable = False  # back before anyone took them: taken again
            await eventually(holding(d1, {"a", "b"}), what="taken again")
