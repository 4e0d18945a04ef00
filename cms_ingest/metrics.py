"""Prometheus metrics: every name the operator contract promises, prefixed `cms_ingest_`.

Per-site labels only where an operator needs the site (up/down, polls by outcome);
histograms carry the vendor only, so two thousand sites do not mean two thousand series each.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

POLLS = Counter(
    "cms_ingest_polls_total",
    "Polls of a site, by outcome (ok, error, auth_error, bad_response, timeout).",
    ["site_id", "vendor", "outcome"],
    registry=REGISTRY,
)
POLL_DURATION = Histogram(
    "cms_ingest_poll_duration_seconds",
    "Time of one poll request cycle (including paging), by vendor.",
    ["vendor"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ALARMS = Counter(
    "cms_ingest_alarms_ingested_total",
    "Alarms committed to the alarms table, by vendor and event type.",
    ["vendor", "event_type"],
    registry=REGISTRY,
)
INGEST_LATENCY = Histogram(
    "cms_ingest_alarm_ingest_latency_seconds",
    "From the alarm's occurred_at (device clock) to its commit.",
    ["vendor"],
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 3600),
    registry=REGISTRY,
)
SITE_UP = Gauge(
    "cms_ingest_site_up",
    "1 while the site's last poll succeeded, 0 while it fails.",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
SITE_CONSECUTIVE_FAILURES = Gauge(
    "cms_ingest_site_consecutive_failures",
    "Polls that failed in a row.",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
SITE_LAST_SUCCESS = Gauge(
    "cms_ingest_site_last_success_timestamp_seconds",
    "Unix time of the site's last successful poll.",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
BAD_INPUT = Counter(
    "cms_ingest_bad_input_total",
    "Unreadable input from a device, a config file or an action row, by source and kind.",
    ["source", "what"],
    registry=REGISTRY,
)
AUTH = Counter(
    "cms_ingest_auth_total",
    "Logins and token refreshes towards devices, by vendor and outcome.",
    ["vendor", "kind", "outcome"],
    registry=REGISTRY,
)
MEDIA_FETCHES = Counter(
    "cms_ingest_media_fetches_total",
    "Media fetch attempts by outcome (ready, not_ready, unavailable, failed, error).",
    ["vendor", "kind", "outcome"],
    registry=REGISTRY,
)
MEDIA_BYTES = Counter(
    "cms_ingest_media_bytes_total",
    "Bytes of media stored.",
    ["vendor", "kind"],
    registry=REGISTRY,
)
MEDIA_QUEUE = Gauge(
    "cms_ingest_media_queue_depth",
    "Media rows still pending.",
    registry=REGISTRY,
)
ACTION_QUEUE = Gauge(
    "cms_ingest_action_queue_depth",
    "Actions queued or running.",
    registry=REGISTRY,
)
ACTIONS = Counter(
    "cms_ingest_actions_total",
    "Actions finished, by vendor, kind and outcome (succeeded, failed, expired, retried).",
    ["vendor", "kind", "outcome"],
    registry=REGISTRY,
)
TASK_RESTARTS = Counter(
    "cms_ingest_task_restarts_total",
    "Supervised tasks that died and were restarted.",
    ["task"],
    registry=REGISTRY,
)
COMMIT_BATCH = Histogram(
    "cms_ingest_commit_batch_sites",
    "Sites whose poll results shared one database transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
    registry=REGISTRY,
)
DB_ERRORS = Counter(
    "cms_ingest_db_errors_total",
    "Database operations that failed, by operation.",
    ["operation"],
    registry=REGISTRY,
)
SITES = Gauge(
    "cms_ingest_sites",
    "Configured sites, by vendor.",
    ["vendor"],
    registry=REGISTRY,
)
CLOCK_SKEW = Gauge(
    "cms_ingest_clock_skew_seconds",
    "The device's clock minus ours, as last measured (positive: the device is ahead).",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
DEVICE_RESETS = Counter(
    "cms_ingest_device_resets_total",
    "Devices whose alarm ids started again (reset, replaced, reinstalled); a new device life.",
    ["vendor"],
    registry=REGISTRY,
)
DEVICE_HEALTH = Gauge(
    "cms_ingest_device_health",
    "What the device reports about its own parts (1 healthy, 0 in error), e.g. recorder, cameras.",
    ["site_id", "vendor", "component"],
    registry=REGISTRY,
)
API_BUDGET_REMAINING = Gauge(
    "cms_ingest_api_budget_remaining",
    "Queries left today in an account's daily API budget (CamStreamer).",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
SITE_SECONDS_SINCE_SUCCESS = Gauge(
    "cms_ingest_site_seconds_since_success",
    "Seconds since the site's last successful poll (supervision: comm_lost after the timeout).",
    ["site_id", "vendor"],
    registry=REGISTRY,
)
FLOOD_GROUPED = Counter(
    "cms_ingest_flood_grouped_total",
    "Alarms stored as members of a flood burst (their media skipped unless flood.fetch_media).",
    ["vendor"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "cms_ingest_config_reloads_total",
    "Config reloads on SIGHUP, by outcome (applied, invalid, failed).",
    ["outcome"],
    registry=REGISTRY,
)
SITES_OWNED = Gauge(
    "cms_ingest_sites_owned",
    "Sites whose lease this daemon holds (and therefore polls).",
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "cms_ingest_lease_takeovers_total",
    "Site leases this daemon took from another daemon whose lease had expired.",
    registry=REGISTRY,
)
LEASE_HANDOFFS = Counter(
    "cms_ingest_lease_handoffs_total",
    "Site leases this daemon gave up on purpose (rebalance, reload, shutdown).",
    registry=REGISTRY,
)
LEASES_LOST = Counter(
    "cms_ingest_leases_lost_total",
    "Site leases this daemon found taken or expired when renewing (it stopped those sites).",
    registry=REGISTRY,
)
FENCING_REFUSALS = Counter(
    "cms_ingest_fencing_refusals_total",
    "Poll commits refused because this daemon no longer held the site's lease.",
    registry=REGISTRY,
)
DAEMONS_LIVE = Gauge(
    "cms_ingest_daemons_live",
    "Daemons sharing the database, as last seen by this one (heartbeat not expired).",
    registry=REGISTRY,
)

EVENT_LOOP_LAG = Histogram(
    "cms_ingest_event_loop_lag_seconds",
    "How much later than asked the event loop ran a 0.25 s timer (anything blocking it delays "
    "every site).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
EVENT_LOOP_BLOCKED = Counter(
    "cms_ingest_event_loop_blocked_total",
    "Episodes in which the event loop lagged over 1 s (each logged as event_loop_blocked).",
    registry=REGISTRY,
)


# Per-site gauges: only the daemon holding a site exports them, so a site handed to another
# daemon must not leave a stale "down" (or "up") behind here.
_PER_SITE_GAUGES = (
    SITE_UP,
    SITE_CONSECUTIVE_FAILURES,
    SITE_LAST_SUCCESS,
    SITE_SECONDS_SINCE_SUCCESS,
    CLOCK_SKEW,
    DEVICE_HEALTH,
)


def forget_site(site_id: str) -> None:
    for gauge in _PER_SITE_GAUGES:
        gauge.remove_by_labels({"site_id": site_id})
