"""The plumbing every vendor simulator shares: tenants, routing, the alarm generator, the CLI.

One server hosts many simulated sites (tenants): the ``default`` tenant answers at the root,
every other tenant under ``/t/<tenant>``, so a benchmark can run thousands of sites behind one
port. A vendor simulator module provides:

* a site class (the device's state and behaviour) with a ``requests`` counter of
  ``"METHOD /path"`` strings, ``state()`` (the ``/_sim/state`` body) and
  ``add_alarms(n, **fields)``;
* its device routes, a tuple of ``Route`` whose handlers take ``(site, request)``, and its
  control routes, built by ``control_routes(alarm_fields, faults_handler)``;
* a ``TenantSimulator[Site]`` subclass implementing ``_device_routes``, ``_control_routes``,
  ``_answer`` (what one device request goes through: offline sites, faults, authentication,
  the device's error body, extra headers) and ``start_generator`` (its own keyword arguments,
  then ``_start_generator`` with a function adding one random alarm to a site);
* ``main(argv)`` for ``python -m``: ``parse_cli_args`` with its own flags, then ``serve_cli``.

For benchmarks the command line also serves every tenant on its own listening socket
(``--port-per-site``: separate devices, one connection each, at ``/t/<tenant>`` on its own
port), dumps every site's state on SIGUSR1, adds ``--backlog`` alarms to every site on
SIGUSR2, and with ``--track-gaps`` remembers each site's pauses between device requests.

Shared by every vendor: ``start(ssl_context=...)`` serves HTTPS instead of HTTP, and
``respond()`` (or ``POST /_sim/respond``) makes a site misbehave on one path, answering what a
test scripts (a redirect, a huge or hostile body, an altered header) instead of, or on top of,
what the device would have answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import ssl
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, NamedTuple, Protocol, Self, TypeVar

from aiohttp import web

DEFAULT_TENANT = "default"
GENERATOR_TICK = 0.05


class Alarm(Protocol):
    @property
    def id(self) -> int: ...


class Site(Protocol):
    """What the shared plumbing needs of a vendor's site class."""

    requests: Counter[str]

    def state(self) -> dict[str, Any]: ...

    def add_alarms(self, n: int, **kw: Any) -> Sequence[Alarm]: ...


SiteT = TypeVar("SiteT", bound=Site)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SiteHandler = Callable[[SiteT, web.Request], Awaitable[web.StreamResponse]]
AlarmMaker = Callable[[SiteT, random.Random], object]
DeviceAnswer = Callable[[], Awaitable[web.StreamResponse]]
ScriptedAnswer = Callable[[web.Request, DeviceAnswer], Awaitable[web.StreamResponse]]
"""A scripted answer: gets the request and a function producing what the device would have
answered (to pass through, alter, or ignore), and returns the response to send."""


class Route(NamedTuple, Generic[SiteT]):
    """One route, served at the root and under ``/t/{tenant}``; ``auth`` and ``poll_faults``
    are read by the vendor's ``_answer``."""

    method: str
    path: str
    handler: SiteHandler[SiteT]
    auth: bool = True
    poll_faults: bool = False


async def _close_after_answer(_request: web.Request, response: web.StreamResponse) -> None:
    # The hook runs after aiohttp chose the headers, before it writes them: say it, then do it.
    response.headers["Connection"] = "close"
    response.force_close()


def base_url(address: Any, scheme: str = "http") -> str:
    """``http://host:port`` for a listening address (a wildcard host becomes loopback)."""
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def static_answer(
    status: int = 200, body: bytes | str = b"", headers: Mapping[str, str] | None = None
) -> ScriptedAnswer:
    """A scripted answer that is always the same response, whatever the device would say."""
    data = body.encode() if isinstance(body, str) else body

    async def answer(request: web.Request, device: DeviceAnswer) -> web.StreamResponse:
        return web.Response(status=status, body=data, headers=dict(headers or {}))

    return answer


class _Script:
    """A scripted answer and how many more requests it takes (None: all of them)."""

    __slots__ = ("answer", "remaining")

    def __init__(self, answer: ScriptedAnswer, times: int | None) -> None:
        self.answer = answer
        self.remaining = times


