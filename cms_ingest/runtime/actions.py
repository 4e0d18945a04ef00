"""The action worker: fires what operators ask for in the `actions` table.

Rules (the operator contract):
- never fired after `not_after`: such rows become `expired`;
- a refusal by the device is recorded in `error` and not retried;
- an attempt whose outcome is unknown (timeout after sending, device error, a crash while
  running) is retried only when the action kind is idempotent, so nothing fires twice;
- an attempt that surely never reached the device (cannot connect, login failed) is retried
  with backoff up to `actions.max_attempts`.
Woken by `NOTIFY cms_actions`; a periodic sweep catches anything a lost notification missed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog

from cms_ingest.config import ActionsConfig
from cms_ingest.db.errors import DatabaseUnavailable
from cms_ingest.domain import Action, ActionState
from cms_ingest.metrics import Metrics
from cms_ingest.retry import RetryPolicy
from cms_ingest.runtime.claims import ClaimTimings, ClaimWorker, DeadlinePassed, within
from cms_ingest.runtime.sites import SiteRegistry, SiteRuntime
from cms_ingest.sitehttp import TransportError
from cms_ingest.storage_ports import ActionQueue
from cms_ingest.vendors.base import (
    AuthenticationFailed,
    DeviceRefused,
    InvalidAction,
    VendorError,
)

log = structlog.get_logger("cms_ingest.actions")


class _AttemptTimedOut(DeadlinePassed):
    """An action attempt ran past its deadline; its outcome is unknown. (The class name is
    part of the `error` stored for such an attempt.)"""


RETRY = RetryPolicy(base=1.0, factor=2.0, cap=15.0, jitter=0.3)
# Shutdown: running actions get this long to finish; those still running are cancelled and
# settle by rule within the second figure.
STOP_GRACE_S = 5.0
CANCEL_WAIT_S = 3.0


class ActionWorker(ClaimWorker[Action]):
    """The actions part of the claim loop: which rows to claim, and how one is fired.
    `wake()` on `NOTIFY cms_actions`."""

    def __init__(
        self,
        store: ActionQueue,
        sites: SiteRegistry,
        *,
        config: ActionsConfig,
        held: Callable[[], list[str]],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self._sites = sites
        self._held = held  # the sites this daemon holds: only their actions are run here
        self._config = config
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        timings = ClaimTimings(
            workers=config.workers,
            idle_s=config.sweep_interval_s,  # the sweep runs at least this often
            stop_grace_s=STOP_GRACE_S,
            cancel_wait_s=CANCEL_WAIT_S,
            renew_every_s=config.running_timeout_s / 3,  # the claims of attempts in flight
        )
        super().__init__(name="action", timings=timings)

    # ------------------------------------------------------------------ ClaimedJobs

    async def before_claim(self) -> None:
        """The sweep: queued actions past `not_after` expire, and rows left running by a
        worker that died are settled by rule."""
        try:
            expired = await self._store.expire_actions()
            if expired:
                self._metrics.actions.labels(vendor="any", kind="any", outcome="expired").inc(
                    expired
                )
                log.warning("actions_expired", count=expired)
            # An attempt running here now is not a dead worker's, though its claim may have
            # run out while the database was unreachable: never settled or retried here.
            attempting = self._loop.running_ids()
            for action in await self._store.stale_running_actions(self._held()):
                if action.id not in attempting:
                    await self._recover(action)
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="action_sweep").inc()
            log.warning("action_sweep_failed", error=str(exc))

    async def claim(self, limit: int) -> list[Action]:
        try:
            return await self._store.claim_actions(
                limit=limit,
                claim_s=self._config.running_timeout_s,
                owner=self._owner,
                site_ids=self._held(),
            )
        except DatabaseUnavailable as exc:
            self._metrics.db_errors.labels(operation="claim_actions").inc()
            log.warning("action_claim_failed", error=str(exc))
            return []

    async def not_settled(self, action: Action, error: Exception) -> None:
        """Writing the outcome failed: the database, or a bug of ours (logged with its
        traceback). The row stays `running` until its claim runs out, and the sweep then
        settles it by rule."""
        unavailable = isinstance(error, DatabaseUnavailable)
        report = log.warning if unavailable else log.error
        report(
            "action_outcome_not_recorded",
            action_id=action.id,
            site_id=action.site_id,
            error=str(error),
            exc_info=None if unavailable else error,
            note="settled by rule once its claim runs out",
        )

    async def release(self, actions: Sequence[Action]) -> None:
        """Nothing to hand back: a cancelled attempt settles its own row by rule."""

    # ------------------------------------------------------------------ one row

    async def _recover(self, action: Action) -> None:
        """A row left `running` past its claim: its worker died mid-attempt."""
        site = self._sites.get(action.site_id)
        spec = site.client.actions.get(action.kind) if site else None
        reason = "the daemon running it stopped mid-attempt"
        if spec is not None and spec.idempotent and not _too_late(action):
            await self._store.requeue_action(
                action.id,
                delay_s=0,
                error=f"{reason}; retried (idempotent)",
                only_if_claim_expired=True,
            )
            return
        error = f"{reason}; outcome unknown, not retried (it could fire twice)"
        if await self._store.finish_action(
            action.id, ActionState.FAILED, error=error, only_if_claim_expired=True
        ):
            vendor = site.config.vendor if site else "unknown"
            self._metrics.actions.labels(vendor=vendor, kind=action.kind, outcome="failed").inc()
            log.warning("action_failed", action_id=action.id, site_id=action.site_id, error=error)

    async def run_one(self, action: Action) -> None:
        """Fire one action within its deadline and settle its row by the rules above."""
        bound = log.bind(
            action_id=action.id, site_id=action.site_id, kind=action.kind, target=action.target
        )
        site = self._sites.get(action.site_id)
        if site is None:
            await self._fail(
                action, None, f"site {action.site_id!r} is not configured in this daemon"
            )
            return
        spec = site.client.actions.get(action.kind)
        if spec is None:
            kinds = ", ".join(sorted(site.client.actions))
            await self._fail(
                action,
                site,
                f"{site.config.vendor} has no action {action.kind!r} (it has: {kinds})",
            )
            return
        if _too_late(action):
            await self._settle(
                action, site, ActionState.EXPIRED, error="not_after passed before it could be fired"
            )
            return
        deadline = self._config.attempt_deadline(action.params)
        timed_out = _AttemptTimedOut(
            f"no outcome within {deadline:g} s (actions.attempt_timeout_s plus params.duration_s)"
        )
        try:
            async with within(deadline, timed_out):
                result = await site.client.perform(action)
        except _AttemptTimedOut as exc:
            # Sent or not, nobody knows: like a timeout after sending.
            await self._retry_or_fail(action, site, exc, safe=spec.idempotent)
        except (InvalidAction, DeviceRefused) as exc:
            if isinstance(exc, InvalidAction):
                self._bad_row("invalid_action")
            answer = exc.answer if isinstance(exc, DeviceRefused) else None
            await self._settle(action, site, ActionState.FAILED, error=str(exc), result=answer)
        except (TransportError, AuthenticationFailed, VendorError) as exc:
            never_sent = isinstance(exc, AuthenticationFailed) or (
                isinstance(exc, TransportError) and not exc.sent
            )
            await self._retry_or_fail(action, site, exc, safe=never_sent or spec.idempotent)
        except asyncio.CancelledError:
            # Stopping mid-attempt: settle by the same rule as a crash, then let go.
            await asyncio.shield(self._recover_cancelled(action, site, spec.idempotent))
            raise
        except Exception as exc:  # a bug (a client's own TimeoutError too): handled as one
            bound.exception("action_crashed")
            await self._retry_or_fail(action, site, exc, safe=False)
        else:
            await self._settle(action, site, ActionState.SUCCEEDED, result=result.result)
            bound.info("action_succeeded")

    async def _recover_cancelled(self, action: Action, site: SiteRuntime, idempotent: bool) -> None:
        if idempotent and not _too_late(action):
            await self._store.requeue_action(
                action.id, delay_s=0, error="daemon stopped mid-attempt; will retry"
            )
        else:
            await self._fail(
                action, site, "daemon stopped mid-attempt; outcome unknown, not retried"
            )

    async def renew(self, actions: Sequence[Action]) -> None:
        """Attempts in flight (holds last long) keep their claims, so nobody takes them as
        a dead worker's; the loop calls this every third of `running_timeout_s`."""
        for action in actions:
            try:
                await self._store.extend_action_claim(
                    action.id, claim_s=self._config.running_timeout_s, owner=self._owner
                )
            except DatabaseUnavailable as exc:
                # The event's name predates calling a worker's hold on a row a claim.
                log.warning("action_lease_extend_failed", action_id=action.id, error=str(exc))

    async def _retry_or_fail(
        self, action: Action, site: SiteRuntime, exc: BaseException, *, safe: bool
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if not safe:
            await self._fail(
                action, site, f"{error}; outcome unknown, not retried (it could fire twice)"
            )
            return
        if action.attempts >= self._config.max_attempts:
            await self._fail(action, site, f"{error} (gave up after {action.attempts} attempts)")
            return
        delay = RETRY.delay(action.attempts)
        await self._store.requeue_action(action.id, delay_s=delay, error=error)
        self._metrics.actions.labels(
            vendor=site.config.vendor, kind=action.kind, outcome="retried"
        ).inc()
        log.warning(
            "action_retry",
            action_id=action.id,
            attempt=action.attempts,
            delay_s=round(delay, 1),
            error=error,
        )

    def _bad_row(self, what: str) -> None:
        """An operator's row we cannot carry out: counted like any bad input (logged per row)."""
        self._metrics.bad_input.labels(source="actions", what=what).inc()

    async def _fail(self, action: Action, site: SiteRuntime | None, error: str) -> None:
        await self._settle(action, site, ActionState.FAILED, error=error)

    async def _settle(
        self,
        action: Action,
        site: SiteRuntime | None,
        state: ActionState,
        *,
        error: str | None = None,
        result: object = None,
    ) -> None:
        # The error and the result may quote the device: the store cleans them.
        await self._store.finish_action(
            action.id,
            state,
            error=error,
            result=result if isinstance(result, dict) else None,
        )
        vendor = site.config.vendor if site else "unknown"
        self._metrics.actions.labels(vendor=vendor, kind=action.kind, outcome=state.value).inc()
        if state is not ActionState.SUCCEEDED:
            log.warning(
                "action_" + state.value,
                action_id=action.id,
                site_id=action.site_id,
                kind=action.kind,
                error=error,
            )


def _too_late(action: Action) -> bool:
    return action.not_after is not None and datetime.now(UTC) >= action.not_after
