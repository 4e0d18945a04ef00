"""Large bodies reach their parsers one per event-loop turn (`sitehttp.LargeBodyTurnstile`).

Without it, a storm's thousand full pages were parsed in one loop turn and the writer's
database round trips (and other sites' polls) waited behind all of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from cms_ingest.sitehttp import (
    HEAVY_RECORDS,
    LARGE_BODY_BYTES,
    LargeBodyTurnstile,
    SiteHttp,
    heavy_turn,
    large_body_turnstile,
    new_client_session,
    read_limited,
)
from tests.support import free_port


class TurnCounter:
    """Counts event-loop turns: a callback that runs once per turn and re-arms itself."""

    def __init__(self) -> None:
        self.turn = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        if not self._stopped:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


async def test_tasks_ready_together_pass_on_different_turns() -> None:
    turnstile = LargeBodyTurnstile()
    counter = TurnCounter()
    gate = asyncio.Event()
    turns: list[int] = []

    async def parser() -> None:
        await gate.wait()
        await turnstile.wait_turn()
        turns.append(counter.turn)  # the synchronous parse would run here

    tasks = [asyncio.create_task(parser()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()  # all ten become ready in the same turn, like bodies read in one select
    await asyncio.gather(*tasks)
    counter.stop()
    assert len(turns) == 10
    assert len(set(turns)) == 10, f"several passed in one turn: {turns}"


async def test_io_goes_on_between_parses() -> None:
    """An I/O round trip started beside a queue of parses completes before the queue is
    through: the loop looks at its sockets between two parses."""
    turnstile = LargeBodyTurnstile()
    gate = asyncio.Event()
    events: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def parser(n: int) -> None:
        await gate.wait()
        await turnstile.wait_turn()
        events.append(f"parse {n}")

    async def round_trip() -> None:
        await gate.wait()
        writer.write(b"ping\n")
        await reader.readline()
        events.append("io")

    tasks = [asyncio.create_task(round_trip())]
    tasks += [asyncio.create_task(parser(n)) for n in range(50)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    writer.close()
    server.close()
    await server.wait_closed()
    assert events.index("io") < len(events) - 1, "the round trip waited for every parse"


BODY = b"[" + b",".join(b'{"id": %d}' % i for i in range(LARGE_BODY_BYTES // 8)) + b"]"


@asynccontextmanager
async def large_body_device() -> AsyncIterator[int]:
    """A device answering `GET /alarms` with BODY, a large body; yields its port."""
    assert len(BODY) >= LARGE_BODY_BYTES

    async def alarms(_: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/alarms", alarms)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_a_large_answer_read_over_http_passes_the_turnstile() -> None:
    body = BODY
    turnstile = large_body_turnstile()
    assert not turnstile.busy
    async with large_body_device() as port, new_client_session() as session:
        http = SiteHttp(session, f"http://127.0.0.1:{port}", timeout_s=5)
        async with http.request("GET", "/alarms") as response:
            read = await read_limited(response, len(body) + 1)
        # the slot is taken and given back on the next turn
        assert turnstile.busy
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not turnstile.busy
    assert read == body


async def test_finishing_work_goes_before_new_bodies_and_cancelled_waiters_are_skipped() -> None:
    """Finishing a poll (its next page, building its alarms) goes before bodies of sites that
    have not started, whatever the order they queued in: sites complete one after another and
    their commits flow, instead of every site going through each step together."""
    turnstile = LargeBodyTurnstile()
    order: list[str] = []

    async def passer(name: str, *, finishing: bool) -> None:
        await turnstile.wait_turn(finishing=finishing)
        order.append(name)

    tasks = {
        name: asyncio.create_task(passer(name, finishing=name.startswith("finish")))
        for name in ("new 1", "new 2", "finish 1", "new 3", "finish 2")
    }
    await turnstile.wait_turn()  # taken before the tasks run: they all queue
    await asyncio.sleep(0)
    assert (order, turnstile.waiting) == ([], 4), "the turn went to 'finish 1' (not run yet)"
    tasks["new 2"].cancel()  # cancelled while waiting: skipped when its turn comes
    tasks["finish 2"].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == ["finish 1", "new 1", "new 3"]
    await asyncio.sleep(0)
    assert not turnstile.busy


async def test_a_waiter_cancelled_after_it_was_given_the_turn_passes_it_on() -> None:
    turnstile = LargeBodyTurnstile()
    order: list[str] = []

    async def passer(name: str) -> None:
        await turnstile.wait_turn()
        order.append(name)

    first = asyncio.create_task(passer("first"))
    second = asyncio.create_task(passer("second"))
    await turnstile.wait_turn()
    await asyncio.sleep(0)  # both queue; then the turn is handed to `first` ...
    assert turnstile.waiting == 1
    first.cancel()  # ... which is cancelled before it runs: `second` must get the turn
    await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), timeout=2)
    assert order == ["second"]


@pytest.mark.parametrize("lean", ["1", "0"], ids=["lean-path", "aiohttp"])
async def test_a_sites_next_large_body_goes_before_sites_that_have_not_started(
    lean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site that read a large body moments ago reads its next one (the next page of the
    same poll) before the bodies queued by sites that have not started: here, 500 of them
    queued before any of it. A newcomer waits for all 500. On either HTTP path."""
    monkeypatch.setenv("CMS_INGEST_LEAN_HTTP", lean)
    body = BODY
    turnstile = large_body_turnstile()
    order: list[str] = []

    async def queued_body() -> None:
        await turnstile.wait_turn()
        order.append("queued")

    async with large_body_device() as port, new_client_session() as session:
        sites = {
            name: SiteHttp(session, f"http://127.0.0.1:{port}", timeout_s=5)
            for name in ("started", "new")
        }
        await sites["started"].fetch("GET", "/alarms", limit=len(body) + 1)  # its first page

        async def read(name: str) -> None:
            await sites[name].fetch("GET", "/alarms", limit=len(body) + 1)
            order.append(name)

        queue = [asyncio.create_task(queued_body()) for _ in range(500)]
        await asyncio.sleep(0)  # they queue (one may pass at once)
        await asyncio.gather(*queue, read("new"), read("started"))
        for http in sites.values():
            http.close()
    assert order.index("started") < order.index("queued") + 450, "it waited for the queue"
    assert order[-1] == "new"


async def test_building_many_alarms_takes_a_finishing_turn_and_a_few_take_none() -> None:
    turnstile = large_body_turnstile()
    await heavy_turn(HEAVY_RECORDS - 1)
    assert not turnstile.busy, "a few alarms are no parse's worth of work"
    order: list[str] = []

    async def queued_body() -> None:
        await turnstile.wait_turn()
        order.append("body")

    async def build() -> None:
        await heavy_turn(HEAVY_RECORDS)
        order.append("build")

    bodies = [asyncio.create_task(queued_body()) for _ in range(3)]
    await turnstile.wait_turn()
    await asyncio.sleep(0)  # the bodies queue, and the first is handed the turn
    await asyncio.gather(*bodies, build())
    assert order == ["body", "build", "body", "body"]
