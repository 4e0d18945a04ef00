"""Prometheus metrics: every name the operator contract promises, prefixed `cms_ingest_`.

Per-site labels only where an operator needs the site (up/down, polls by outcome);
histograms carry the vendor only, so two thousand sites do not mean two thousand series each.

`Metrics` is built once per daemon, on a registry of its own, and handed to every part that
counts; its `/metrics` endpoint serves that registry. Nothing here is module-level state: two
daemons in one process (as tests run them) keep separate figures, and a gauge read through a
function reads the daemon it belongs to. A part built without one (a tool, a test) makes a
private `Metrics()` of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class Metrics:
    """One daemon's collectors, on its own `registry`."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # A site's poll figures: plain attributes its poller and health write, read only
        # when /metrics is scraped (no labelled child, lock or lookup per poll per site).
        self._poll_series: dict[str, PollSeries] = {}
        registry.register(_PollSeriesCollector(self._poll_series))
        self.poll_duration = Histogram(
            "cms_ingest_poll_duration_seconds",
            "Time of one poll request cycle (including paging), by vendor.",
            ["vendor"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.alarms = Counter(
            "cms_ingest_alarms_ingested_total",
            "Alarms committed to the alarms table, by vendor and event type.",
            ["vendor", "event_type"],
            registry=registry,
        )
        self.ingest_latency = Histogram(
            "cms_ingest_alarm_ingest_latency_seconds",
            "From the alarm's occurred_at (device clock) to its commit.",
            ["vendor"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )
        self.bad_input = Counter(
            "cms_ingest_bad_input_total",
            "Unreadable input from a device, a config file or an action row, by source and kind.",
            ["source", "what"],
            registry=registry,
        )
        self.auth = Counter(
            "cms_ingest_auth_total",
            "Logins and token refreshes towards devices, by vendor and outcome.",
            ["vendor", "kind", "outcome"],
            registry=registry,
        )
        self.media_fetches = Counter(
            "cms_ingest_media_fetches_total",
            "Media fetch attempts by outcome (ready, not_ready, unavailable, failed, error).",
            ["vendor", "kind", "outcome"],
            registry=registry,
        )
        self.media_bytes = Counter(
            "cms_ingest_media_bytes_total",
            "Bytes of media stored.",
            ["vendor", "kind"],
            registry=registry,
        )
        self.media_queue = Gauge(
            "cms_ingest_media_queue_depth",
            "Media rows still pending.",
            registry=registry,
        )
        self.action_queue = Gauge(
            "cms_ingest_action_queue_depth",
            "Actions queued or running.",
            registry=registry,
        )
        self.actions = Counter(
            "cms_ingest_actions_total",
            "Actions finished, by vendor, kind and outcome (succeeded, failed, expired, retried).",
            ["vendor", "kind", "outcome"],
            registry=registry,
        )
        self.task_restarts = Counter(
            "cms_ingest_task_restarts_total",
            "Supervised tasks that died and were restarted.",
            ["task"],
            registry=registry,
        )
        self.commit_batch = Histogram(
            "cms_ingest_commit_batch_sites",
            "Sites whose poll results shared one database transaction.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
            registry=registry,
        )
        self.db_errors = Counter(
            "cms_ingest_db_errors_total",
            "Database operations that failed, by operation.",
            ["operation"],
            registry=registry,
        )
        self.sites = Gauge(
            "cms_ingest_sites",
            "Configured sites, by vendor.",
            ["vendor"],
            registry=registry,
        )
        self.clock_skew = Gauge(
            "cms_ingest_clock_skew_seconds",
            "The device's clock minus ours, as last measured (positive: the device is ahead).",
            ["site_id", "vendor"],
            registry=registry,
        )
        self.device_resets = Counter(
            "cms_ingest_device_resets_total",
            "Devices whose alarm ids started again (reset, replaced, reinstalled); a new device "
            "life.",
            ["vendor"],
            registry=registry,
        )
        self.device_health = Gauge(
            "cms_ingest_device_health",
            "What the device reports about its own parts (1 healthy, 0 in error), e.g. recorder, "
            "cameras.",
            ["site_id", "vendor", "component"],
            registry=registry,
        )
        self.api_budget_remaining = Gauge(
            "cms_ingest_api_budget_remaining",
            "Queries left today in an account's daily API budget (CamStreamer).",
            ["site_id", "vendor"],
            registry=registry,
        )
        self.flood_grouped = Counter(
            "cms_ingest_flood_grouped_total",
            "Alarms stored as members of a flood burst (their media skipped unless "
            "flood.fetch_media).",
            ["vendor"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "cms_ingest_config_reloads_total",
            "Config reloads on SIGHUP, by outcome (applied, invalid, failed).",
            ["outcome"],
            registry=registry,
        )
        self.sites_owned = Gauge(
            "cms_ingest_sites_owned",
            "Sites whose lease this daemon holds (and therefore polls).",
            registry=registry,
        )
        self.lease_takeovers = Counter(
            "cms_ingest_lease_takeovers_total",
            "Site leases this daemon took from another daemon whose lease had expired.",
            registry=registry,
        )
        self.lease_handoffs = Counter(
            "cms_ingest_lease_handoffs_total",
            "Site leases this daemon gave up on purpose (rebalance, reload, shutdown).",
            registry=registry,
        )
        self.leases_lost = Counter(
            "cms_ingest_leases_lost_total",
            "Site leases this daemon found taken or expired when renewing (it stopped those "
            "sites).",
            registry=registry,
        )
        self.fencing_refusals = Counter(
            "cms_ingest_fencing_refusals_total",
            "Poll commits refused because this daemon no longer held the site's lease.",
            registry=registry,
        )
        self.daemons_live = Gauge(
            "cms_ingest_daemons_live",
            "Daemons sharing the database, as last seen by this one (heartbeat not expired).",
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "cms_ingest_event_loop_lag_seconds",
            "How much later than asked the event loop ran a 50 ms timer (anything blocking it "
            "delays every site).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.gc_pause = Histogram(
            "cms_ingest_gc_pause_seconds",
            "Collections of Python's garbage collector, by generation (0 young, 2 full): each "
            "stops the whole process, event loop included.",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.event_loop_blocked = Counter(
            "cms_ingest_event_loop_blocked_total",
            "Episodes in which the event loop lagged over 1 s (each logged as event_loop_blocked).",
            registry=registry,
        )
        # Forwarding to the alarm-handling software (SIA DC-09), per forwarder.
        self.forward_queue = Gauge(
            "cms_ingest_forward_queue_depth",
            "Deliveries waiting for the receiver's ACK, per forwarder.",
            ["forwarder"],
            registry=registry,
        )
        self.forward_oldest_age = Gauge(
            "cms_ingest_forward_oldest_pending_seconds",
            "Age of the oldest undelivered delivery, per forwarder (0 when none).",
            ["forwarder"],
            registry=registry,
        )
        self.forward_messages = Counter(
            "cms_ingest_forward_messages_total",
            "DC-09 messages sent, by answer (ack, nak, duh, rsp) or failure (timeout, error, "
            "bad_answer).",
            ["forwarder", "outcome"],
            registry=registry,
        )
        self.forward_deliveries = Counter(
            "cms_ingest_forward_deliveries_total",
            "Deliveries settled, by outcome (delivered after ACK, failed after DUH).",
            ["forwarder", "outcome"],
            registry=registry,
        )
        self.forward_round_trip = Histogram(
            "cms_ingest_forward_round_trip_seconds",
            "From sending a DC-09 message to the receiver's answer.",
            ["forwarder"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.forward_latency = Histogram(
            "cms_ingest_forward_latency_seconds",
            "From the alarm's commit to the receiver's ACK of its delivery.",
            ["forwarder"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )
        self.forward_link_up = Gauge(
            "cms_ingest_forward_link_up",
            "1 while the receiver answered the last message on that path, 0 after a failure.",
            ["forwarder", "path"],
            registry=registry,
        )

        # Per-site gauges: only the daemon holding a site exports them, so a site handed to
        # another daemon must not leave a stale "down" (or "up") behind here.
        self._per_site_gauges = (
            self.clock_skew,
            self.device_health,
            self.api_budget_remaining,
        )
        # `forget_sites` finds a site's series by their first label.
        for gauge in self._per_site_gauges:
            assert getattr(gauge, "_labelnames", ("site_id",))[0] == "site_id", gauge

    def forget_site(self, site_id: str) -> None:
        """Withdraw the site's per-site gauges (it was removed or handed to another daemon)."""
        self.forget_sites([site_id])

    def poll_series(self, site_id: str, vendor: str) -> PollSeries:
        """The site's poll figures (polls by outcome, up, failures, last success), exported
        once the site was polled; the same object until the site is forgotten."""
        series = self._poll_series.get(site_id)
        if series is None or series.vendor != vendor:
            series = self._poll_series[site_id] = PollSeries(site_id, vendor)
        return series

    def forget_sites(self, site_ids: Iterable[str]) -> None:
        """Withdraw these sites' per-site series in one go (see `forget_sites_in_slices`)."""
        for _slice in self._forget(set(site_ids)):
            pass

    async def forget_sites_in_slices(self, site_ids: Iterable[str]) -> None:
        """Withdraw these sites' per-site series, yielding to the event loop between
        slices: a hand-off of thousands of sites must not stall every poll."""
        for _slice in self._forget(set(site_ids)):
            await asyncio.sleep(0)

    def _forget(self, ids: set[str]) -> Iterator[None]:
        """The withdrawal, one slice of series at a time. One pass over each gauge's
        series, not `remove_by_labels` per site (it scans every series each time:
        quadratic), nor `collect()` (it evaluates every callback gauge), nor `remove` per
        series (it checks the environment each time): forgetting 5,000 of 10,000 sites took
        12 s+ at first, then 1.2 s in one block, now about 60 ms in slices of a few ms."""
        for site_id in ids:
            self._poll_series.pop(site_id, None)
        if not ids:
            return
        for gauge in self._per_site_gauges:
            for part in _matching_series(gauge, ids):
                _remove(gauge, part)
                yield

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value, 0 when it does not exist (yet): for tools and tests."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format, as `/metrics` serves it."""
        return generate_latest(self.registry)


SLICE = 1000  # series removed between two yields to the event loop (a few ms)


def _matching_series(gauge: Gauge, site_ids: set[str]) -> list[list[tuple[str, ...]]]:
    """The label values (in the gauge's label order, what `remove` takes) of the series
    of these sites, in slices. prometheus_client keeps them as the keys of `_metrics`
    (read under `_lock`); should a release change that, through the public `collect()`."""
    children = getattr(gauge, "_metrics", None)
    lock = getattr(gauge, "_lock", None)
    if isinstance(children, dict) and lock is not None:
        with lock:
            keys = [key for key in children if key[0] in site_ids]
    else:
        names = getattr(gauge, "_labelnames", ())
        every = {
            tuple(sample.labels[name] for name in names)
            for family in gauge.collect()
            for sample in family.samples
        }
        keys = [labels for labels in every if labels[0] in site_ids]
    return [keys[i : i + SLICE] for i in range(0, len(keys), SLICE)]


def _remove(gauge: Gauge, series: list[tuple[str, ...]]) -> None:
    children = getattr(gauge, "_metrics", None)
    lock = getattr(gauge, "_lock", None)
    if isinstance(children, dict) and lock is not None:
        with lock:
            for key in series:
                children.pop(key, None)
        return
    for labels in series:
        gauge.remove(*labels)


@dataclass(slots=True, eq=False)
class PollSeries:
    """One site's poll figures, as its poller and health state keep them."""

    site_id: str
    vendor: str
    up: bool | None = None  # None until its first poll (in this daemon's tenure)
    consecutive_failures: int = 0
    last_success: float | None = None  # Unix time
    seconds_since_success: Callable[[], float] | None = None
    polls: dict[str, int] = field(default_factory=dict)  # outcome -> count

    def count(self, outcome: str) -> None:
        self.polls[outcome] = self.polls.get(outcome, 0) + 1


_SITE = ["site_id", "vendor"]
# The families `_PollSeriesCollector` builds and their labels (for tools checking queries).
POLL_SERIES_FAMILIES: dict[str, list[str]] = {
    "cms_ingest_polls": [*_SITE, "outcome"],
    "cms_ingest_site_up": _SITE,
    "cms_ingest_site_consecutive_failures": _SITE,
    "cms_ingest_site_last_success_timestamp_seconds": _SITE,
    "cms_ingest_site_seconds_since_success": _SITE,
}


class _PollSeriesCollector(Collector):
    """`cms_ingest_polls_total` and the site_* gauges, built at scrape time from the
    sites' `PollSeries` (names, help and labels as the contract has them)."""

    def __init__(self, series: dict[str, PollSeries]) -> None:
        self._series = series

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(list(self._series.values())))

    def _families(self, sites: list[PollSeries]) -> list[Metric]:
        polls = CounterMetricFamily(
            "cms_ingest_polls",
            "Polls of a site, by outcome (ok, error, auth_error, bad_response, timeout).",
            labels=POLL_SERIES_FAMILIES["cms_ingest_polls"],
        )
        up = GaugeMetricFamily(
            "cms_ingest_site_up",
            "1 while the site's last poll succeeded, 0 while it fails.",
            labels=_SITE,
        )
        failures = GaugeMetricFamily(
            "cms_ingest_site_consecutive_failures", "Polls that failed in a row.", labels=_SITE
        )
        last = GaugeMetricFamily(
            "cms_ingest_site_last_success_timestamp_seconds",
            "Unix time of the site's last successful poll.",
            labels=_SITE,
        )
        since = GaugeMetricFamily(
            "cms_ingest_site_seconds_since_success",
            "Seconds since the site's last successful poll (supervision: comm_lost after the "
            "timeout).",
            labels=_SITE,
        )
        for site in sites:
            labels = [site.site_id, site.vendor]
            for outcome, count in site.polls.items():
                polls.add_metric([*labels, outcome], count)
            if site.up is None:
                continue  # not polled here (yet): another daemon may hold it
            up.add_metric(labels, 1 if site.up else 0)
            failures.add_metric(labels, site.consecutive_failures)
            if site.last_success is not None:
                last.add_metric(labels, site.last_success)
            if site.seconds_since_success is not None:
                since.add_metric(labels, site.seconds_since_success())
        return [polls, up, failures, last, since]
