"""Per-site runtime state: the vendor client, bad-input reporting and health.

One `SiteRuntime` per configured site holds the site's vendor client, shared by its poller,
the media fetcher and the action worker, so a site has one login and one token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from cms_ingest.config import AppConfig, SiteConfig
from cms_ingest.domain import SiteHealth
from cms_ingest.logs import redact_text
from cms_ingest.metrics import Metrics, PollSeries
from cms_ingest.runtime.tasks import Flag, TaskSupervisor, in_slices
from cms_ingest.runtime.vendortasks import SupervisedTasks
from cms_ingest.sitehttp import SiteHttp, TlsPolicy
from cms_ingest.vendors.base import SiteOptions, VendorClient, VendorContext
from cms_ingest.vendors.registry import vendor_entry
from cms_ingest.vendors.tasks import LocalTasks

log = structlog.get_logger("cms_ingest.sites")


SKEW_WARN_S = 30.0  # occurred_at stays the device's time; an operator should know it is off


class SiteProblems:
    """`SiteReporter` for one site: each kind of bad input logged once, always counted;
    the device's clock skew kept, exported, and warned about once past 30 s; the device's
    own health and the account's API budget exported."""

    def __init__(self, site_id: str, vendor: str, *, metrics: Metrics | None = None) -> None:
        self.site_id = site_id
        self.vendor = vendor
        self._metrics = metrics if metrics is not None else Metrics()
        self._seen: set[str] = set()
        self.skew_s: float | None = None
        self._skew_warned = False
        self._budget_gauge: Any = None  # looked up once: a budgeted vendor reports per query

    @property
    def kinds_seen(self) -> list[str]:
        """Every kind of bad input reported for this site since the client started."""
        return sorted(self._seen)

    def clock_skew(self, seconds: float) -> None:
        self.skew_s = seconds
        self._metrics.clock_skew.labels(site_id=self.site_id, vendor=self.vendor).set(seconds)
        if abs(seconds) > SKEW_WARN_S and not self._skew_warned:
            self._skew_warned = True
            log.warning(
                "device_clock_skew",
                site_id=self.site_id,
                vendor=self.vendor,
                skew_s=round(seconds, 1),
                note="occurred_at stays the device's time; fix the device's NTP",
            )

    def device_reset(self, detail: str) -> None:
        self._metrics.device_resets.labels(vendor=self.vendor).inc()
        log.warning(
            "device_reset_detected",
            site_id=self.site_id,
            vendor=self.vendor,
            detail=redact_text(detail),
            note="alarm ids started again; new alarms are kept under a new device life",
        )

    def device_health(self, component: str, healthy: bool) -> None:
        self._metrics.device_health.labels(
            site_id=self.site_id, vendor=self.vendor, component=component
        ).set(1 if healthy else 0)

    def api_budget(self, remaining: float) -> None:
        if self._budget_gauge is None:
            self._budget_gauge = self._metrics.api_budget_remaining.labels(
                site_id=self.site_id, vendor=self.vendor
            )
        self._budget_gauge.set(remaining)

    def bad_input(self, what: str, detail: str) -> None:
        self._metrics.bad_input.labels(source=f"device:{self.vendor}", what=what).inc()
        if what not in self._seen:
            self._seen.add(what)
            log.warning(
                "bad_device_input",
                site_id=self.site_id,
                vendor=self.vendor,
                what=what,
                detail=redact_text(detail),
                note="logged once per site; further occurrences are only counted",
            )


