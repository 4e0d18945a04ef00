"""`cms-ingest status`: one line per site, for the on-call engineer.

Ages (`last_ok`, `last_alarm`) read "12s", "5m", "3h". From the database (works whether or
not the daemon runs): last successful poll, failures in
a row, the newest alarm, the median ingest latency of the last hour, media and action
backlogs, and which daemon holds the site's lease (`owner`; "-" when nobody does, a name
in brackets when its lease expired). From the running daemon's `/status` (when it answers
on `listen`): up/down as it sees it now and the measured clock skew, for the sites it holds.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from cms_ingest.config import AppConfig
from cms_ingest.db.engine import create_engine
from cms_ingest.db.outbox import OutboxStore
from cms_ingest.db.store import Store
from cms_ingest.domain import OutboxStats
from cms_ingest.runtime.daemon import database_url

COLUMNS = (
    "site",
    "vendor",
    "owner",
    "state",
    "last_ok",
    "fails",
    "last_alarm",
    "p50",
    "skew",
    "media",
    "actions",
)


async def run_status(config: AppConfig, *, out: TextIO) -> int:
    payload = await _daemon_payload(config)
    live = _sites_of(payload)
    async with database_url(config) as url:
        store = Store(create_engine(url, pool_size=1))
        try:
            overview = await store.site_overview([site.id for site in config.sites])
            outbox = await OutboxStore(store.engine).outbox_stats(
                [forwarder.name for forwarder in config.forwarders]
            )
        finally:
            await store.engine.dispose()
    rows = [COLUMNS]
    down = 0
    for site in config.sites:
        data = overview.get(site.id, {})
        seen = live.get(site.id, {})
        state = _state(seen, data)
        down += state == "DOWN"
        rows.append(
            (
                site.id,
                site.vendor,
                _owner(data),
                state,
                _ago(data.get("last_success_at")),
                str(data.get("consecutive_failures", 0)),
                _ago(data.get("last_alarm_at")),
                _seconds(data.get("latency_p50_s")),
                _seconds(seen.get("clock_skew_s")),
                str(data.get("media_pending", 0)),
                str(data.get("actions_open", 0)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        out.write("\n")
    out.write(_daemons_line(overview))
    if config.forwarders:
        _write_table(out, _forwarder_rows(config, outbox, payload))
    if not live:
        out.write(f"(no daemon answered on {config.listen}: state from the database only)\n")
    return 1 if down else 0


async def _daemon_payload(config: AppConfig) -> dict[str, Any]:
    url = f"http://{config.listen}/status"
    try:
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            payload = json.loads(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _sites_of(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {site["site_id"]: site for site in payload.get("sites", []) if "site_id" in site}


FORWARDER_COLUMNS = (
    "forwarder",
    "receiver",
    "owner",
    "link",
    "path",
    "pending",
    "oldest",
    "delivered",
    "failed",
    "last_ack",
    "error",
)


def _forwarder_rows(
    config: AppConfig, outbox: dict[str, OutboxStats], payload: dict[str, Any]
) -> list[tuple[str, ...]]:
    """One line per forwarder: its queue from the database; its link as the daemon that
    sends for it sees it (when that daemon is the one answering on `listen`)."""
    live = {f.get("forwarder"): f for f in payload.get("forwarders", []) if f.get("holding")}
    rows: list[tuple[str, ...]] = [FORWARDER_COLUMNS]
    for forwarder in config.forwarders:
        stats = outbox.get(forwarder.name)
        seen = live.get(forwarder.name, {})
        link = seen.get("link_up")
        rows.append(
            (
                forwarder.name,
                forwarder.primary + (f" / {forwarder.backup}" if forwarder.backup else ""),
                str(stats.owner) if stats and stats.owner else "-",
                "-" if not seen else "up" if link else "DOWN" if link is False else "idle",
                str(seen.get("path", "-")),
                str(stats.pending if stats else 0),
                _ago(stats.oldest_pending_at if stats else None),
                str(stats.delivered if stats else 0),
                str(stats.failed if stats else 0),
                _ago(stats.last_delivered_at if stats else None),
                str(seen.get("last_error") or "-")[:60] if link is False else "-",
            )
        )
    return rows


def _write_table(out: TextIO, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        out.write("\n")


def _daemons_line(overview: dict[str, dict[str, Any]]) -> str:
    held = Counter(str(d["owner"]) for d in overview.values() if d.get("lease_live"))
    unheld = sum(1 for d in overview.values() if not d.get("lease_live"))
    parts = [f"{owner} ({count} sites)" for owner, count in sorted(held.items())]
    if unheld:
        parts.append(f"nobody ({unheld} sites)")
    return f"daemons: {', '.join(parts) or 'none'}\n"


def _owner(data: dict[str, Any]) -> str:
    owner = data.get("owner")
    if not owner:
        return "-"
    return str(owner) if data.get("lease_live") else f"({owner})"


def _state(live: dict[str, Any], data: dict[str, Any]) -> str:
    if live.get("owned", True) and live:
        return "up" if live.get("up") else "DOWN" if live.get("up") is False else "starting"
    if data.get("consecutive_failures"):
        return "DOWN"
    return "up?" if data.get("last_success_at") else "never"


def _ago(moment: Any) -> str:
    if not isinstance(moment, datetime):
        return "-"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}s"