class TenantSimulator(ABC, Generic[SiteT]):
    """An HTTP server hosting one or many simulated sites of one vendor (tenants)."""

    control_errors: tuple[type[Exception], ...] = (ValueError, TypeError)
    """What a ``/_sim`` handler may raise to answer 400 ``{"error": ...}``."""
    close_connections = False
    """The manuals do not say how long a device keeps an HTTP connection open: by default
    it keeps it (keep-alive); set before `start`, it closes each one after its answer (with
    `Connection: close`), as some embedded servers do."""

    def __init__(self, sites: Mapping[str, SiteT]) -> None:
        self.sites: dict[str, SiteT] = dict(sites)
        self._runner: web.AppRunner | None = None
        self._base: str | None = None
        self._generator: asyncio.Task[None] | None = None
        self._scripts: dict[tuple[str, str, str], _Script] = {}

    @abstractmethod
    def _device_routes(self) -> Iterable[Route[SiteT]]:
        """The device's API."""

    @abstractmethod
    def _control_routes(self) -> Iterable[Route[SiteT]]:
        """The ``/_sim/...`` control surface (see ``control_routes`` in this module)."""

    @abstractmethod
    async def _answer(
        self, site: SiteT, route: Route[SiteT], request: web.Request
    ) -> web.StreamResponse:
        """Answer one device request (already counted in ``site.requests``)."""

    @abstractmethod
    def start_generator(self, rate_per_site: float, *, seed: int | None = None) -> None:
        """Add alarms to every site as independent Poisson processes (one task for all)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve on ``host:port`` (0 = any free port) and return the base URL.

        With ``ssl_context`` (a server context holding the certificate and key) the sites are
        served over HTTPS and the base URL is ``https://``.
        """
        runner = web.AppRunner(self._build_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        self._runner = runner
        self._base = base_url(runner.addresses[0], "https" if ssl_context else "http")
        return self._base

    async def stop(self) -> None:
        await self.stop_generator()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, tenant: str = DEFAULT_TENANT) -> str:
        if self._base is None:
            raise RuntimeError("the simulator is not started")
        return self._base if tenant == DEFAULT_TENANT else f"{self._base}/t/{tenant}"

    def site(self, tenant: str = DEFAULT_TENANT) -> SiteT:
        return self.sites[tenant]

    def add_site(self, tenant: str, site: SiteT) -> None:
        self.sites[tenant] = site

    # ---------------------------------------------------------- fault injection
    def respond(
        self,
        method: str,
        path: str,
        answer: ScriptedAnswer,
        *,
        tenant: str = DEFAULT_TENANT,
        times: int | None = 1,
    ) -> None:
        """Answer the next ``times`` device requests ``METHOD path`` of ``tenant`` with
        ``answer`` (``times=None``: every one until ``unscript``). ``path`` is the device
        path without the tenant prefix and without the query, matched exactly. The request
        is still counted in ``site.requests``; ``answer`` may call the device itself."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for every request)")
        self._scripts[(tenant, method.upper(), path)] = _Script(answer, times)

    def unscript(self, method: str, path: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Stop scripting ``METHOD path`` of ``tenant``: the device answers again."""
        self._scripts.pop((tenant, method.upper(), path), None)

    def _scripted(self, tenant: str, method: str, path: str) -> ScriptedAnswer | None:
        key = (tenant, method, path)
        script = self._scripts.get(key)
        if script is None:
            return None
        if script.remaining is not None:
            script.remaining -= 1
            if script.remaining <= 0:
                del self._scripts[key]
        return script.answer

    # ---------------------------------------------------------------- routing
    def _build_app(self) -> web.Application:
        app = web.Application()
        for route in self._device_routes():
            self._add_route(app, route, self._device_handler(route))
        for route in self._control_routes():
            self._add_route(app, route, self._control_handler(route.handler))
        respond = Route("POST", "/_sim/respond", self._sim_respond, auth=False)
        self._add_route(app, respond, self._control_handler(respond.handler))
        if self.close_connections:
            app.on_response_prepare.append(_close_after_answer)
        return app

    @staticmethod
    def _add_route(app: web.Application, route: Route[SiteT], handler: Handler) -> None:
        app.router.add_route(route.method, route.path, handler)
        app.router.add_route(route.method, "/t/{tenant}" + route.path, handler)

    def _resolve(self, request: web.Request) -> tuple[SiteT, str]:
        """The tenant's site and the request path without the tenant prefix."""
        tenant = request.match_info.get("tenant")
        site = self.sites.get(DEFAULT_TENANT if tenant is None else tenant)
        if site is None:
            raise web.HTTPNotFound(text=f"unknown tenant {tenant!r}")
        path = request.path if tenant is None else request.path[len(f"/t/{tenant}") :]
        return site, path

    def _device_handler(self, route: Route[SiteT]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            site, path = self._resolve(request)
            site.requests[f"{request.method} {path}"] += 1
            tenant = request.match_info.get("tenant", DEFAULT_TENANT)
            scripted = self._scripted(tenant, request.method, path) if self._scripts else None
            if scripted is not None:
                return await scripted(request, lambda: self._answer(site, route, request))
            return await self._answer(site, route, request)

        return handle

    async def _sim_respond(self, site: SiteT, request: web.Request) -> web.StreamResponse:
        """``POST /_sim/respond`` ``{"method", "path", "status", "body", "headers", "times"}``:
        ``respond`` with a static answer, for this tenant."""
        body = await control_body(request)
        method, path, headers = body.get("method"), body.get("path"), body.get("headers") or {}
        if not isinstance(method, str) or not isinstance(path, str):
            raise ValueError("method and path are required strings")
        if not isinstance(headers, dict):
            raise ValueError("headers must be an object")
        times = body.get("times", 1)
        self.respond(
            method,
            path,
            static_answer(
                int(body.get("status", 200)),
                str(body.get("body", "")),
                {str(key): str(value) for key, value in headers.items()},
            ),
            tenant=request.match_info.get("tenant", DEFAULT_TENANT),
            times=None if times is None else int(times),
        )
        return web.json_response({"scripted": f"{method.upper()} {path}"})

    def _control_handler(self, handler: SiteHandler[SiteT]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            site, _ = self._resolve(request)
            try:
                return await handler(site, request)
            except self.control_errors as error:
                return web.json_response({"error": str(error)}, status=400)

        return handle

    # -------------------------------------------------------------- generator
    def _start_generator(
        self, rate_per_site: float, seed: int | None, add_alarm: AlarmMaker[SiteT]
    ) -> None:
        """Run ``add_alarm(site, rng)`` at ``rate_per_site`` per site (one task for all)."""
        check_rate(rate_per_site)
        if self._generator is not None:
            raise RuntimeError("the generator is already running")
        loop = asyncio.get_running_loop()
        work = self._generate(rate_per_site, random.Random(seed), add_alarm)
        self._generator = loop.create_task(work)

    async def stop_generator(self) -> None:
        task, self._generator = self._generator, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _generate(
        self, rate: float, rng: random.Random, add_alarm: AlarmMaker[SiteT]
    ) -> None:
        """Superposed Poisson processes: the merged stream runs at ``rate * sites``
        and each arrival goes to a uniformly chosen site, so sites added later join
        without a restart."""

        def arrive() -> None:
            add_alarm(rng.choice(list(self.sites.values())), rng)

        await poisson_arrivals(lambda: rate * len(self.sites), rng, arrive)


async def poisson_arrivals(
    rate: Callable[[], float], rng: random.Random, arrive: Callable[[], None]
) -> None:
    """Call ``arrive()`` as a Poisson process at ``rate()`` per second, forever. Arrivals are
    drawn in unit-rate time, so a rate that changes (sites added) takes effect at once; a
    rate of 0 makes nothing arrive."""
    budget = rng.expovariate(1.0)
    last = time.monotonic()
    while True:
        await asyncio.sleep(GENERATOR_TICK)
        now = time.monotonic()
        budget -= (now - last) * rate()
        last = now
        while budget <= 0:
            arrive()
            budget += rng.expovariate(1.0)


def to_ms(moment: datetime) -> datetime:
    """Aware UTC, truncated to the millisecond precision devices report."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def check_rate(rate_per_site: float) -> None:
    if rate_per_site <= 0:
        raise ValueError("rate_per_site must be positive")


# ----------------------------------------------------- /_sim control surface
def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def as_datetime(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


async def control_body(request: web.Request) -> dict[str, Any]:
    """A control request's JSON object (an empty body is ``{}``)."""
    raw = await request.read()
    body = json.loads(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def control_routes(
    alarm_fields: Mapping[str, Callable[[Any], Any]], faults: SiteHandler[SiteT]
) -> tuple[Route[SiteT], ...]:
    """``POST /_sim/alarms`` (``count`` and the ``alarm_fields``, each read by its converter,
    answering the new ids), ``POST /_sim/faults`` (``faults``) and ``GET /_sim/state``."""

    async def add_alarms(site: SiteT, request: web.Request) -> web.StreamResponse:
        body = await control_body(request)
        count = int(body.pop("count", 1))
        unknown = set(body) - set(alarm_fields)
        if unknown:
            raise ValueError(f"unknown alarm fields: {sorted(unknown)}")
        kwargs = {key: alarm_fields[key](value) for key, value in body.items()}
        return web.json_response([alarm.id for alarm in site.add_alarms(count, **kwargs)])

    async def state(site: SiteT, request: web.Request) -> web.StreamResponse:
        return web.json_response(site.state())

    return (
        Route("POST", "/_sim/alarms", add_alarms, auth=False),
        Route("POST", "/_sim/faults", faults, auth=False),
        Route("GET", "/_sim/state", state, auth=False),
    )


# ------------------------------------------------------------ command line
def tenant_names(count: int) -> list[str]:
    """``default`` for a single site, else ``s0000``, ``s0001``, ..."""
    return [DEFAULT_TENANT] if count == 1 else [f"s{index:04d}" for index in range(count)]


def parse_cli_args(
    argv: Sequence[str] | None,
    *,
    description: str,
    default_port: int,
    add_arguments: Callable[[argparse.ArgumentParser], object],
) -> argparse.Namespace:
    """The common flags (``--host``, ``--port``, ``--sites``, ``--rate``, the benchmark's
    ``--port-per-site``, ``--backlog`` and ``--track-gaps``, then the vendor's from
    ``add_arguments``, then ``--seed``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="alarms per second per site")
    parser.add_argument(
        "--port-per-site",
        action="store_true",
        help="serve every site on its own listening socket, like separate devices: ports "
        "--port, --port+1, ... (--port 0: any free port each); one URL per line as always",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="on SIGUSR2, add this many alarms to every site at once (a storm)",
    )
    parser.add_argument(
        "--track-gaps",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="remember, per site, every pause longer than this between two device requests "
        "(wall clock, for the SIGUSR1 dump); 0: off",
    )
    parser.add_argument(
        "--track-request",
        default=None,
        metavar="'METHOD /path'",
        help="--track-gaps counts only this device request (e.g. 'GET /alarms'): the polls",
    )
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.sites < 1:
        parser.error("--sites must be at least 1")
    if args.backlog < 0:
        parser.error("--backlog must not be negative")
    return args


class GapTracker(Counter[str]):
    """A site's ``requests`` counter that also remembers (wall clock, comparable across
    processes) its last device request and every pause longer than ``threshold`` between
    two of them: how long a site went unpolled, seen from the device."""

    def __init__(
        self, counts: Mapping[str, int], threshold: float, only: str | None = None
    ) -> None:
        super().__init__(counts)
        self.threshold = threshold
        self.only = only  # "METHOD /path": only these requests count (None: every one)
        self.last: float | None = None
        self.gaps: list[tuple[float, float]] = []

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        if self.only is not None and key != self.only:
            return
        now = time.time()
        if self.last is not None and now - self.last > self.threshold:
            self.gaps.append((self.last, now))
        self.last = now


def dump_sites(simulator: TenantSimulator[Any]) -> str:
    """One JSON line: ``{"dump": <wall clock>, "sites": {tenant: state}}``, each state the
    ``/_sim/state`` body plus ``last`` and ``gaps`` when ``--track-gaps`` is on."""
    sites: dict[str, Any] = {}
    for tenant, site in simulator.sites.items():
        state = site.state()
        if isinstance(site.requests, GapTracker):
            state["last"] = site.requests.last
            state["gaps"] = site.requests.gaps
        sites[tenant] = state
    return json.dumps({"dump": time.time(), "sites": sites})


def add_backlog(simulator: TenantSimulator[Any], count: int) -> str:
    """Add ``count`` alarms to every site; one JSON line saying how many and when."""
    started = time.time()
    total = sum(len(site.add_alarms(count)) for site in simulator.sites.values())
    return json.dumps({"backlog": total, "at": started, "done": time.time()})


async def _serve_ports(simulator: TenantSimulator[Any], args: argparse.Namespace) -> list[str]:
    """Every tenant on its own listening socket (``--port-per-site``); their URLs."""
    first = await simulator.start(args.host, args.port)
    runner = simulator._runner
    assert runner is not None
    urls = []
    for index, tenant in enumerate(simulator.sites):
        if index == 0:
            own = first
        else:
            port = 0 if args.port == 0 else args.port + index
            site = web.TCPSite(runner, args.host, port)
            await site.start()
            server = site._server
            assert isinstance(server, asyncio.Server)
            own = base_url(server.sockets[0].getsockname())
        urls.append(simulator.url(tenant).replace(first, own, 1))
    return urls


async def serve_cli(simulator: TenantSimulator[Any], args: argparse.Namespace) -> None:
    """Serve on ``args.host:args.port`` (or one port per site), generate alarms at
    ``args.rate``, print one URL per tenant then ``READY``, and run until SIGTERM/SIGINT.

    For benchmarks: SIGUSR1 prints every site's state as one JSON line (``dump_sites``);
    SIGUSR2 adds ``--backlog`` alarms to every site at once and prints how many."""
    if args.track_gaps > 0:
        for site in simulator.sites.values():
            site.requests = GapTracker(site.requests, args.track_gaps, args.track_request)
    if args.port_per_site:
        urls = await _serve_ports(simulator, args)
    else:
        await simulator.start(args.host, args.port)
        urls = [simulator.url(tenant) for tenant in simulator.sites]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(dump_sites(simulator), flush=True))
    if args.backlog > 0:
        loop.add_signal_handler(
            signal.SIGUSR2, lambda: print(add_backlog(simulator, args.backlog), flush=True)
        )
    try:
        if args.rate > 0:
            simulator.start_generator(args.rate, seed=args.seed)
        for url in urls:
            print(url, flush=True)
        print("READY", flush=True)
        await stop.wait()
    finally:
        await simulator.stop()
