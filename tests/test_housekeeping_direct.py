"""Housekeeping, driven directly on the in-memory storage adapter: the daemon's readiness
follows its database, each change logged once; the held sites' health is written down, also
at stop; the status line is refreshed every round, the database up or not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cms_ingest.db.memory import MemoryStorage
from cms_ingest.runtime.housekeeping import Housekeeping
from cms_ingest.runtime.httpserver import Readiness
from cms_ingest.simulators.davantis import DavantisSimulator
from tests.conftest import eventually
from tests.support import (
    NO_DATABASE,
    Node,
    app_config,
    clock_at_now,
    first_polls,
    memory_storage,
    node,
    running,
    sites_of,
    take,
    tenants,
)


def housekeeping(d1: Node, readiness: Readiness, rounds: list[int]) -> Housekeeping:
    return Housekeeping(
        d1.store,
        d1.sites,
        d1.pollers,
        readiness,
        actions_may_run_s=5.0,
        report_status=lambda: rounds.append(len(rounds) + 1),
    )


@pytest.mark.timeout(30)
async def test_readiness_follows_the_database_each_change_logged_once(tmp_path: Path) -> None:
    store = memory_storage()
    async with DavantisSimulator(tenants("a")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a"]))
        async with node("d1", store, config) as d1:
            readiness = Readiness()
            readiness.mark_ready()  # as the daemon does once migrated
            rounds: list[int] = []
            keeper = housekeeping(d1, readiness, rounds)
            with capture_logs() as logs:
                await keeper.once()
                assert readiness.ready
                store.unavailable = True
                await keeper.once()
                await keeper.once()
                assert not readiness.ready
                assert readiness.reason.startswith("database: ")
                store.unavailable = False
                await keeper.once()
                await keeper.once()
                assert readiness.ready and readiness.reason == ""
    changes = [entry["event"] for entry in logs if entry["event"].startswith("database_")]
    assert changes == ["database_unreachable", "database_reachable_again"]
    assert rounds == [1, 2, 3, 4, 5], "the status line is refreshed every round"


@pytest.mark.timeout(30)
async def test_held_sites_health_is_written_down_and_once_more_at_stop(tmp_path: Path) -> None:
    clock = clock_at_now()
    store = MemoryStorage(clock=clock)
    async with DavantisSimulator(tenants("a", "b")) as sim:
        config = app_config(NO_DATABASE, tmp_path, sites_of(sim, ["a", "b"]))
        async with node("d1", store, config) as d1:
            await d1.pollers.start(await take(d1, "a"))  # b is configured, not held
            await first_polls(d1, "a")
            readiness = Readiness()
            readiness.mark_ready()
            async with running(housekeeping(d1, readiness, []).run):
                # Its first round (the next one is 5 s later).
                await eventually(
                    lambda: "a" in store.site_state and store.site_state["a"].last_success_at,
                    timeout=2.0,
                    what="a's health written",
                )
                assert store.site_state["a"].last_success_at is not None
                assert "b" not in store.site_state
                written = store.site_state["a"].updated_at
                sim.site("a").fail_alarm_polls(1000)  # a fails: its health changes
                await asyncio.sleep(0.3)
                clock.advance(1.0)  # so a write now is told from the first
                assert store.site_state["a"].updated_at == written, "next round in 5 s"
            state = store.site_state["a"]
            assert state.updated_at > written, "written at stop"
            assert state.consecutive_failures > 0 and state.last_error
