"""Fuzzing the vendor clients: the real client against its own simulator, answers mutated.

A vendor client must turn any device answer into alarms or into one of its vendor errors
(`VendorError`) or a `TransportError`; anything else escaping it is a bug that fails the
site's poll, and a call that never ends stalls it. Here the vendor's simulator runs in this
process on 127.0.0.1, with a mutating layer (an aiohttp middleware added to its apps) that
rewrites the device's answers: wrong types, missing fields, huge and non-finite numbers,
year 1 and year 9999 times, NUL and lone surrogates, deep nesting, long strings, truncated
bodies, odd statuses, and the same full page again and again (a device ignoring its paging).
The real client, built by `build_client` like in the daemon, polls with the cursor it gets,
asks for the media of the alarms it saw, downloads what is ready and fires its actions.

Counted: inputs (mutated answers served), calls, escapes (any other exception, with where it
was raised and the mutation of the answer before it; deduplicated by type and place), hangs
(a call running past HANG_S), event-loop blocks over 1 s, and the process's peak memory.
The poll results also go through `storable_commit`, the store's cleaning, which must take
whatever a client returns. `bench/fuzz.py` runs it from the command line; tests/test_fuzz.py
runs a short round per vendor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import resource
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from cms_ingest.config import ActionsConfig
from cms_ingest.db.store import PollCommit, storable_commit
from cms_ingest.domain import Action, MediaKind
from cms_ingest.metrics import Metrics
from cms_ingest.runtime.looplag import LoopLagMonitor
from cms_ingest.simulators.camstreamer import CamStreamerAccount, CamStreamerSimulator
from cms_ingest.simulators.camtrace import CamTraceSimulator, CamTraceSite
from cms_ingest.simulators.davantis import DavantisSimulator, DavantisSite
from cms_ingest.simulators.exacq import ExacqSimulator, ExacqSite
from cms_ingest.simulators.videoloft import VideoloftAccount, VideoloftSimulator
from cms_ingest.sitehttp import SiteHttp, TransportError, new_client_session
from cms_ingest.vendors import build_client
from cms_ingest.vendors.base import PollResult, VendorClient, VendorContext, VendorError
from cms_ingest.vendors.common import download_size

# The vendors the harness has a simulator and a fuzz setup for.
FUZZED_VENDORS = ("davantis", "camtrace", "videoloft", "exacq", "camstreamer")
HANG_S = 8.0  # a call this long against a device on loopback is stuck, not slow
REQUEST_TIMEOUT_S = 2.0
ROUNDS_PER_DEVICE = 300  # then a fresh simulator and client (bounded state, new logins)
MAX_DOWNLOAD_BYTES = 1 << 20
CONCURRENCY = 8  # devices and clients fuzzed side by side in one run
PASS_THROUGH = 0.10  # share of answers left as the device gave them, so clients get further
_RAW = "@@fuzz-raw:"  # a string marking a JSON token json.dumps cannot write (1e999)
_LOCATION_ROOT = str(Path(__file__).resolve().parents[1])

# ---------------------------------------------------------------------- mutations


def _raw(token: str) -> str:
    return f"{_RAW}{token}@@"


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    2**64 + 1,
    -(2**63) - 1,
    10**30,
    1.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    " ",
    "0",
    "-1",
    "1e5",
    "null",
    "true",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "A" * 20_000,
    "é" * 3_000,
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-13-45T99:99:99",
    "01/02/2026 10:00:00",
    -62135596800000,
    253402300799999,
    -62135596800,
    253402300799,
    [],
    {},
    [None],
    {"": None},
    _raw("1e999"),
    _raw("-1e999"),
    _raw("1" * 400),
    _raw("1e-400"),
    _nested(60),
    _nested(200),
    _raw("[" * 3000 + "]" * 3000),
    "../../etc/passwd",
    "http://127.0.0.2:1/x",
    "//127.0.0.2/x",
)
ODD_STATUSES = (200, 201, 204, 301, 400, 401, 403, 404, 409, 429, 500, 502, 503)


def mutate_document(document: Any, rng: random.Random) -> tuple[Any, str]:
    """1 to 3 mutations of a parsed JSON document, and what they were."""
    notes = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        document, note = _mutate_once(document, rng)
        notes.append(note)
    return document, "; ".join(notes)


def _mutate_once(document: Any, rng: random.Random) -> tuple[Any, str]:
    path, parent, key, value = _random_node(document, rng)
    where = "$" + "".join(f"[{step!r}]" for step in path)
    roll = rng.random()
    if parent is None or roll < 0.05:
        new = rng.choice(HOSTILE_VALUES)
        return new, f"$ = {_show(new)}"
    if roll < 0.60:
        new = rng.choice(HOSTILE_VALUES)
    elif roll < 0.72 and isinstance(parent, dict):
        del parent[key]
        return document, f"del {where}"
    elif roll < 0.77 and isinstance(value, dict):
        new = list(value.values())
    elif roll < 0.82 and isinstance(value, list):
        new = {str(index): item for index, item in enumerate(value)}
    elif roll < 0.87 and isinstance(value, list) and value:
        new = value * rng.randint(2, 50)
    elif roll < 0.95:
        _, _, _, new = _random_node(document, rng)  # another node's value: type confusion
    elif isinstance(parent, dict):
        parent[f"{key}x"] = parent.pop(key)
        return document, f"rename {where}"
    else:
        new = rng.choice(HOSTILE_VALUES)
    parent[key] = new
    return document, f"{where} = {_show(new)}"


def _random_node(document: Any, rng: random.Random) -> tuple[list[Any], Any, Any, Any]:
    """A random node: (path, parent, key in parent, value); descends O(depth), stopping on
    the way now and then so containers get mutated as wholes too."""
    path: list[Any] = []
    parent: Any = None
    key: Any = None
    value = document
    while isinstance(value, dict | list) and value and (parent is None or rng.random() > 0.25):
        key = rng.choice(list(value)) if isinstance(value, dict) else rng.randrange(len(value))
        parent, value = value, value[key]
        path.append(key)
    return path, parent, key, value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


def dump_document(document: Any, rng: random.Random) -> bytes:
    """JSON text as a device might send it: NaN and Infinity as written by lax encoders,
    lone surrogates sometimes as escapes and sometimes as (invalid) raw UTF-8."""
    try:
        text = json.dumps(document, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    except (ValueError, RecursionError):
        text = '{"unserializable": true}'
    while _RAW in text:
        start = text.index(f'"{_RAW}')
        end = text.index('@@"', start + len(_RAW) + 1)
        text = text[:start] + text[start + len(_RAW) + 1 : end] + text[end + 3 :]
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------- the mutating layer


class Mutator:
    """The aiohttp middleware that rewrites a simulator's device answers (never `/_sim`)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.inputs = 0
        self.recent: deque[str] = deque(maxlen=3)  # the mutations served during this call
        self._pages: dict[str, tuple[int, bytes, dict[str, str]]] = {}

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if "/_sim" in request.path or self._rng.random() < PASS_THROUGH:
            return response
        if type(response) is not web.Response or response.prepared:
            return response  # streamed (a download, a long-poll): already on its way
        body = response.body
        if not isinstance(body, bytes):
            return response
        where = f"{request.method} {request.path}"
        headers = {
            name: value
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        }
        status, body, note = self._mutate(where, response.status, body, headers)
        self.inputs += 1
        self.recent.append(f"{where} -> {status}: {note}")
        return web.Response(status=status, body=body, headers=headers)

    def _mutate(
        self, where: str, status: int, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        rng = self._rng
        roll = rng.random()
        if roll < 0.05 and where in self._pages:
            old_status, old_body, _ = self._pages[where]
            return old_status, old_body, "the same full answer again (paging ignored)"
        if 200 <= status < 300:
            self._pages[where] = (status, body, headers)
        if roll < 0.12:
            cut = rng.randrange(len(body)) if body else 0
            return status, body[:cut], f"body cut after {cut} of {len(body)} bytes"
        if roll < 0.18:
            new_status = rng.choice(ODD_STATUSES)
            return new_status, body, f"status {status} -> {new_status}"
        if roll < 0.21:
            return status, rng.choice((b"", b"\x00\xff\xfe", b"<html>oops</html>")), "not JSON"
        try:
            document = json.loads(body)
        except ValueError:
            return status, _mutate_bytes(body, rng), "bytes changed"
        document, note = mutate_document(document, rng)
        return status, dump_document(document, rng), note


def _mutate_bytes(body: bytes, rng: random.Random) -> bytes:
    if not body:
        return b"\x00"
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice(b'\x00\xff0{}[]"<>9-')
    return bytes(data)


def _add_middleware(app: web.Application, mutator: Mutator) -> web.Application:
    app.middlewares.append(mutator.middleware)
    return app


# ---------------------------------------------------------------------- devices


@dataclass
class Device:
    """A running simulator, as the fuzz loop needs it."""

    url: str
    credentials: dict[str, str]
    options: dict[str, Any]
    actions: list[tuple[str, str, dict[str, Any]]]
    add_alarm: Callable[[random.Random], None]
    stop: Callable[[], Awaitable[None]]


async def start_device(vendor: str, mutator: Mutator) -> Device:
    """The vendor's simulator on 127.0.0.1, its apps behind `mutator`, the way its tests
    start it; fuzz-only settings are the client's own options (CamStreamer's query rate)."""
    starters = {
        "davantis": _davantis,
        "camtrace": _camtrace,
        "videoloft": _videoloft,
        "exacq": _exacq,
        "camstreamer": _camstreamer,
    }
    return await starters[vendor](mutator)


def _mutating_tenants(simulator: Any, mutator: Mutator) -> None:
    # The shared TenantSimulator builds its app in `_build_app`; the middleware goes in first.
    build = simulator._build_app
    simulator._build_app = lambda: _add_middleware(build(), mutator)


async def _davantis(mutator: Mutator) -> Device:
    site = DavantisSite(media_delay=0, max_alarms=500)
    simulator = DavantisSimulator({"default": site})
    _mutating_tenants(simulator, mutator)
    url = await simulator.start()
    return Device(
        url=url,
        credentials={"username": "cms", "password": "secret"},
        options={},
        actions=[
            ("relay", "1", {"state": True}),
            ("arm", "1", {}),
            ("disarm", "2", {}),
        ],
        add_alarm=lambda rng: _quietly(site.add_alarms, 1),
        stop=simulator.stop,
    )


async def _camtrace(mutator: Mutator) -> Device:
    site = CamTraceSite(media_delay=0, max_alarms=500)
    simulator = CamTraceSimulator({"default": site})
    _mutating_tenants(simulator, mutator)
    url = await simulator.start()
    return Device(
        url=url,
        credentials={"username": "cms", "password": "secret"},
        options={},
        actions=[
            ("alarm_trigger", "1", {}),
            ("alarm_ack", "1", {}),
            ("command", "1", {}),
            ("scenario", "1", {}),
        ],
        add_alarm=lambda rng: _quietly(site.add_alarms, 1),
        stop=simulator.stop,
    )


async def _videoloft(mutator: Mutator) -> Device:
    account = VideoloftAccount()
    simulator = VideoloftSimulator(account)
    serve = simulator._serve

    async def serve_mutated(app: web.Application, host: str, port: int) -> str:
        return await serve(_add_middleware(app, mutator), host, port)

    simulator._serve = serve_mutated  # type: ignore[method-assign]
    url = await simulator.start()
    uidd = next(iter(account.devices))
    return Device(
        url=url,
        credentials={"username": "cms@example.com", "password": "secret"},
        options={},
        actions=[
            ("record", uidd, {"duration_s": 0.05}),
            ("snapshot_request", uidd, {}),
        ],
        add_alarm=lambda rng: _quietly(account.add_alarms, 1),
        stop=simulator.stop,
    )


async def _exacq(mutator: Mutator) -> Device:
    site = ExacqSite()
    simulator = ExacqSimulator({"default": site})
    _mutating_tenants(simulator, mutator)
    url = await simulator.start()
    return Device(
        url=url,
        credentials={"username": "cms", "password": "secret"},
        options={},
        actions=[("soft_trigger", "3", {"duration_s": 0.001})],
        add_alarm=lambda rng: _quietly(site.add_alarms, 1),
        stop=simulator.stop,
    )


async def _camstreamer(mutator: Mutator) -> Device:
    # The account's own limits (1 query/s, 10,000 a day) lifted for fuzzing, in step with the
    # client's options below; the simulator's defaults stay the manual's.
    account = CamStreamerAccount(rate_per_s=1_000_000.0, daily_limit=1_000_000_000)
    simulator = CamStreamerSimulator({"default": account})
    _mutating_tenants(simulator, mutator)
    url = await simulator.start()
    serials = list(account.cameras)

    def add_alarm(rng: random.Random) -> None:
        serial = rng.choice(serials)
        if account.camera(serial).is_connected:
            account.disconnect(serial)
        else:
            account.connect(serial)

    return Device(
        url=url,
        credentials={"token": "api-token"},
        options={
            "device_url_template": simulator.device_url_template(),
            "device_access_token": "device-token",
            "offline_grace_s": 0,
            # Fuzzing only: the account's 1 query/s spacing and daily plan would make this a
            # test of patience. Production keeps the defaults (1/s, 10,000 a day).
            "rate_per_s": 1_000_000.0,
            "daily_limit": 1_000_000_000,
            # A failed "off" is retried for 45 s in production; half a second still runs the
            # retry loop against mutated answers without idling a device for most of a run.
            "output_off_retry_s": 0.5,
        },
        actions=[("output", serials[0], {"duration_s": 0.001})],
        add_alarm=add_alarm,
        stop=simulator.stop,
    )


def _quietly(add: Callable[[int], object], n: int) -> None:
    with contextlib.suppress(Exception):  # a full simulated device refusing more is fine
        add(n)


# ---------------------------------------------------------------------- findings and figures


@dataclass
class Finding:
    """One escape or hang, by exception type and the place it was raised (or stuck)."""

    kind: str  # "escape" or "hang"
    call: str  # poll, media_status, download, perform, storable_commit, background task
    error: str
    location: str
    answers: list[str]  # the mutated answers served during the call, last last
    count: int = 1


@dataclass
class FuzzReport:
    vendor: str
    seconds: float = 0.0
    inputs: int = 0
    calls: int = 0
    vendor_errors: int = 0  # VendorError / TransportError: the contract kept
    bad_input_reports: int = 0
    escapes: int = 0
    hangs: int = 0
    loop_blocks: int = 0
    peak_rss_mb: float = 0.0
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def record(self, finding: Finding) -> None:
        if finding.kind == "escape":
            self.escapes += 1
        else:
            self.hangs += 1
        key = (finding.kind, finding.error.split(":", 1)[0], finding.location)
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = finding

    def summary(self) -> str:
        return (
            f"{self.vendor}: {self.inputs} inputs in {self.seconds:.1f} s "
            f"({self.inputs_per_s:.0f}/s), {self.calls} calls, {self.vendor_errors} vendor "
            f"errors, {self.bad_input_reports} bad-input reports, {self.escapes} escapes "
            f"({len([k for k in self.findings if k[0] == 'escape'])} distinct), "
            f"{self.hangs} hangs, {self.loop_blocks} event-loop blocks > 1 s, "
            f"peak RSS {self.peak_rss_mb:.0f} MB"
        )

    def details(self) -> list[str]:
        lines = []
        for finding in self.findings.values():
            lines.append(
                f"  {finding.kind} x{finding.count} in {finding.call}: {finding.error[:200]}"
                f"\n    at {finding.location}"
            )
            lines.extend(f"    answer: {answer[:300]}" for answer in finding.answers)
        return lines


class CountingProblems:
    """The vendor's `SiteReporter`: counts bad input and resets, logs and exports nothing (a
    fuzz run reports thousands)."""

    def __init__(self) -> None:
        self.reports = 0

    def bad_input(self, what: str, detail: str) -> None:
        self.reports += 1

    def clock_skew(self, seconds: float) -> None:
        pass

    def device_reset(self, detail: str) -> None:
        self.reports += 1

    def device_health(self, component: str, healthy: bool) -> None:
        pass

    def api_budget(self, remaining: float) -> None:
        pass


def _where(exc: BaseException) -> str:
    """The innermost frame of ours the exception passed through (file:line function)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if frame.filename.startswith(_LOCATION_ROOT)]
    chosen = ours or list(frames)
    if not chosen:
        return "?"
    frame = chosen[-1]
    return f"{_short(frame.filename)}:{frame.lineno} {frame.name}"


def _short(filename: str) -> str:
    if _LOCATION_ROOT not in filename:
        return filename
    return filename[len(_LOCATION_ROOT) - len("cms_ingest") :]


def _stack_of(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=50)
    ours = [f for f in frames if f.f_code.co_filename.startswith(_LOCATION_ROOT)]
    if not ours:
        return "?"
    frame = ours[-1]
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


# ---------------------------------------------------------------------- the fuzz loop


class FuzzRun:
    """One device and its client, round after round; several run side by side (a client
    told to back off for seconds by a mutated 429 must not idle the whole run)."""

    def __init__(self, report: FuzzReport, deadline: float, seed: int) -> None:
        self.vendor = report.vendor
        self.rng = random.Random(seed)
        self.mutator = Mutator(random.Random(seed + 1))
        self.report = report
        self.deadline = deadline
        self.problems = CountingProblems()
        self.cursor: Any = None
        self.media: deque[tuple[MediaKind, Any]] = deque(maxlen=20)
        self.action_ids = 0
        self.hang_s = HANG_S

    async def guarded(
        self, call: str, work: Coroutine[Any, Any, Any], hang_s: float | None = None
    ) -> Any:
        """Run one client call; its outcome counted, None unless it returned normally."""
        self.report.calls += 1
        self.mutator.recent.clear()
        task = asyncio.ensure_future(work)
        hang_s = self.hang_s if hang_s is None else hang_s
        done, _ = await asyncio.wait({task}, timeout=hang_s)
        if not done:
            where = _stack_of(task)
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
            error = f"no end within {hang_s:g} s"
            self.report.record(Finding("hang", call, error, where, list(self.mutator.recent)))
            return None
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, VendorError | TransportError):
            self.report.vendor_errors += 1
            return None
        self.report.record(
            Finding(
                "escape",
                call,
                f"{type(exc).__name__}: {exc}"[:500],
                _where(exc),
                list(self.mutator.recent),
            )
        )
        return None

    async def until_deadline(self, session: aiohttp.ClientSession) -> None:
        while time.monotonic() < self.deadline:
            await self.device_rounds(session)

    async def device_rounds(self, session: aiohttp.ClientSession) -> None:
        device = await start_device(self.vendor, self.mutator)
        context = VendorContext(
            site_id="fuzz",
            http=SiteHttp(session, device.url, timeout_s=REQUEST_TIMEOUT_S),
            problems=self.problems,
            username=device.credentials.get("username", ""),
            password=device.credentials.get("password", ""),
            token=device.credentials.get("token", ""),
        )
        client = build_client(self.vendor, context, device.options)
        self.cursor = None
        self.media.clear()
        try:
            for _ in range(ROUNDS_PER_DEVICE):
                if time.monotonic() >= self.deadline:
                    break
                await self.one_round(client, device)
        finally:
            await self.guarded("close", client.close())
            await device.stop()

    async def one_round(self, client: VendorClient, device: Device) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            device.add_alarm(rng)
        result = await self.guarded("poll", client.poll(self.cursor))
        if isinstance(result, PollResult):
            self.check_storable(result)
            self.cursor = result.cursor
            for alarm in result.alarms:
                for media in alarm.media:
                    self.media.append((media.kind, media.locator))
        if rng.random() < 0.01:
            self.cursor = None  # a first start again
        if self.media and rng.random() < 0.5:
            kind, locator = rng.choice(self.media)
            probe = await self.guarded("media_status", client.media_status(kind, locator))
            if probe is not None and probe.state == "ready" and probe.path:
                await self.guarded(
                    "download", download_size(client, probe.path, MAX_DOWNLOAD_BYTES)
                )
        if device.actions and rng.random() < 0.1:
            action_kind, target, params = rng.choice(device.actions)
            self.action_ids += 1
            action = Action(self.action_ids, "fuzz", action_kind, target, params, 1, None)
            # An action may rightly run for long (a hold, an "off" retried, a capture awaited):
            # it hangs only past the deadline the action worker gives it.
            limit = ActionsConfig().attempt_deadline(params)
            await self.guarded("perform", client.perform(action), hang_s=limit)

    def check_storable(self, result: PollResult) -> None:
        commit = PollCommit("fuzz", self.vendor, result.alarms, result.cursor)
        try:
            storable_commit(commit)
        except Exception as exc:
            self.report.record(
                Finding(
                    "escape",
                    "storable_commit",
                    f"{type(exc).__name__}: {exc}"[:500],
                    _where(exc),
                    list(self.mutator.recent),
                )
            )

    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, VendorError | TransportError | asyncio.CancelledError):
            return
        if isinstance(exc, BaseException):
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.report.record(Finding("escape", "background task", error, _where(exc), []))


async def fuzz_vendor(
    vendor: str, seconds: float, *, seed: int = 0, concurrency: int = CONCURRENCY
) -> FuzzReport:
    """Fuzz one vendor's client for `seconds`, `concurrency` devices and clients side by
    side; the figures and findings."""
    if vendor not in FUZZED_VENDORS:
        raise ValueError(f"unknown vendor {vendor!r} (one of {', '.join(FUZZED_VENDORS)})")
    report = FuzzReport(vendor)
    started = time.monotonic()
    runs = [
        FuzzRun(report, started + seconds, seed * 1000 + 2 * index) for index in range(concurrency)
    ]
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(runs[0].on_loop_exception)
    metrics = Metrics()  # the run's own: only its loop blocks are counted
    stop = asyncio.Event()
    lag = asyncio.create_task(LoopLagMonitor(metrics=metrics).run(stop), name="fuzz-loop-lag")
    try:
        async with _quiet_logs(), _session() as session:
            await asyncio.gather(*(run.until_deadline(session) for run in runs))
    finally:
        stop.set()
        await lag
        loop.set_exception_handler(previous_handler)
    report.seconds = time.monotonic() - started
    report.inputs = sum(run.mutator.inputs for run in runs)
    report.bad_input_reports = sum(run.problems.reports for run in runs)
    report.loop_blocks = int(metrics.sample("cms_ingest_event_loop_blocked_total"))
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


@contextlib.asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    session = new_client_session(connections=100)
    try:
        yield session
    finally:
        await session.close()


@contextlib.asynccontextmanager
async def _quiet_logs() -> AsyncIterator[None]:
    """The clients' own log lines and the simulators' servers' complaints about what the
    clients sent back (thousands of them: a 20,000-character session id in a URL) dropped for
    the run; findings are counted, not logged."""
    saved = structlog.get_config()
    server_log = logging.getLogger("aiohttp.server")
    saved_level = server_log.level
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    server_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        structlog.configure(**saved)
        server_log.setLevel(saved_level)
