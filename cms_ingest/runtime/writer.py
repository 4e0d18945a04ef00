"""The alarm writer: batches many sites' poll results into few transactions.

Two thousand pollers must not mean two thousand database connections. Pollers hand their
`PollCommit` to the writer and await the outcome; the writer commits whatever has gathered
(up to `max_batch` sites, waiting at most `max_wait_s` for company) in one transaction. When
a batch fails, each site is committed on its own so one bad payload cannot hold back others.
Every value is made storable by the store before anything is sent; a commit PostgreSQL still
refuses for a value in it (a data error, not an outage) is reported as the site's bad input
and committed reduced (`degraded_commit`): its alarms are never lost, and it is never retried
as a database outage (it would fail the same way for ever).
A poller advances its in-memory cursor only after its commit succeeded. A commit whose site
lease this daemon no longer holds is refused inside the transaction (`LeaseLost`).
The writer makes the commits, so it knows what they are made under (`CommitTerms`): the
lease each site is polled under (`lease_of`, read when the poller hands its commit over) and
the site's media deadline (`media_deadline_of`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from cms_ingest.db.errors import is_data_error
from cms_ingest.db.storable import degraded_commit
from cms_ingest.domain import (
    CommitResult,
    CommitTerms,
    InsertedAlarm,
    PollCommit,
    SiteLease,
)
from cms_ingest.metrics import Metrics
from cms_ingest.storage_ports import PollCommits

log = structlog.get_logger("cms_ingest.writer")

_Pending = tuple[PollCommit, CommitTerms, asyncio.Future[list[InsertedAlarm]]]


class LeaseLost(Exception):
    """The commit was refused: another daemon holds the site's lease now (fencing)."""

    def __init__(self, site_id: str) -> None:
        super().__init__(f"site {site_id}: lease lost to another daemon; commit refused")
        self.site_id = site_id


