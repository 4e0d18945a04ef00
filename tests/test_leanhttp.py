"""The lean path for small GETs (`SiteHttp.fetch`, `cms_ingest/leanhttp.py`), against real
sockets: a scripted raw HTTP server answers each request with exactly the bytes a test
gives it, so every way a device can answer (or fail to) is reached, byte for byte."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ssl
import weakref
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from cms_ingest.leanhttp import LeanConnection
from cms_ingest.sitehttp import (
    Answer,
    DeviceTimeout,
    DeviceUnreachable,
    ResponseTooLarge,
    SiteHttp,
    TlsFailure,
    TlsPolicy,
    UnsafeUrl,
    new_client_session,
)
from tests.conftest import eventually
from tests.support import self_signed_certificate

# What the server does with one request: the bytes to write back (None: write nothing and
# keep the connection open), and whether to close the connection after writing them.
Reply = Callable[[bytes], tuple[bytes | None, bool]]


def ok(body: bytes = b'{"ok": true}', *extra: str) -> bytes:
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes, extra: str = "") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra
    return head.encode() + b"\r\n" + body


@dataclass
class RawDevice:
    """A device that answers with the bytes its replies give, one reply per request."""

    replies: list[Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
                data, close = reply(head)
                if data is not None:
                    writer.write(data)
                    await writer.drain()
                if close:
                    break
                if data is None:
                    await reader.read()  # silent until the client gives up
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_client_session() as client:
        yield client


@pytest.fixture
async def device() -> AsyncIterator[Callable[..., RawDevice]]:
    servers: list[asyncio.Server] = []
    devices: list[RawDevice] = []

    async def start(*replies: Reply, ssl_context: ssl.SSLContext | None = None) -> RawDevice:
        raw = RawDevice(list(replies))
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0, ssl=ssl_context)
        servers.append(server)
        devices.append(raw)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
    for raw in devices:
        for writer in raw.writers:
            writer.close()


def always(data: bytes | None, *, close: bool = False) -> Reply:
    return lambda _head: (data, close)


async def get(http: SiteHttp, path: str = "/alarms", limit: int = 1 << 20) -> Answer:
    return await http.fetch("GET", path, limit=limit)


async def test_a_site_keeps_one_connection_for_its_polls(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}/t/x")
    for _ in range(3):
        answer = await http.fetch("GET", "/alarms", limit=1000, params={"min_id": "7"})
        assert (answer.status, answer.body) == (200, b'{"ok": true}')
        assert answer.headers["content-type"] == "application/json"
    assert raw.connections == 1
    request = raw.requests[0].decode()
    assert request.startswith("GET /t/x/alarms?min_id=7 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{raw.port}\r\n" in request
    http.close()


async def test_a_connection_the_device_closed_while_kept_is_replaced(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    # The device closes every connection after its answer, without saying so (its keep-alive
    # timeout ran out): the next poll finds the kept connection closed, and asks again.
    raw = await device(always(ok(), close=True))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    for _ in range(3):
        assert (await get(http)).status == 200
        kept = http._lean._kept  # type: ignore[union-attr]
        assert kept is not None
        await eventually(lambda k=kept: not k.reusable(), what="the device's close seen")
    assert raw.connections == 3
    assert len(raw.requests) == 3


async def test_a_kept_connection_closed_as_the_request_arrives_is_asked_again_once(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    # The race a keep-alive timeout makes: the device takes the request and closes without
    # a word. A GET on a kept connection is asked again on a fresh one; on a fresh one, the
    # failure is the device's.
    raw = await device(always(ok()), always(b"", close=True), always(ok()), always(b"", close=True))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    assert (await get(http)).status == 200
    assert (await get(http)).status == 200
    assert (raw.connections, len(raw.requests)) == (2, 3)
    http.close()
    with pytest.raises(DeviceUnreachable, match="connection") as broke:
        await get(http)
    assert broke.value.sent is True
    assert (raw.connections, len(raw.requests)) == (3, 4)


async def test_connection_close_and_http_1_0_answers_are_not_kept(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(
        always(ok(b"{}", "Connection: close")),
    )
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    assert (await get(http)).body == b"{}"
    assert (await get(http)).body == b"{}"
    assert raw.connections == 2
    # No length, not chunked: the body is what comes until the device closes.
    raw = await device(always(b"HTTP/1.0 200 OK\r\n\r\n[1, 2]", close=True))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    assert (await get(http)).body == b"[1, 2]"
    assert (await get(http)).body == b"[1, 2]"
    assert raw.connections == 2


async def test_chunked_and_compressed_answers(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    payload = b'[{"id": 1}, {"id": 2}]' * 50
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
    gzipped = gzip.compress(payload) + gzip.flush()
    deflated = zlib.compress(payload)
    raw = await device(
        always(chunked(b"[1,", b" 2]")),
        always(ok(gzipped, "Content-Encoding: gzip")),
        always(chunked(deflated[:10], deflated[10:], extra="Content-Encoding: deflate\r\n")),
        always(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"[]")),
        always(b"HTTP/1.1 204 No Content\r\n\r\n"),  # no length, and no body: kept
        always(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        always(ok(b"[]")),
    )
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    assert (await get(http)).body == b"[1, 2]"
    assert (await get(http)).body == payload
    assert (await get(http)).body == payload
    assert (await get(http)).body == b"[]"
    assert (await get(http)).status == 204
    assert (await get(http)).status == 304
    assert (await get(http)).body == b"[]"
    assert raw.connections == 1


async def test_answers_over_the_cap_are_refused_unread(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    bomb = zlib.compressobj(1, zlib.DEFLATED, 31)
    gzip_bomb = bomb.compress(bytes(1 << 20)) + bomb.flush()  # 1 KiB on the wire, 1 MiB inflated
    raw = await device(
        always(ok(b"x" * 2000)),  # announced
        always(chunked(b"x" * 600, b"x" * 600)),  # found out while reading
        always(ok(gzip_bomb, "Content-Encoding: gzip")),  # found out while inflating
        always(ok(b"x" * 1000)),  # exactly the cap
    )
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    for _ in range(3):
        with pytest.raises(ResponseTooLarge) as refused:
            await get(http, limit=1000)
        assert refused.value.sent is True
        assert "1000-byte cap" in str(refused.value)
        assert f"GET http://127.0.0.1:{raw.port}/alarms" in str(refused.value)
    assert len((await get(http, limit=1000)).body) == 1000


async def test_a_device_that_breaks_off_or_talks_nonsense(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(
        always(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{partial", close=True),
        always(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", close=True),
        always(ok()),
    )
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    with pytest.raises(DeviceUnreachable, match="connection broke") as broke:
        await get(http)
    assert broke.value.sent is True
    with pytest.raises(DeviceUnreachable, match="not an HTTP answer"):
        await get(http)
    assert (await get(http)).status == 200  # and the site goes on


async def test_an_answer_after_the_answer_is_not_taken_for_the_next_one(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    # A device that sends two answers to one request: the first is the answer, and the
    # connection is dropped (out of step): the next request must not read the second.
    raw = await device(always(ok(b"[1]") + ok(b"[2]")), always(ok(b"[3]")))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    assert (await get(http)).body == b"[1]"
    assert (await get(http)).body == b"[3]"
    assert raw.connections == 2


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(always(None), always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}", timeout_s=0.3)
    with pytest.raises(DeviceTimeout) as timed_out:
        await get(http)
    assert timed_out.value.sent is True
    assert "no answer within 0.3 s" in str(timed_out.value)
    assert (await get(http)).status == 200
    assert raw.connections == 2


async def test_a_cancelled_poll_drops_its_connection(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(always(None), always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    poll = asyncio.create_task(get(http))
    await eventually(lambda: raw.requests, what="the request at the device")
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    assert (await get(http)).status == 200  # not the cancelled request's late answer
    assert raw.connections == 2


async def test_nothing_is_sent_for_a_header_a_device_could_inject(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    for token in ("abc\r\nX-Evil: 1", "abc\ndef", "nul\0"):
        with pytest.raises(UnsafeUrl) as refused:
            await http.fetch("GET", "/alarms", limit=100, headers={"Authorization": token})
        assert refused.value.sent is False
    assert raw.connections == 0


async def test_refused_connection_is_unsent(
    session: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    http = SiteHttp(session, f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(DeviceUnreachable, match="cannot connect") as refused:
        await get(http)
    assert refused.value.sent is False


async def test_tls_policy_on_the_lean_path(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice], tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    raw = await device(always(ok()), ssl_context=server_context)
    url = f"https://127.0.0.1:{raw.port}"
    with pytest.raises(TlsFailure, match="not trusted") as untrusted:
        await get(SiteHttp(session, url))
    assert untrusted.value.sent is False
    for policy in (TlsPolicy(pin_sha256=pin), TlsPolicy(ca_file=cert), TlsPolicy(verify=False)):
        http = SiteHttp(session, url, tls=policy)
        assert (await get(http)).status == 200
        assert (await get(http)).status == 200
        http.close()
    with pytest.raises(TlsFailure, match="pin") as wrong:
        await get(SiteHttp(session, url, tls=TlsPolicy(pin_sha256="00" * 32)))
    assert wrong.value.sent is False
    assert len(raw.requests) == 6  # nothing was sent where the certificate was refused


async def test_both_paths_give_the_same_answer(
    session: aiohttp.ClientSession,
    device: Callable[..., RawDevice],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = await device(always(ok(b'{"a": 1}', "Date: Sat, 05 Dec 2026 14:00:00 GMT")))
    lean = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    monkeypatch.setenv("CMS_INGEST_LEAN_HTTP", "0")
    plain = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    first, second = await get(lean), await get(plain)
    assert (first.status, first.body) == (second.status, second.body)
    assert first.headers["Date"] == second.headers["Date"]
    assert "cms-ingest" in raw.requests[0].decode()  # the lean path
    assert "aiohttp" in raw.requests[1].decode()  # the aiohttp path


async def test_a_closed_site_connection_is_freed_without_the_collector(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    raw = await device(always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    gc.disable()
    try:
        await get(http)
        kept = http._lean._kept  # type: ignore[union-attr]
        assert isinstance(kept, LeanConnection)
        gone = weakref.ref(kept)
        del kept
        http.close()
        # connection_lost runs on a later loop turn; a reference cycle would keep it for ever
        await eventually(lambda: gone() is None, what="the closed connection freed")
    finally:
        gc.enable()


async def test_what_the_lean_path_does_not_take_is_not_kept_by_aiohttp(
    session: aiohttp.ClientSession, device: Callable[..., RawDevice]
) -> None:
    # A login or an action (a POST) goes through aiohttp; it is rare for a site, so its
    # connection is not left in aiohttp's pool beside the site's kept lean one.
    raw = await device(always(ok()))
    http = SiteHttp(session, f"http://127.0.0.1:{raw.port}")
    answer = await http.fetch("POST", "/oauth/token", limit=100, data={"grant_type": "password"})
    assert answer.status == 200
    assert "\r\nConnection: close\r\n" in raw.requests[0].decode()
    assert (await get(http)).status == 200
    assert raw.connections == 2