@dataclass(slots=True)
class SiteHealthState:
    """A site's poll health. Logs on the transitions only: failing, and recovered."""

    site_id: str
    vendor: str
    up: bool | None = None
    consecutive_failures: int = 0
    last_poll_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    failing_since: float | None = None
    dirty: bool = field(default=False)
    # Set after the first poll, good or bad: the site's cursor now exists (when it was good).
    polled: asyncio.Event = field(default_factory=Flag)
    # This site's poll figures, read when /metrics is scraped.
    _series: PollSeries = field(init=False, repr=False)
    # The daemon's metrics the gauges are exported to (a private one when None).
    metrics: InitVar[Metrics | None] = field(default=None, kw_only=True)

    def __post_init__(self, metrics: Metrics | None) -> None:
        metrics = metrics if metrics is not None else Metrics()
        self._series = metrics.poll_series(self.site_id, self.vendor)

    def success(self) -> None:
        now = datetime.now(UTC)
        if self.up is False and self.failing_since is not None:
            log.info(
                "site_recovered",
                site_id=self.site_id,
                vendor=self.vendor,
                failed_polls=self.consecutive_failures,
                down_for_s=round(time.monotonic() - self.failing_since, 1),
            )
        self.dirty = self.dirty or self.up is not True or self._stale_success(now)
        self.up = True
        self.consecutive_failures = 0
        self.failing_since = None
        self.last_error = None
        self.last_poll_at = self.last_success_at = now
        self._export()
        self.polled.set()

    def failure(self, error: str) -> None:
        now = datetime.now(UTC)
        error = redact_text(error)  # the store cleans and cuts it where it is written
        if self.up is not False:
            self.failing_since = time.monotonic()
            log.warning("site_failing", site_id=self.site_id, vendor=self.vendor, error=error)
        elif error != self.last_error:
            log.debug("site_still_failing", site_id=self.site_id, error=error)
        self.up = False
        self.consecutive_failures += 1
        self.last_error = error
        self.last_poll_at = now
        self.dirty = True
        self._export()
        self.polled.set()

    def _stale_success(self, now: datetime) -> bool:
        # Persist a healthy site's last success every 30 s, not on every poll.
        return self.last_success_at is None or (now - self.last_success_at).total_seconds() > 30

    def _export(self) -> None:
        series = self._series
        series.up = self.up
        series.consecutive_failures = self.consecutive_failures
        if self.last_success_at is not None:
            series.last_success = self.last_success_at.timestamp()

    def snapshot(self) -> SiteHealth | None:
        if not self.dirty or self.last_poll_at is None:
            return None
        self.dirty = False
        return SiteHealth(
            site_id=self.site_id,
            vendor=self.vendor,
            last_poll_at=self.last_poll_at,
            last_success_at=self.last_success_at,
            consecutive_failures=self.consecutive_failures,
            last_error=self.last_error,
        )


@dataclass(slots=True)
class SiteRuntime:
    config: SiteConfig
    options: SiteOptions  # the site's `options`, validated by its vendor's model
    client: VendorClient
    health: SiteHealthState
    problems: SiteProblems
    tasks: SupervisedTasks | LocalTasks  # the client's background tasks


# Sites nearly all share their options (most have none): one validated model per distinct
# `options` mapping, not one per site (~0.9 KB each). The models are frozen, so sharing is
# safe; the cache is bounded for configs where every site's options differ.
_SHARED_OPTIONS: dict[tuple[type[SiteOptions], str], SiteOptions] = {}
SHARED_OPTIONS_MAX = 1024


def shared_options(model: type[SiteOptions], raw: Mapping[str, Any]) -> SiteOptions:
    """A site's `options` validated by its vendor's `model`, shared with equal ones."""
    try:
        key = (model, json.dumps(raw, sort_keys=True))
    except (TypeError, ValueError):  # not plain data: validated on its own
        return model.model_validate(raw)
    options = _SHARED_OPTIONS.get(key)
    if options is None:
        options = model.model_validate(raw)
        if len(_SHARED_OPTIONS) >= SHARED_OPTIONS_MAX:
            _SHARED_OPTIONS.clear()
        _SHARED_OPTIONS[key] = options
    return options


def tls_policy(site: SiteConfig) -> TlsPolicy:
    return TlsPolicy(
        verify=site.tls.verify, ca_file=site.tls.ca_file, pin_sha256=site.tls.pin_sha256
    )


def build_site(
    site: SiteConfig,
    session: aiohttp.ClientSession,
    media_root: Path | None = None,
    supervisor: TaskSupervisor | None = None,
    *,
    metrics: Metrics | None = None,
) -> SiteRuntime:
    """The site's client and state. With the daemon's `supervisor`, the client's background
    tasks run on it; without (the probe, tests), as plain tasks closed with the client. The
    site's problems and health count on `metrics` (the daemon's; a private one when None)."""
    metrics = metrics if metrics is not None else Metrics()
    problems = SiteProblems(site.id, site.vendor, metrics=metrics)
    tasks = SupervisedTasks(supervisor, site.id) if supervisor is not None else LocalTasks()
    http = SiteHttp(
        session,
        site.url,
        tls=tls_policy(site),
        timeout_s=site.request_timeout_s,
        on_clock_skew=problems.clock_skew,
    )
    context = VendorContext(
        site_id=site.id,
        http=http,
        problems=problems,
        username=site.username or "",
        password=site.password.get_secret_value() if site.password else "",
        token=site.token.get_secret_value() if site.token else "",
        media_root=media_root,
        tasks=tasks,
    )
    vendor = vendor_entry(site.vendor)
    options = shared_options(vendor.options, site.options)  # once: the client and we read it
    return SiteRuntime(
        config=site,
        options=options,
        client=vendor.client(context, options),
        health=SiteHealthState(site.id, site.vendor, metrics=metrics),
        problems=problems,
        tasks=tasks,
    )


