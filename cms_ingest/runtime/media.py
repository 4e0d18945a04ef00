"""The media fetcher: downloads snapshots and clips once the device has them ready.

Generic over vendors: run by the claim loop (`claims.py`), it claims due `pending` rows
(SKIP LOCKED, for `CLAIM_S`), asks the site's vendor client where the media stands, and then
downloads, re-checks later, or settles the row. A row still not ready at its deadline becomes
`failed` with the reason; a row the vendor has no media for becomes `unavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from cms_ingest.config import MediaConfig
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.domain import MediaJob, MediaState
from cms_ingest.mediafiles import MediaTooLarge, StoredFile, store_stream
from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.claims import ClaimTimings, ClaimWorker, DeadlinePassed, within
from cms_ingest.runtime.sites import SiteRegistry, SiteRuntime
from cms_ingest.sitehttp import TransportError, UnsafeUrl
from cms_ingest.storage_ports import MediaQueue
from cms_ingest.vendors.base import MediaNotReady, MediaProbe, VendorError

log = structlog.get_logger("cms_ingest.media")


# A claim lasts this long and is renewed every third of it while the row's work runs (one
# query for all rows in flight), so the rows of a worker that died (a crash, a SIGKILL, a
# failover) are taken up again by another within CLAIM_S.
CLAIM_S = 15.0
IDLE_WAIT_S = 1.0
# Shutdown: downloads in flight are abandoned at once (their rows are handed back untouched,
# another worker starts them afresh); cancelled ones get this long to clean up.
CANCEL_WAIT_S = 2.0


class MediaFetcher(ClaimWorker[MediaJob]):
    """The media part of the claim loop: which rows to claim, and how one is fetched.
    `wake()` when new media rows were committed."""

    def __init__(
        self,
        store: MediaQueue,
        sites: SiteRegistry,
        *,
        root: Path,
        config: MediaConfig,
        held: Callable[[], list[str]],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self._sites = sites
        self._held = held  # the sites this daemon holds: only their media is fetched here
        self._root = root
        self._config = config
        self._policy = RetryPolicy(
            base=config.retry_base_s, factor=1.6, cap=config.retry_max_s, jitter=0.3
        )
        # Rows whose outcome could not be written (the database failed meanwhile): handed
        # back as soon as it answers, instead of staying claimed for CLAIM_S.
        self._unreleased: set[int] = set()
        timings = ClaimTimings(
            workers=config.workers,
            idle_s=IDLE_WAIT_S,
            stop_grace_s=0.0,
            cancel_wait_s=CANCEL_WAIT_S,
            renew_every_s=CLAIM_S / 3,
        )
        super().__init__(name="media", timings=timings)

    # ------------------------------------------------------------------ ClaimedJobs

    async def before_claim(self) -> None:
        """Hand back the rows whose outcome could not be written, once the database answers."""
        if not self._unreleased:
            return
        try:
            await self._store.release_media(sorted(self._unreleased))
        except DatabaseUnavailable:
            return  # still down: next turn
        log.info("media_rows_handed_back", count=len(self._unreleased))
        self._unreleased.clear()

    async def claim(self, limit: int) -> list[MediaJob]:
        try:
            return await self._store.claim_media(
                limit=limit, claim_s=CLAIM_S, site_ids=self._held()
            )
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="claim_media").inc()
            log.warning("media_claim_failed", error=str(exc))
            return []

    async def not_settled(self, job: MediaJob, error: Exception) -> None:
        """Writing the outcome failed: the database (waited out), or a bug of ours (logged
        with its traceback). Either way the row is handed back and tried again."""
        if isinstance(error, DatabaseUnavailable):
            self._metrics.db_errors.labels(operation="media_outcome").inc()
            log.warning(
                "media_outcome_not_recorded",
                site_id=job.site_id,
                media_id=job.id,
                error=str(error),
                note="the row is handed back and retried once the database answers",
            )
        else:
            log.error(
                "media_job_crashed",
                site_id=job.site_id,
                media_id=job.id,
                exc_info=error,
                note="a bug: the row is handed back and tried again",
            )
        self._unreleased.add(job.id)

    async def release(self, jobs: Sequence[MediaJob]) -> None:
        """Shutdown: the downloads abandoned hand their rows back at once."""
        try:
            await self._store.release_media([job.id for job in jobs])
        except DatabaseUnavailable as exc:
            log.warning(
                "media_release_failed",
                error=str(exc),
                note="rows return when their claim runs out",
            )

    async def renew(self, jobs: Sequence[MediaJob]) -> None:
        """The rows in flight stay claimed while their status checks and downloads run."""
        try:
            await self._store.extend_media_claims([job.id for job in jobs], claim_s=CLAIM_S)
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="media_claim_renewal").inc()
            log.warning(
                "media_claim_renewal_failed",
                rows=len(jobs),
                error=str(exc),
                note="another worker may take them up when their claim runs out",
            )

    # ------------------------------------------------------------------ one row

    async def run_one(self, job: MediaJob) -> None:
        """Where the media stands, then download it, look again later, or settle the row."""
        site = self._sites.get(job.site_id)
        log_ = log.bind(
            site_id=job.site_id, media_id=job.id, alarm_id=job.alarm_id, kind=job.kind.value
        )
        if site is None:
            await self._settle(
                job, MediaState.FAILED, f"site {job.site_id!r} is not configured", "unknown_site"
            )
            return
        try:
            probe = await self._probe(job, site)
            if probe.state == "ready" and probe.path:
                await self._download(job, site, probe.path)
            elif probe.state == "unavailable":
                await self._settle(
                    job,
                    MediaState.UNAVAILABLE,
                    probe.detail or "the device has none",
                    "unavailable",
                    site,
                )
            else:
                await self._later(job, site, probe, f"not ready: {probe.detail}", "not_ready")
        except MediaNotReady as exc:
            await self._later(job, site, None, f"not ready: {exc}", "not_ready")
        except DeadlinePassed as exc:
            await self._later(job, site, None, str(exc), "timeout")
        except MediaTooLarge as exc:
            await self._settle(job, MediaState.FAILED, str(exc), "too_large", site)
        except UnsafeUrl as exc:
            await self._settle(job, MediaState.FAILED, str(exc), "unsafe_url", site)
        except (TransportError, VendorError) as exc:
            await self._later(job, site, None, f"{type(exc).__name__}: {exc}", "error")
        except (asyncio.CancelledError, DatabaseUnavailable):
            raise  # the loop hands a row whose outcome could not be written back
        except Exception as exc:  # a bug must not wedge the row: retry, visibly
            log_.exception("media_fetch_crashed")
            await self._later(job, site, None, f"internal error: {exc}", "error")

    async def _probe(self, job: MediaJob, site: SiteRuntime) -> MediaProbe:
        timeout_s = self._config.probe_timeout_s
        passed = DeadlinePassed(f"no media status within {timeout_s:g} s (media.probe_timeout_s)")
        async with within(timeout_s, passed):
            return await site.client.media_status(job.kind, job.locator)

    async def _download(self, job: MediaJob, site: SiteRuntime, path: str) -> None:
        stored = await self._fetch_file(job, site, path)
        await self._store.media_ready(
            job.id,
            path=stored.path,
            content_type=stored.content_type,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
        )
        labels = {"vendor": site.config.vendor, "kind": job.kind.value}
        self._metrics.media_fetches.labels(**labels, outcome="ready").inc()
        self._metrics.media_bytes.labels(**labels).inc(stored.size_bytes)

    async def _fetch_file(self, job: MediaJob, site: SiteRuntime, path: str) -> StoredFile:
        """The device's file, streamed to disk within media.download_timeout_s (a device
        that trickles bytes would otherwise hold a worker as long as it likes)."""
        timeout_s = self._config.download_timeout_s
        passed = DeadlinePassed(
            f"download not done within {timeout_s:g} s (media.download_timeout_s)"
        )
        async with within(timeout_s, passed), site.client.download(path) as download:
            if (
                download.content_length is not None
                and download.content_length > self._config.max_bytes
            ):
                raise MediaTooLarge(
                    f"device announces {download.content_length} bytes, over the "
                    f"{self._config.max_bytes}-byte cap (media.max_bytes)"
                )
            return await store_stream(
                download.chunks,
                root=self._root,
                site_id=job.site_id,
                alarm_id=job.alarm_id,
                kind=job.kind.value,
                occurred_at=job.occurred_at,
                max_bytes=self._config.max_bytes,
            )

    async def _later(
        self, job: MediaJob, site: SiteRuntime, probe: MediaProbe | None, note: str, outcome: str
    ) -> None:
        """Re-check after a backoff, or give up if that would pass the deadline."""
        now = datetime.now(UTC)
        self._metrics.media_fetches.labels(
            vendor=site.config.vendor, kind=job.kind.value, outcome=outcome
        ).inc()
        if now >= job.deadline_at:
            waited = (now - job.occurred_at).total_seconds()
            await self._settle(
                job,
                MediaState.FAILED,
                f"gave up after {waited:.0f} s (deadline); last: {note}",
                "failed",
                site,
            )
            return
        delay = self._policy.delay(job.attempts + 1)
        delay = min(delay, max(0.0, (job.deadline_at - now).total_seconds()))
        locator = None
        if probe is not None and probe.remember:
            locator = {**job.locator, **probe.remember}
            locator = {key: value for key, value in locator.items() if value is not None}
        await self._store.media_retry_later(job.id, delay_s=delay, note=note, locator=locator)

    async def _settle(
        self,
        job: MediaJob,
        state: MediaState,
        reason: str,
        outcome: str,
        site: SiteRuntime | None = None,
    ) -> None:
        await self._store.media_final(job.id, state, reason)
        vendor = site.config.vendor if site else "unknown"
        self._metrics.media_fetches.labels(
            vendor=vendor, kind=job.kind.value, outcome=outcome
        ).inc()
        if state is MediaState.FAILED:
            log.warning(
                "media_failed",
                site_id=job.site_id,
                alarm_id=job.alarm_id,
                kind=job.kind.value,
                reason=reason,
            )
