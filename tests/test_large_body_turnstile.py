"""Large bodies reach their parsers one per event-loop turn (`sitehttp.LargeBodyTurnstile`).

Without it, a storm's thousand full pages were parsed in one loop turn and the writer's
database round trips (and other sites' polls) waited behind all of them."""

from __future__ import annotations

import asyncio

from aiohttp import web

from cms_ingest.sitehttp import (
    LARGE_BODY_BYTES,
    LargeBodyTurnstile,
    SiteHttp,
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


async def test_a_large_answer_read_over_http_passes_the_turnstile() -> None:
    body = b"[" + b",".join(b'{"id": %d}' % i for i in range(LARGE_BODY_BYTES // 8)) + b"]"
    assert len(body) >= LARGE_BODY_BYTES

    async def alarms(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/alarms", alarms)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    turnstile = large_body_turnstile()
    assert not turnstile.busy
    async with new_client_session() as session:
        http = SiteHttp(session, f"http://127.0.0.1:{port}", timeout_s=5)
        async with http.request("GET", "/alarms") as response:
            read = await read_limited(response, len(body) + 1)
        # the slot is taken and given back on the next turn
        assert turnstile.busy
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not turnstile.busy
    await runner.cleanup()
    assert read == body
