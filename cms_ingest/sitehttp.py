"""HTTP to one site: the only way vendor clients reach a device.

Every vendor client talks through a `SiteHttp`, which owns what must be the same for all of
them: TLS policy (verified by default, per-site CA file or SHA-256 certificate pin), explicit
timeouts on every request (aiohttp's default is five minutes), no redirects, and the rule that
only URLs on the configured site's own origin are ever requested. Transport failures come out
as this module's exceptions, so callers never handle aiohttp's directly.

All sites share one `aiohttp.ClientSession` (one connection pool for the process): a
thousand sites must not mean a thousand pools. A site's small GETs (the idle poll, through
`fetch`) take the lean path instead (`leanhttp`: the site's one kept connection, parsed in
C), with the same rules; `CMS_INGEST_LEAN_HTTP=0` sends them through aiohttp too.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import resource
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from cms_ingest.httptypes import Answer as Answer  # noqa: PLC0414 (re-exported)
from cms_ingest.httptypes import DeviceTimeout as DeviceTimeout  # noqa: PLC0414
from cms_ingest.httptypes import DeviceUnreachable as DeviceUnreachable  # noqa: PLC0414
from cms_ingest.httptypes import ResponseTooLarge as ResponseTooLarge  # noqa: PLC0414
from cms_ingest.httptypes import TlsFailure as TlsFailure  # noqa: PLC0414
from cms_ingest.httptypes import TlsPolicy as TlsPolicy  # noqa: PLC0414
from cms_ingest.httptypes import TransportError as TransportError  # noqa: PLC0414
from cms_ingest.httptypes import UnsafeUrl as UnsafeUrl  # noqa: PLC0414
from cms_ingest.leanhttp import LeanSite

SKEW_EVERY_S = 60.0
# A body this large means parsing work (a full page of alarms is ~100 KB, ~10 ms to parse):
# such bodies pass the turnstile below. An idle poll's answer is far smaller.
LARGE_BODY_BYTES = 16384
CONTINUING_S = 5.0  # a large body this soon after the site's last one continues its poll
HEAVY_RECORDS = 50  # alarms built (or prepared) at once: ~0.5 ms and more (see heavy_turn)
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")


def ssl_option(policy: TlsPolicy) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
    """What aiohttp's `ssl=` should be for a site.

    A pin replaces chain verification (the point of pinning a self-signed certificate) but the
    exact certificate must match; a CA file verifies the chain against that CA only.
    """
    if policy.pin_sha256:
        return aiohttp.Fingerprint(bytes.fromhex(policy.pin_sha256))
    if not policy.verify:
        return False
    if policy.ca_file is not None:
        return ssl.create_default_context(cafile=str(policy.ca_file))
    return True


def connection_limit(sites: int) -> int:
    """Keep-alive connections the daemon's session may hold: every site is its own host
    (one connection for its polls, more for media, actions and long-polls). Below one per
    site, connections are closed and opened again on every poll and polls queue for a free
    one: 2,000 sites on their own ports got 52 % of their polls with a pool of 1,000."""
    return max(1000, 4 * sites)


def raise_open_files_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft limit of open files towards `wanted` (capped by the hard
    limit, which only the service manager raises: `LimitNOFILE`); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted, hard
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def new_client_session(*, connections: int = 1000) -> aiohttp.ClientSession:
    """The process-wide session. Callers pass explicit timeouts per request."""
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        raise_for_status=False,
        auto_decompress=True,
    )


class SiteHttp:
    """Requests to one configured site URL, with that site's TLS policy and timeout."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        tls: TlsPolicy | None = None,
        timeout_s: float = 10.0,
        on_clock_skew: Callable[[float], None] | None = None,
    ) -> None:
        self._session = session
        self.base_url = URL(base_url.rstrip("/"))
        self._tls = tls or TlsPolicy()
        self._ssl = ssl_option(self._tls)
        self.timeout_s = timeout_s
        # The device's clock, read off its `Date` header (1 s resolution) now and then.
        self._on_clock_skew = on_clock_skew
        self._skew_measured_at = 0.0
        self._last_large_body = -math.inf  # monotonic time of this site's last large body
        # A poll asks for the same few paths every second: parsed once each.
        self._urls: dict[str, URL] = {}
        self._raw_paths: dict[str, str] = {}  # the lean path's: see _lean_target
        # LeanSite reads host and port off a copy: what yarl caches while it does (the
        # origin, a second URL, among it) would stay in the kept base URL, ~0.8 KiB a site.
        lean = lean_http_enabled()
        self._lean = LeanSite(URL(str(self.base_url)), self._tls) if lean else None

    def for_host(self, host: str) -> SiteHttp:
        """The same site's rules for a host its API handed back (a regional server, a logger).

        Contacted with the scheme of the configured URL. The host must be a plain
        `name[:port]`: anything else (a path, credentials, another scheme) is refused. A
        certificate pin belongs to the configured host only; other hosts are verified.
        """
        if not _HOST_RE.fullmatch(host):
            raise UnsafeUrl(f"refusing host {host[:100]!r} handed back by the site", sent=False)
        tls = TlsPolicy(verify=self._tls.verify, ca_file=self._tls.ca_file, pin_sha256=None)
        try:
            return SiteHttp(
                self._session,
                f"{self.base_url.scheme}://{host}",
                tls=tls,
                timeout_s=self.timeout_s,
            )
        except ValueError:  # shaped like a host, but not one ("[1000000000000000000000]")
            raise UnsafeUrl(
                f"refusing host {host[:100]!r} handed back by the site", sent=False
            ) from None

    def for_url(self, base_url: str) -> SiteHttp:
        """The same site's rules for another configured base URL (a device-access template).

        For URLs the installer configured, not ones a device handed back. Chain
        verification applies; a pin belongs to the site URL only.
        """
        tls = TlsPolicy(verify=self._tls.verify, ca_file=self._tls.ca_file, pin_sha256=None)
        return SiteHttp(self._session, base_url, tls=tls, timeout_s=self.timeout_s)

    def url(self, path_or_url: str) -> URL:
        """Resolve a path against the site URL; refuse anything on another origin.

        Paths are appended to the site's own path prefix ("/alarms" on
        "http://h:1/t/x" is "http://h:1/t/x/alarms"). An absolute or protocol-relative
        URL is accepted only when scheme, host and port are the site's own, and it carries
        no credentials. Something that does not even parse as a URL is refused the same way.
        """
        cached = self._urls.get(path_or_url)
        if cached is not None:
            return cached
        url = self._resolve(path_or_url)
        if not path_or_url.startswith(("http://", "https://", "//")):
            if len(self._urls) >= URL_CACHE_SIZE:  # paths with ids in them: keep it bounded
                self._urls.clear()
            self._urls[path_or_url] = url
        return url

    def _resolve(self, path_or_url: str) -> URL:
        """`url` without its cache."""
        try:
            if path_or_url.startswith(("http://", "https://", "//")):
                if path_or_url.startswith("//"):  # protocol-relative: take the site's scheme
                    path_or_url = f"{self.base_url.scheme}:{path_or_url}"
                candidate = URL(path_or_url)
                if candidate.origin() != self.base_url.origin():
                    raise UnsafeUrl(
                        f"refusing {candidate.origin()}: not the configured site "
                        f"{self.base_url.origin()}",
                        sent=False,
                    )
                if candidate.user is not None or candidate.password is not None:
                    raise UnsafeUrl("refusing a URL with credentials in it", sent=False)
                return candidate
            path = path_or_url if path_or_url.startswith("/") else "/" + path_or_url
            return URL(str(self.base_url) + path, encoded=False)
        except ValueError as exc:  # yarl: bad port, bad IPv6 literal...
            raise UnsafeUrl(
                f"refusing {path_or_url[:100]!r}: not a valid URL ({exc})", sent=False
            ) from None

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        json: Any = None,
        timeout_s: float | None = None,
        read_timeout_s: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request; the response is open inside the `async with` block.

        `timeout_s` bounds the whole exchange (default: the site's request timeout);
        downloads pass a longer one with `read_timeout_s` so a stalled body still fails fast.
        """
        url = self.url(path)
        total = timeout_s if timeout_s is not None else self.timeout_s
        timeout = _client_timeout(total, read_timeout_s)
        sent = time.time()
        answered = False
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                headers=headers,
                data=data,
                json=json,
                timeout=timeout,
                ssl=self._ssl,
                allow_redirects=False,
            ) as response:
                answered = True
                self._measure_clock(response.headers, sent)
                yield response
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if isinstance(exc, ValueError) and answered:
                raise  # the caller's own error, from inside its `async with` block
            raise _transport_error(exc, f"{method} {url.with_query(None)}", total) from None

    async def fetch(
        self,
        method: str,
        path: str,
        *,
        limit: int,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
    ) -> Answer:
        """One request and its whole answer, the body read within `limit` bytes (over it:
        `ResponseTooLarge`), in the site's request timeout. A GET without a body goes the
        lean path; anything else through aiohttp, with the same rules and errors."""
        if self._lean is None or method != "GET" or json is not None or data is not None:
            if self._lean is not None:
                # Rare for a site (a login, an action): not kept in aiohttp's pool, where
                # its connection would hold ~7.5 KiB and a socket per site for a minute.
                headers = {**(headers or {}), "Connection": "close"}
            async with self.request(
                method, path, params=params, headers=headers, json=json, data=data
            ) as response:
                body = await read_capped(response, limit)
                answer = Answer(response.status, response.headers, body)
        else:
            answer = await self._lean_get(self._lean, path, params, headers, limit)
        if len(answer.body) >= LARGE_BODY_BYTES:
            await self._large_body_turn()
        return answer

    async def _lean_get(
        self,
        lean: LeanSite,
        path: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        headers: Mapping[str, str] | None,
        limit: int,
    ) -> Answer:
        target = self._lean_target(path, params)
        sent = time.time()
        try:
            answer = await lean.get(target, headers, limit=limit, timeout_s=self.timeout_s)
        except TransportError as exc:  # named as aiohttp's path names them
            where = f"{URL(str(self.base_url)).origin()}{target.partition('?')[0]}"
            raise type(exc)(f"GET {where}: {exc}", sent=exc.sent) from None
        self._measure_clock(answer.headers, sent)
        return answer

    async def _large_body_turn(self) -> None:
        """A site's next large body within moments of its last one (the next page of the
        same poll) continues work in progress: it goes before sites that have not started."""
        continuing = time.monotonic() - self._last_large_body < CONTINUING_S
        await large_body_turnstile().wait_turn(finishing=continuing)
        self._last_large_body = time.monotonic()

    def _lean_target(
        self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]] | None
    ) -> str:
        """The request target (path and query, encoded) of a lean GET, as `url(path)` with
        `params` added would have it. A site's few paths are kept as strings: the URL objects
        `url` caches were ~0.6 KiB of every idle site."""
        raw_path = self._raw_paths.get(path)
        if raw_path is None:
            url = self._resolve(path)
            if url.raw_query_string or path.startswith(("http://", "https://", "//")):
                return (url.extend_query(params) if params else url).raw_path_qs
            raw_path = url.raw_path
            if len(self._raw_paths) >= URL_CACHE_SIZE:  # paths with ids in them: bounded
                self._raw_paths.clear()
            self._raw_paths[path] = raw_path
        if not params:
            return raw_path
        return URL.build(path=raw_path, query=params, encoded=True).raw_path_qs

    def close(self) -> None:
        """Close the site's kept lean connection (aiohttp's belong to the shared session)."""
        if self._lean is not None:
            self._lean.close()

    def _measure_clock(self, headers: CIMultiDictProxy[str], sent: float) -> None:
        received = time.time()
        if self._on_clock_skew is None or received - self._skew_measured_at < SKEW_EVERY_S:
            return
        header = headers.get("Date")
        try:
            server = parsedate_to_datetime(header).timestamp() if header else None
        except (TypeError, ValueError):
            server = None
        if server is not None:
            self._skew_measured_at = received
            # The header is truncated to the second: compare with the middle of our window.
            self._on_clock_skew(server + 0.5 - (sent + received) / 2)


class LargeBodyTurnstile:
    """Hands large bodies to their parsers one per event-loop turn, not all in one.

    asyncio runs every callback that is ready before it looks at sockets again. When a
    thousand sites answer full pages at once, a thousand parses (~10 ms each) are ready
    together, and the writer's database round trips wait behind all of them: in a storm,
    nothing was committed for the first 12 s. Through the turnstile a large body goes on
    only when the one before it has had its turn and the loop has looked at its sockets,
    so commits (and other sites' polls) go on between parses. The turn is given back by
    `call_soon`, i.e. on the next loop turn, after the holder's synchronous work is done.

    Work that finishes a poll (building and preparing its alarms: `heavy_turn`) goes before
    new bodies (`finishing=True`): served in arrival order, a thousand sites went through
    each step together, and the first commit waited until every site had read its pages
    (~2 s of a storm with the database idle). Finishing first, sites complete one after
    another and their commits flow from the start.
    """

    def __init__(self) -> None:
        self._held = False
        # Waiters of finishing work, then of new bodies. A cancelled waiter stays in its
        # lane until its turn comes and is skipped then (no search of a long lane).
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    @property
    def busy(self) -> bool:
        """Whether a body has this turn (the next one waits for the loop's next turn)."""
        return self._held

    @property
    def waiting(self) -> int:
        """Waiters in the lanes (cancelled ones included until their turn comes)."""
        return len(self._lanes[0]) + len(self._lanes[1])

    async def wait_turn(self, *, finishing: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if self._held:
            waiter: asyncio.Future[None] = loop.create_future()
            self._lanes[0 if finishing else 1].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed the turn: pass it on
                    self._pass_on()
                raise
        self._held = True
        loop.call_soon(self._pass_on)

    def _pass_on(self) -> None:
        """The turn to the next live waiter (it holds it from now), else to nobody."""
        for lane in self._lanes:
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._held = False


_TURNSTILES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LargeBodyTurnstile] = (
    weakref.WeakKeyDictionary()
)


async def heavy_turn(records: int) -> None:
    """Before turning `records` device records into alarms: many of them (a full page) are a
    parse's worth of work, and pass the turnstile like a large body (a storm's first pages
    were parsed one per turn, and then every site built its 300 alarms in the same few
    turns: the writer's round trips waited ~2 s behind them, nothing was committed)."""
    if records >= HEAVY_RECORDS:
        await large_body_turnstile().wait_turn(finishing=True)


def large_body_turnstile() -> LargeBodyTurnstile:
    """The running loop's turnstile (one per loop: tests run several loops in a process)."""
    loop = asyncio.get_running_loop()
    turnstile = _TURNSTILES.get(loop)
    if turnstile is None:
        turnstile = _TURNSTILES[loop] = LargeBodyTurnstile()
    return turnstile


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a small body (JSON answers) with a hard size limit against hostile devices
    (`read_capped`); a large one then waits for its turn to be parsed."""
    body = await read_capped(response, limit)
    if len(body) >= LARGE_BODY_BYTES:
        await large_body_turnstile().wait_turn()
    return body


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body within `limit` bytes: refused before reading when the device announces more,
    else as soon as `limit` is passed (a chunked or decompressed body has no trustworthy
    length): memory stays bounded."""
    where = f"{response.method} {response.url.with_query(None)}"
    if response.content_length is not None and response.content_length > limit:
        raise ResponseTooLarge(
            f"{where}: answer of {response.content_length} bytes, over the {limit}-byte cap",
            sent=True,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"{where}: answer over the {limit}-byte cap", sent=True)
        chunks.append(chunk)
    return b"".join(chunks)


URL_CACHE_SIZE = 64


def lean_http_enabled() -> bool:
    """Whether small GETs take the lean path (`CMS_INGEST_LEAN_HTTP=0`: all through aiohttp,
    e.g. to rule the lean path out when a device misbehaves)."""
    return os.environ.get("CMS_INGEST_LEAN_HTTP", "1").strip().lower() not in ("0", "false", "no")


@functools.lru_cache(maxsize=64)
def _client_timeout(total: float, read_timeout_s: float | None) -> aiohttp.ClientTimeout:
    """The request's timeouts (an immutable value: one per setting, not one per request)."""
    return aiohttp.ClientTimeout(total=total, connect=min(total, 10.0), sock_read=read_timeout_s)


def _transport_error(
    exc: aiohttp.ClientError | TimeoutError | ValueError, where: str, total: float
) -> TransportError:
    """What a failed exchange was, as the clients' own error (`where`: method and URL
    without its query, which may carry a token)."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return TlsFailure(
            f"{where}: certificate does not match the configured pin (got sha256 {exc.got.hex()})",
            sent=False,
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return TlsFailure(
            f"{where}: TLS certificate not trusted ({exc.certificate_error})", sent=False
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return TlsFailure(f"{where}: TLS failed ({exc})", sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return DeviceUnreachable(f"{where}: cannot connect ({exc.os_error})", sent=False)
    if isinstance(exc, TimeoutError):
        return DeviceTimeout(f"{where}: no answer within {total:g} s", sent=True)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return DeviceUnreachable(f"{where}: connection broke ({exc})", sent=True)
    if isinstance(exc, aiohttp.ClientError):
        return DeviceUnreachable(f"{where}: {type(exc).__name__}: {exc}", sent=True)
    # aiohttp refuses to write e.g. a header with CR/LF in it (a token a device sent).
    return UnsafeUrl(f"{where}: refusing to send a malformed request ({exc})", sent=False)