class SiteRegistry:
    """The configured sites by id, each with its client (shared by its poller, the media
    fetcher and the action worker). Which of them this daemon holds is the `PollerSet`'s."""

    def __init__(
        self,
        config: AppConfig,
        session: aiohttp.ClientSession,
        supervisor: TaskSupervisor | None = None,
        *,
        metrics: Metrics | None = None,
        build_sites: bool = True,
    ) -> None:
        """`build_sites=False`: empty, for `built_in_slices` to fill."""
        self._session = session
        self._supervisor = supervisor  # runs the clients' background tasks
        self._metrics = metrics if metrics is not None else Metrics()
        self._media_root = config.data_dir / "media"
        self._sites: dict[str, SiteRuntime] = {}
        self._used: set[str] = set()  # sites whose client a poller has used
        # Clients replaced while an action or download may still run on them: closed later.
        self._retired: list[tuple[float, VendorClient]] = []
        if build_sites:
            for site in config.sites:
                self.add(site)

    @classmethod
    async def built_in_slices(
        cls,
        config: AppConfig,
        session: aiohttp.ClientSession,
        supervisor: TaskSupervisor | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> SiteRegistry:
        """The registry, its clients built a slice at a time while the event loop turns
        (10,000 sites take about a second: the daemon's HTTP server and lease keeper
        must not wait that long)."""
        registry = cls(config, session, supervisor, metrics=metrics, build_sites=False)
        async for part in in_slices(config.sites):
            for site in part:
                registry.add(site)
        return registry

    def get(self, site_id: str) -> SiteRuntime | None:
        return self._sites.get(site_id)

    def __iter__(self) -> Iterator[SiteRuntime]:
        return iter(list(self._sites.values()))

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def by_id(self) -> Mapping[str, SiteRuntime]:
        return self._sites

    def add(self, site: SiteConfig) -> None:
        self._sites[site.id] = self._build(site)
        self._used.discard(site.id)
        self._metrics.sites.labels(vendor=site.vendor).inc()

    async def remove(self, site_id: str) -> None:
        runtime = self._sites.pop(site_id, None)
        if runtime is not None:
            self._metrics.sites.labels(vendor=runtime.config.vendor).dec()
            self._metrics.forget_site(site_id)
            await runtime.client.close()

    async def replace(self, site: SiteConfig) -> None:
        """A changed site: a new client (new credentials, URL, options) from the new config."""
        await self.remove(site.id)
        self.add(site)

    def client_for_tenure(self, site_id: str) -> SiteRuntime:
        """The site's runtime for a poller starting now. A client a previous tenure used is
        replaced: its session, live streams and in-memory state belong to a cursor that may
        have moved on elsewhere; the new one starts from the stored cursor like a restart."""
        runtime = self._sites[site_id]
        if site_id in self._used:
            runtime.tasks.retire()  # its live streams end now; actions may still run on it
            self._retired.append((time.monotonic(), runtime.client))
            fresh = self._build(runtime.config)
            fresh.health.polled = runtime.health.polled  # "was polled once, ever" carries over
            self._sites[site_id] = runtime = fresh
        self._used.add(site_id)
        return runtime

    def _build(self, site: SiteConfig) -> SiteRuntime:
        return build_site(
            site, self._session, self._media_root, self._supervisor, metrics=self._metrics
        )

    async def close_retired(self, older_than_s: float) -> None:
        """Close replaced clients once nothing can still run on them (actions time out)."""
        now = time.monotonic()
        due = [client for since, client in self._retired if now - since >= older_than_s]
        self._retired = [(since, c) for since, c in self._retired if now - since < older_than_s]
        for client in due:
            try:
                await client.close()
            except Exception as exc:  # a logout that fails costs the device a session, no more
                log.info("retired_client_close_failed", error=str(exc))

    async def close(self) -> None:
        await self.close_retired(0)
        for site in self._sites.values():
            await site.client.close()
