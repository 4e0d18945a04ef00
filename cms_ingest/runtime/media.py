"""The media fetcher: downloads snapshots and clips once the device has them ready.

Generic over vendors: it claims due `pending` rows (SKIP LOCKED, under a lease), asks the
site's vendor client where the media stands, and then downloads, re-checks later, or
settles the row. A row still not ready at its deadline becomes `failed` with the reason; a
row the vendor has no media for becomes `unavailable`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import structlog

from cms_ingest import metrics
from cms_ingest.config import MediaConfig
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.db.store import MediaJob, Store
from cms_ingest.domain import MediaState
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.mediafiles import MediaTooLarge, StoredFile, store_stream
from cms_ingest.runtime.sites import SiteRegistry, SiteRuntime
from cms_ingest.runtime.supervisor import wake_or_stop
from cms_ingest.sitehttp import TransportError, UnsafeUrl
from cms_ingest.vendors.base import MediaNotReady, MediaProbe, VendorError

log = structlog.get_logger("cms_ingest.media")


class _StepTimedOut(Exception):
    """A media status or download ran past its deadline: tried again later, like an error."""


LEASE_S = 900.0  # longer than any download may take; a crashed worker's rows return after it
IDLE_WAIT_S = 1.0


class MediaFetcher:
    def __init__(
        self, store: Store, sites: SiteRegistry, *, root: Path, config: MediaConfig
    ) -> None:
        self._store = store
        self._sites = sites
        self._root = root
        self._config = config
        self._policy = RetryPolicy(
            base=config.retry_base_s, factor=1.6, cap=config.retry_max_s, jitter=0.3
        )
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        # Rows whose outcome could not be written (the database failed meanwhile): handed
        # back as soon as it answers, instead of staying claimed for LEASE_S.
        self._unreleased: set[int] = set()

    def wake(self) -> None:
        """New media rows were committed: look now rather than at the next idle tick."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._release_unrecorded()
                free = self._config.workers - len(self._inflight)
                jobs = await self._claim(free) if free > 0 else []
                for job in jobs:
                    task = asyncio.create_task(self._handle(job), name=f"media:{job.id}")
                    self._inflight[job.id] = task
                    task.add_done_callback(self._finished)
                if not jobs or free <= len(jobs):
                    # New rows, a free slot, shutdown, or the periodic look for due retries.
                    await wake_or_stop(self._wake, stop, IDLE_WAIT_S)
        finally:
            await self._release_inflight()

    async def _claim(self, limit: int) -> list[MediaJob]:
        try:
            return await self._store.claim_media(
                limit=limit, lease_s=LEASE_S, site_ids=self._sites.owned_ids()
            )
        except DatabaseUnavailable as exc:
            metrics.DB_ERRORS.labels(operation="claim_media").inc()
            log.warning("media_claim_failed", error=str(exc))
            return []

    def _finished(self, task: asyncio.Task[None]) -> None:
        media_id = int(task.get_name().split(":", 1)[1])
        self._inflight.pop(media_id, None)
        self._wake.set()  # a slot is free

    async def _release_inflight(self) -> None:
        """Shutdown: abandon downloads in flight and hand their rows back at once."""
        tasks = dict(self._inflight)
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks.values(), timeout=2.0)
            try:
                await self._store.release_media(list(tasks))
            except DatabaseUnavailable as exc:
                log.warning(
                    "media_release_failed", error=str(exc), note="rows return after their lease"
                )

    async def _release_unrecorded(self) -> None:
        if not self._unreleased:
            return
        try:
            await self._store.release_media(sorted(self._unreleased))
        except DatabaseUnavailable:
            return  # still down: next turn
        log.info("media_rows_handed_back", count=len(self._unreleased))
        self._unreleased.clear()

    async def _handle(self, job: MediaJob) -> None:
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as exc:  # writing the outcome failed: the database
            metrics.DB_ERRORS.labels(operation="media_outcome").inc()
            log.warning(
                "media_outcome_not_recorded",
                site_id=job.site_id,
                media_id=job.id,
                error=str(exc),
                note="the row is handed back and retried once the database answers",
            )
            self._unreleased.add(job.id)

    async def _attempt(self, job: MediaJob) -> None:
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
        except _StepTimedOut as exc:
            await self._later(job, site, None, str(exc), "timeout")
        except MediaTooLarge as exc:
            await self._settle(job, MediaState.FAILED, str(exc), "too_large", site)
        except UnsafeUrl as exc:
            await self._settle(job, MediaState.FAILED, str(exc), "unsafe_url", site)
        except (TransportError, VendorError) as exc:
            await self._later(job, site, None, f"{type(exc).__name__}: {exc}", "error")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not wedge the row: retry, visibly
            log_.exception("media_fetch_crashed")
            await self._later(job, site, None, f"internal error: {exc}", "error")

    async def _probe(self, job: MediaJob, site: SiteRuntime) -> MediaProbe:
        timeout_s = self._config.probe_timeout_s
        guard = asyncio.timeout(timeout_s)
        try:
            async with guard:
                return await site.client.media_status(job.kind, job.locator)
        except TimeoutError:
            if not guard.expired():
                raise  # the client's own: a bug, reported as one
            raise _StepTimedOut(
                f"no media status within {timeout_s:g} s (media.probe_timeout_s)"
            ) from None

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
        metrics.MEDIA_FETCHES.labels(**labels, outcome="ready").inc()
        metrics.MEDIA_BYTES.labels(**labels).inc(stored.size_bytes)

    async def _fetch_file(self, job: MediaJob, site: SiteRuntime, path: str) -> StoredFile:
        """The device's file, streamed to disk within media.download_timeout_s (a device
        that trickles bytes would otherwise hold a worker as long as it likes)."""
        timeout_s = self._config.download_timeout_s
        guard = asyncio.timeout(timeout_s)
        try:
            async with guard, site.client.download(path) as download:
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
        except TimeoutError:
            if not guard.expired():
                raise
            raise _StepTimedOut(
                f"download not done within {timeout_s:g} s (media.download_timeout_s)"
            ) from None

    async def _later(
        self, job: MediaJob, site: SiteRuntime, probe: MediaProbe | None, note: str, outcome: str
    ) -> None:
        """Re-check after a backoff, or give up if that would pass the deadline."""
        now = datetime.now(UTC)
        metrics.MEDIA_FETCHES.labels(
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
        metrics.MEDIA_FETCHES.labels(vendor=vendor, kind=job.kind.value, outcome=outcome).inc()
        if state is MediaState.FAILED:
            log.warning(
                "media_failed",
                site_id=job.site_id,
                alarm_id=job.alarm_id,
                kind=job.kind.value,
                reason=reason,
            )