class AlarmWriter:
    def __init__(
        self,
        store: PollCommits,
        *,
        media_deadline_of: Callable[[str], float],
        lease_of: Callable[[str], SiteLease | None] | None = None,
        max_batch: int = 250,
        max_batch_alarms: int = 5000,
        max_wait_s: float = 0.02,
        commits_in_flight: int = 2,
        on_media_added: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`lease_of(site_id)`: the lease this daemon polls the site under, None when it does
        not hold the site (its commits are refused); without it (tools, tests) nothing is
        fenced. `media_deadline_of(site_id)`: seconds its media may take."""
        self._store = store
        self._media_deadline_of = media_deadline_of
        self._lease_of = lease_of
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._max_batch = max_batch
        # A storm (many sites answering full pages at once) is committed in transactions of a
        # few thousand alarms, so commits keep flowing and none holds its locks for long.
        self._max_batch_alarms = max_batch_alarms
        self._max_wait_s = max_wait_s
        # Two transactions at once: while PostgreSQL stores one batch, the next is built
        # (in a storm the writer alone did ~12,000 alarms/s with one). Never two of one site
        # (`_in_flight`): each site's commits stay in the order its poller made them.
        self._commit_slots = asyncio.Semaphore(max(1, commits_in_flight))
        self._in_flight: dict[str, int] = {}
        self._commit_done = asyncio.Event()
        self._on_media_added = on_media_added
        self._metrics = metrics if metrics is not None else Metrics()

    async def commit(self, commit: PollCommit) -> list[InsertedAlarm]:
        """Persist one site's poll atomically; returns the alarms that were new."""
        terms = self._terms(commit.site_id)
        future: asyncio.Future[list[InsertedAlarm]] = asyncio.get_running_loop().create_future()
        await self._queue.put((commit, terms, future))
        return await future

    def _terms(self, site_id: str) -> CommitTerms:
        """The site's terms as the poller hands its commit over: the lease it polls under
        now, even if the commit waits in the queue while the site changes hands."""
        lease = None
        if self._lease_of is not None:
            lease = self._lease_of(site_id)
            if lease is None:  # not ours any more: refused as the transaction would
                self._metrics.fencing_refusals.inc()
                raise LeaseLost(site_id)
        return CommitTerms(media_deadline_s=self._media_deadline_of(site_id), lease=lease)

    async def run(self, stop: asyncio.Event) -> None:
        """Commit batches until stopped and drained (pollers stop first). A bug in a commit
        ends the group, and the writer with it, into its supervisor."""
        async with asyncio.TaskGroup() as commits:
            while not (stop.is_set() and self._queue.empty()):
                batch = await self._gather(stop)
                if not batch:
                    continue
                await self._commit_slots.acquire()
                await self._wait_for_sites_of(batch)
                self._enter(batch)
                commits.create_task(self._commit_in_slot(batch), name="writer:commit")

    async def _wait_for_sites_of(self, batch: list[_Pending]) -> None:
        """Until no site of `batch` has a commit in flight (a comm-loss alarm of a site may
        follow its poll's commit closely)."""
        while any(commit.site_id in self._in_flight for commit, _, _ in batch):
            self._commit_done.clear()
            await self._commit_done.wait()

    def _enter(self, batch: list[_Pending]) -> None:
        for commit, _, _ in batch:
            self._in_flight[commit.site_id] = self._in_flight.get(commit.site_id, 0) + 1

    def _leave(self, batch: list[_Pending]) -> None:
        for commit, _, _ in batch:
            left = self._in_flight.pop(commit.site_id) - 1
            if left:
                self._in_flight[commit.site_id] = left
        self._commit_done.set()

    async def _commit_in_slot(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        finally:
            self._leave(batch)
            self._commit_slots.release()

    async def _gather(self, stop: asyncio.Event) -> list[_Pending]:
        first = await self._first(stop)
        if first is None:
            return []
        batch = [first]
        alarms = len(first[0].alarms)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while len(batch) < self._max_batch and alarms < self._max_batch_alarms:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
                except TimeoutError:
                    break
            alarms += len(batch[-1][0].alarms)
        return batch

    async def _first(self, stop: asyncio.Event) -> _Pending | None:
        """The next commit handed over, or None once `stop` is set (or after 0.5 s): a stop
        must not wait out the wait for a commit that will not come (it cost every shutdown
        up to 0.5 s)."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if stop.is_set():
            return None
        getter = asyncio.ensure_future(self._queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((getter, stopped), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if getter.done():  # checked before cancelling: a commit taken is never dropped
            return getter.result()
        getter.cancel()  # an asyncio.Queue getter cancelled before it took leaves the item
        return None

    async def _commit(self, batch: list[_Pending]) -> None:
        self._metrics.commit_batch.observe(len(batch))
        if len(batch) == 1:
            await self._commit_alone(batch[0])
            return
        try:
            result = await self._store.commit_polls(
                [commit for commit, _, _ in batch], _terms_by_site(batch)
            )
        except Exception as exc:  # whatever failed the batch: each site alone finds the culprit
            log.warning("batch_commit_failed", sites=len(batch), error=str(exc))
            for item in batch:  # isolate the culprit: each site on its own
                await self._commit_alone(item)
            return
        self._resolve(batch, result)

    async def _commit_alone(self, item: _Pending) -> None:
        commit, terms, future = item
        alone = {commit.site_id: terms}
        # Every failure is handed to the poller that waits for this commit: it waits out a
        # DatabaseUnavailable; anything else (a bug) crashes it into its supervisor. The
        # writer itself goes on for the other sites.
        try:
            result = await self._store.commit_polls([commit], alone)
        except Exception as exc:
            if not is_data_error(exc):
                self._metrics.db_errors.labels(operation="commit_polls").inc()
                _resolve_error(future, exc)
                return
            try:
                result = await self._commit_degraded(commit, alone, exc)
            except Exception as again:
                self._metrics.db_errors.labels(operation="commit_polls").inc()
                _resolve_error(future, again)
                return
        self._resolve([item], result)

    async def _commit_degraded(
        self, commit: PollCommit, terms: dict[str, CommitTerms], refused: Exception
    ) -> CommitResult:
        """A commit refused for a value in it: reported once as the site's bad input, then
        stored reduced; without its new cursor only if even that is refused."""
        detail = f"{type(refused).__name__}: {refused}"
        if commit.problems is not None:
            commit.problems.bad_input("unstorable_value", detail)
        log.debug("commit_degraded", site_id=commit.site_id, error=detail)
        try:
            return await self._store.commit_polls(
                [degraded_commit(commit, keep_cursor=True)], terms
            )
        except Exception as exc:
            if not is_data_error(exc):
                raise
        return await self._store.commit_polls([degraded_commit(commit, keep_cursor=False)], terms)

    def _resolve(self, batch: list[_Pending], result: CommitResult) -> None:
        by_site: dict[str, list[InsertedAlarm]] = {}
        for row in result.inserted:
            by_site.setdefault(row.site_id, []).append(row)
        for commit, _, future in batch:
            if commit.site_id in result.fenced:
                self._metrics.fencing_refusals.inc()
                _resolve_error(future, LeaseLost(commit.site_id))
            elif not future.done():
                future.set_result(by_site.get(commit.site_id, []))
        if result.inserted and self._on_media_added is not None:
            self._on_media_added()


def _terms_by_site(batch: list[_Pending]) -> dict[str, CommitTerms]:
    return {commit.site_id: terms for commit, terms, _ in batch}


def _resolve_error(future: asyncio.Future[list[InsertedAlarm]], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
