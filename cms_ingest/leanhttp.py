"""The lean path for a site's small GETs: one kept HTTP/1.1 connection, parsed in C.

Most of a daemon's work is the idle poll: thousands of sites asked every second or so for
alarms they do not have. On aiohttp, its request and response machinery was 43 % of an
idle poll's CPU and its kept connection ~7.5 KiB per site. Here a site keeps one
connection of its own (an asyncio Protocol with a few slots), writes the request head in
one write and hands what comes back to httptools (llhttp, Node.js's parser, in C).

What it does, like aiohttp does for the site: TLS by the site's policy (verified by
default, CA file, or certificate pin), a deadline on the whole exchange and a shorter one
on connecting, no redirects followed (a 3xx is an answer like any other), a body read no
further than the caller's cap, gzip and deflate bodies inflated within the same cap. What
it does not do (and `SiteHttp` keeps aiohttp for): request bodies, streamed downloads,
proxies, cookies.

A kept connection the device closed in the meantime is found out on the next request:
before anything was answered, a GET is sent once more on a fresh connection (a GET asks,
it changes nothing; aiohttp's pool does the same).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cms_ingest.httptypes import (
    Answer,
    DeviceTimeout,
    DeviceUnreachable,
    ResponseTooLarge,
    TlsFailure,
    TlsPolicy,
    TransportError,
    UnsafeUrl,
)

KEEPALIVE_S = 30.0  # a kept connection unused this long is closed, not reused (as aiohttp)
CONNECT_TIMEOUT_S = 10.0
INFLATE_STEP = 256 * 1024
USER_AGENT = "cms-ingest"
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


@functools.cache
def _verified_context(ca_file: str | None) -> ssl.SSLContext:
    """One context per trust store for the whole process (each costs ~100 KB and a read of
    the system's certificates): the default trust store, or a site's CA file."""
    return ssl.create_default_context(cafile=ca_file)


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_context(policy: TlsPolicy) -> tuple[ssl.SSLContext, bytes | None]:
    """The context an https site is reached with, and the certificate pin to check after
    the handshake. A pin replaces chain verification; it does not skip the pin check."""
    if policy.pin_sha256:
        return _unverified_context(), bytes.fromhex(policy.pin_sha256)
    if not policy.verify:
        return _unverified_context(), None
    return _verified_context(str(policy.ca_file) if policy.ca_file else None), None


def request_head(method: str, host: str, path_qs: str, headers: Mapping[str, str] | None) -> bytes:
    """The request line and headers, as sent. A header with a line break or NUL in it (a
    token a device handed us) is refused before anything is sent, as aiohttp refuses it."""
    lines = [
        f"{method} {path_qs} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Accept-Encoding: gzip, deflate",
    ]
    if headers:
        for name, value in headers.items():
            text = f"{name}: {value}"
            if any(bad in text for bad in _FORBIDDEN_IN_HEADERS) or ":" in name:
                raise UnsafeUrl(
                    f"refusing to send header {name[:40]!r}: a line break or NUL in it",
                    sent=False,
                )
            lines.append(text)
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise UnsafeUrl("refusing to send a header that is not Latin-1", sent=False) from None


class LeanSite:
    """A site's lean path: where it is, its TLS, and the one connection it keeps."""

    __slots__ = ("_host", "_host_header", "_kept", "_pin", "_port", "_tls")

    def __init__(self, base_url: URL, tls: TlsPolicy) -> None:
        self._host = base_url.raw_host or ""
        self._host_header = base_url.host_port_subcomponent or ""  # every URL is the site's
        self._port = base_url.port or (443 if base_url.scheme == "https" else 80)
        context, pin = tls_context(tls) if base_url.scheme == "https" else (None, None)
        self._tls = context
        self._pin = pin
        self._kept: LeanConnection | None = None

    async def get(
        self, target: str, headers: Mapping[str, str] | None, *, limit: int, timeout_s: float
    ) -> Answer:
        """GET `target` (path and query, encoded; the caller checked it is the site's), its
        whole answer within `limit` bytes, all within `timeout_s`."""
        head = request_head("GET", self._host_header, target, headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        connection = self._take_kept()
        if connection is not None:
            try:
                answer = await connection.exchange(head, limit, deadline, timeout_s)
                return self._keep(connection, answer)
            except _StaleConnection:
                pass  # closed by the device while kept: nothing was answered, ask again
        connection = await self._connect(deadline)  # a fresh one is never stale
        return self._keep(connection, await connection.exchange(head, limit, deadline, timeout_s))

    def close(self) -> None:
        """Close the kept connection (the site is dropped, or the daemon stops)."""
        connection, self._kept = self._kept, None
        if connection is not None:
            connection.close()

    def _take_kept(self) -> LeanConnection | None:
        connection, self._kept = self._kept, None
        if connection is not None and not connection.reusable():
            connection.close()
            return None
        return connection

    def _keep(self, connection: LeanConnection, answer: Answer) -> Answer:
        """Keep the connection for the next request if it may be reused and none is kept
        (two requests of a site at once: the second's connection is closed after)."""
        if connection.reusable() and self._kept is None:
            self._kept = connection
        else:
            connection.close()
        return answer

    async def _connect(self, deadline: float) -> LeanConnection:
        loop = asyncio.get_running_loop()
        connection = LeanConnection(loop)
        timeout = max(0.0, min(CONNECT_TIMEOUT_S, deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except TimeoutError:
            connection.close()
            raise DeviceTimeout(f"no connection within {timeout:g} s", sent=False) from None
        except ssl.SSLCertVerificationError as exc:
            raise TlsFailure(f"TLS certificate not trusted ({exc})", sent=False) from None
        except ssl.SSLError as exc:
            raise TlsFailure(f"TLS failed ({exc})", sent=False) from None
        except OSError as exc:
            raise DeviceUnreachable(f"cannot connect ({exc})", sent=False) from None
        if self._pin is not None:
            connection.check_pin(self._pin)
        return connection


class _StaleConnection(Exception):
    """A kept connection turned out closed before any of the answer came: nothing was
    answered, the request may be sent again on a fresh one."""


class LeanConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a site; one exchange at a time.

    It is also the parser's callback target (the `on_*` methods). References between it,
    its transport and its parser are cycles: `close` and `connection_lost` break them, so
    a closed connection is freed by reference counts, not left to the collector.
    """

    __slots__ = (
        "__weakref__",  # tests check a closed connection is freed
        "_answered",
        "_chunks",
        "_complete",
        "_failure",
        "_fresh",
        "_headers",
        "_inflater",
        "_limit",
        "_loop",
        "_parser",
        "_size",
        "_status",
        "_transport",
        "_until_eof",
        "_used_at",
        "_waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self._fresh = True  # never used yet: a failure is the device's, not staleness
        self._used_at = time.monotonic()
        self._reset(0)

    def _reset(self, limit: int) -> None:
        self._answered = False  # any byte of this exchange's answer came
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._inflater: Any = None
        self._until_eof = False  # no length, not chunked: the body ends when the device closes
        self._complete = False
        self._failure: TransportError | None = None

    # ------------------------------------------------------------------ use

    def reusable(self) -> bool:
        return (
            self._transport is not None
            and not self._transport.is_closing()
            and self._waiter is None
            and time.monotonic() - self._used_at < KEEPALIVE_S
        )

    def check_pin(self, pin: bytes) -> None:
        assert self._transport is not None
        ssl_object = self._transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        got = hashlib.sha256(der or b"").digest()
        if got != pin:
            self.close()
            raise TlsFailure(
                f"certificate does not match the configured pin (got sha256 {got.hex()})",
                sent=False,
            )

    async def exchange(self, head: bytes, limit: int, deadline: float, timeout_s: float) -> Answer:
        """Send `head`, wait for the whole answer until `deadline` (the request's
        `timeout_s`, named when it runs out). Raises `_StaleConnection` when a kept
        connection is found closed before any answer came."""
        transport = self._transport
        if transport is None or transport.is_closing():
            if self._fresh:
                raise DeviceUnreachable("connection closed", sent=False)
            raise _StaleConnection()
        self._reset(limit)
        # A parser per exchange: kept between polls it held ~850 B of every idle site.
        self._parser = httptools.HttpResponseParser(self)
        waiter = self._waiter = self._loop.create_future()
        expiry = self._loop.call_at(deadline, self._expire, timeout_s)
        try:
            transport.write(head)
            await waiter
        except BaseException:
            self.close()  # cancelled or failed mid-exchange: the connection's state is unknown
            self._reset(0)
            raise
        finally:
            expiry.cancel()
            self._waiter = None
        fresh, self._fresh = self._fresh, False
        failure, answered = self._failure, self._answered
        if failure is not None:
            self.close()
            self._reset(0)  # a traceback may keep this connection: not the answer's bytes
            if not answered and not fresh and not isinstance(failure, DeviceTimeout):
                raise _StaleConnection()
            raise failure
        self._used_at = time.monotonic()
        answer = Answer(
            self._status,
            CIMultiDictProxy(
                CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._headers)
            ),
            b"".join(self._chunks),
        )
        self._reset(0)  # the kept connection holds no answer (nor parser) between polls
        self._parser = None
        return answer

    def close(self) -> None:
        transport, self._transport = self._transport, None
        self._parser = None
        if transport is not None:
            transport.close()

    def _expire(self, timeout_s: float) -> None:
        self._finish(DeviceTimeout(f"no answer within {timeout_s:g} s", sent=True))
        self.close()

    def _finish(self, failure: TransportError | None = None) -> None:
        if failure is not None and self._failure is None:
            self._failure = failure
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self._waiter is None or parser is None:
            self.close()  # bytes nobody asked for: the connection is no longer in step
            return
        self._answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        if self._failure is not None:
            self.close()

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        # httptools wraps what a callback raised: the callback's own exception is the context.
        cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
        if isinstance(cause, _BodyTooLarge):
            self._finish(ResponseTooLarge(str(cause), sent=True))
        elif isinstance(cause, _Unsolicited):
            self.close()  # more than the answer came: not in step any more
        else:
            self._finish(DeviceUnreachable(f"not an HTTP answer ({cause})", sent=True))

    def eof_received(self) -> bool | None:
        self._ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._ended(exc)
        self._parser = None

    def _ended(self, exc: Exception | None = None) -> None:
        if self._waiter is None or self._complete:
            return
        if self._until_eof and self._status:
            self._message_done(at_eof=True)
            return
        why = f" ({exc})" if exc else ""
        self._finish(DeviceUnreachable(f"connection broke{why}", sent=True))

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Unsolicited()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lowered == b"content-encoding":
                self._inflater = _inflater(value.strip().lower())
        if length is not None and length > self._limit and self._inflater is None:
            raise _BodyTooLarge(f"answer of {length} bytes, over the {self._limit}-byte cap")
        # Whether the device's close may end the body (the parser then never completes the
        # message itself). 204 and 304 answers have no body whatever their headers say.
        self._until_eof = length is None and not chunked and self._status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        inflater = self._inflater
        if inflater is None:
            self._take(body)
            return
        # Inflated in steps: a bomb never becomes one huge bytes object, only steps up to the cap.
        while body:
            try:
                self._take(inflater.decompress(body, INFLATE_STEP))
            except zlib.error as exc:
                raise ValueError(f"bad compressed body: {exc}") from None
            body = inflater.unconsumed_tail

    def _take(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            self._chunks.clear()
            raise _BodyTooLarge(f"answer over the {self._limit}-byte cap")
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # 100 Continue and its kin: the real answer follows
            self._headers = []
            return
        self._message_done()

    def _message_done(self, *, at_eof: bool = False) -> None:
        self._complete = True
        parser = self._parser
        if at_eof or parser is None or not parser.should_keep_alive():
            self.close()  # the connection ends with this answer (the answer is read)
        self._finish()


class _BodyTooLarge(Exception):
    pass


class _Unsolicited(Exception):
    """A second answer after the one asked for."""


def _inflater(encoding: bytes) -> Any:
    """A decompressor for the body's encoding; None for identity (and for encodings we do
    not ask for: the body is kept as it came, as aiohttp keeps it)."""
    if encoding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped (raw deflate: refused)
    return None
