"""A vendor client's background tasks, started through its context's task hook.

In the daemon they run on its supervisor (`vendor:<site>:<name>`): a crash is logged with its
traceback and restarted, and they stop with their client, closed or replaced. Outside it
(probe, fuzz harness, tests) they are plain tasks, a crash handed to the loop's handler.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from cms_ingest.metrics import Metrics
from cms_ingest.runtime.sites import SiteRegistry
from cms_ingest.runtime.tasks import TaskSupervisor
from cms_ingest.runtime.vendortasks import SupervisedTasks
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from cms_ingest.vendors.tasks import LocalTasks
from tests.conftest import eventually
from tests.support import app_config, memory_storage, node, take, videoloft_site


def vendor_tasks(supervisor: TaskSupervisor) -> list[str]:
    return [name for name in supervisor.names if name.startswith("vendor:")]


async def test_a_crashing_vendor_task_is_logged_and_restarted_by_the_supervisor() -> None:
    metrics = Metrics()
    supervisor = TaskSupervisor(metrics=metrics)
    tasks = SupervisedTasks(supervisor, "s1")
    runs = 0
    recovered = asyncio.Event()

    async def flaky(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug in the vendor's background work")
        recovered.set()
        await stop.wait()

    with capture_logs() as logs:
        await tasks.start("live:a", flaky)
        await asyncio.wait_for(recovered.wait(), timeout=10)  # after the supervisor's backoff
    crashes = [e for e in logs if e["event"] == "task_crashed"]
    assert len(crashes) == 1
    assert crashes[0]["exc_info"] is True  # logged with its traceback
    assert metrics.sample("cms_ingest_task_restarts_total", task="vendor") == 1
    assert vendor_tasks(supervisor) == ["vendor:s1:live:a"]
    assert tasks.running("live:a")
    await tasks.stop_all()
    assert vendor_tasks(supervisor) == []
    assert not tasks.running("live:a")
    assert runs == 2


async def test_a_replaced_clients_task_gives_way_to_its_successors() -> None:
    """A new client of the site may start a task of the same name before the replaced one's
    has finished stopping: it waits for it, never runs two of one name."""
    supervisor = TaskSupervisor()
    ran: list[str] = []

    def body(who: str) -> Any:
        async def run(stop: asyncio.Event) -> None:
            ran.append(who)
            await stop.wait()
            await asyncio.sleep(0.3)  # slow to let go (closing a connection)

        return run

    old, new = SupervisedTasks(supervisor, "s1"), SupervisedTasks(supervisor, "s1")
    await old.start("live:a", body("old"))
    await eventually(lambda: ran == ["old"], what="the old task running")
    old.retire()
    await new.start("live:a", body("new"))
    await eventually(lambda: ran == ["old", "new"], what="the new task running")
    assert vendor_tasks(supervisor) == ["vendor:s1:live:a"]
    await old.stop_all()  # the replaced client closed later: the successor's task stays
    assert new.running("live:a")
    assert vendor_tasks(supervisor) == ["vendor:s1:live:a"]
    await supervisor.stop_all(timeout=2)


async def test_videoloft_long_polls_stop_with_their_client_closed_or_replaced(
    tmp_path: Path,
) -> None:
    account = VideoloftAccount(media_delay=0, tail_s=0)  # two loggers: two long-polls
    supervisor = TaskSupervisor()
    async with VideoloftSimulator(account) as sim, aiohttp.ClientSession() as session:
        site = videoloft_site("v1", sim.url)
        config = app_config("postgresql://unused@127.0.0.1/none", tmp_path, [site])  # no DB
        sites = SiteRegistry(config, session, supervisor)
        try:
            first = sites.client_for_tenure("v1").client
            await first.poll(None)
            await eventually(lambda: account.open_live == 2, what="two long-polls")
            assert len(vendor_tasks(supervisor)) == 2
            assert all(name.startswith("vendor:v1:live:") for name in vendor_tasks(supervisor))

            second = sites.client_for_tenure("v1").client  # a new tenure: first is replaced
            await eventually(lambda: not vendor_tasks(supervisor), what="old tasks stopped")
            await eventually(lambda: account.open_live == 0, what="old long-polls closed")
            await second.poll(None)
            await eventually(lambda: account.open_live == 2, what="the new client's long-polls")
            assert len(vendor_tasks(supervisor)) == 2
        finally:
            await sites.close()
        assert vendor_tasks(supervisor) == []
        await eventually(lambda: account.open_live == 0, what="long-polls closed with client")
    await supervisor.stop_all(timeout=2)


async def test_outside_the_daemon_a_crash_reaches_the_loops_handler() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    tasks = LocalTasks()
    try:

        async def broken(stop: asyncio.Event) -> None:
            raise RuntimeError("a bug")

        async def steady(stop: asyncio.Event) -> None:
            await stop.wait()

        await tasks.start("broken", broken)
        await tasks.start("steady", steady)
        await eventually(lambda: reported, what="the crash reported")
        assert isinstance(reported[0]["exception"], RuntimeError)
        assert not tasks.running("broken")  # the client may start it again
        assert tasks.running("steady")
        await tasks.start("broken", steady)
        await tasks.stop_all()
        assert not tasks.running("steady")
        assert not tasks.running("broken")
    finally:
        loop.set_exception_handler(previous)


async def test_a_site_handed_over_stops_its_clients_long_polls(tmp_path: Path) -> None:
    """Once its poller has stopped (hand-off, lease lost, removal), the site's client keeps no
    long-poll open on the device: the next holder of the site opens its own."""
    account = VideoloftAccount(media_delay=0, tail_s=0)  # two loggers: two long-polls
    async with VideoloftSimulator(account) as sim:
        site = videoloft_site("v1", sim.url)
        config = app_config("postgresql://unused@127.0.0.1/none", tmp_path, [site])  # no DB
        async with node("d1", memory_storage(), config) as d1:
            assert await d1.pollers.start(await take(d1, "v1")) == {"v1"}
            await eventually(lambda: account.open_live == 2, what="the poller's long-polls")
            await d1.pollers.stop(["v1"])
            await eventually(lambda: account.open_live == 0, what="long-polls closed at hand-off")
