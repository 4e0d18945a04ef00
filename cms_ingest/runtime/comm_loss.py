"""Communication loss: a site that goes quiet is itself an alarm.

After `supervision_timeout` seconds without a successful poll, one `comm_lost` alarm (vendor
`cms`); once polls have succeeded again for `restore_after_s`, one `comm_restored` naming
the outage's length. A site that bounces while lost stays one outage: a failure during the
restore window just restarts the window.

The state needs no table of its own: the site's newest `comm_*` alarm says whether an outage
is open (and since when); the store reads it back as a `CommHistory` when a poller starts.
So an outage that began before a restart is not raised again, and one that ended while the
daemon was down still gets its `comm_restored`.

Pure logic, no I/O: the poller feeds it outcomes and commits the alarms it returns.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from cms_ingest.domain import Alarm, CommHistory, EventType, OpenOutage, default_priority

VENDOR = "cms"


class CommLossTracker:
    """One site's `comm_lost` / `comm_restored`, from the outcomes of its polls."""

    def __init__(
        self,
        *,
        site_id: str,
        timeout_s: float,
        restore_after_s: float,
        history: CommHistory,
    ) -> None:
        self.site_id = site_id
        self._timeout = timedelta(seconds=timeout_s)
        self._restore_after = timedelta(seconds=restore_after_s)
        self.outage = history.open_outage
        # Silence is counted from our own start at the earliest: the daemon being down is
        # not the site's fault (and a long-stopped daemon must not cry wolf at start).
        started = datetime.now(UTC)
        last_success = history.last_success
        self._last_success = max(last_success, started) if last_success else started
        self._healthy_since: datetime | None = None
        self._last_error = ""

    def observe(self, ok: bool, error: str = "", now: datetime | None = None) -> list[Alarm]:
        """Record a poll's outcome; the comm_* alarms (if any) that it raises."""
        now = now or datetime.now(UTC)
        if ok:
            self._last_success = now
            if self.outage is None:
                return []
            self._healthy_since = self._healthy_since or now
            if now - self._healthy_since >= self._restore_after:
                return [self._restored(now)]
            return []
        self._last_error = error
        self._healthy_since = None  # a bounce while lost: the restore window starts over
        if self.outage is None and now - self._last_success >= self._timeout:
            return [self._lost(now)]
        return []

    def _lost(self, now: datetime) -> Alarm:
        silent_since = self._last_success
        source_id = f"comm_lost:{int(silent_since.timestamp() * 1000)}"
        self.outage = OpenOutage(source_id, silent_since)
        auth = "authentication failed" in self._last_error.lower()
        reason = "authentication failures" if auth else "communication failures"
        seconds = (now - silent_since).total_seconds()
        return _alarm(
            self.site_id,
            source_id,
            event=EventType.COMM_LOST,
            when=now,
            description=f"no successful poll for {seconds:.0f} s ({reason}): {self._last_error}"[
                :1000
            ],
            raw={"silent_since": silent_since.isoformat(), "last_error": self._last_error[:1000]},
        )

    def _restored(self, now: datetime) -> Alarm:
        assert self.outage is not None
        outage = self.outage
        self.outage = None
        self._healthy_since = None
        length = (now - outage.silent_since).total_seconds()
        suffix = outage.source_id.split(":", 1)[1]
        return _alarm(
            self.site_id,
            f"comm_restored:{suffix}",
            event=EventType.COMM_RESTORED,
            when=now,
            description=f"communication restored after an outage of {_duration(length)}",
            raw={"silent_since": outage.silent_since.isoformat(), "outage_s": round(length, 1)},
        )

    def seconds_since_success(self) -> float:
        return max(0.0, time.time() - self._last_success.timestamp())


def _alarm(
    site_id: str,
    source_id: str,
    *,
    event: EventType,
    when: datetime,
    description: str,
    raw: dict[str, object],
) -> Alarm:
    return Alarm(
        site_id=site_id,
        vendor=VENDOR,
        source_id=source_id,
        event_type=event,
        vendor_event=event.value,
        description=description,
        occurred_at=when,
        priority=default_priority(event),
        raw=raw,
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
