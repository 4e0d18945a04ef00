"""Every query the daemon runs. Nothing outside `cms_ingest.db` writes SQL.

The guarantees live here:
- a site's new alarms, their media rows and the site's advanced cursor commit in one
  transaction (`commit_polls`), and `UNIQUE (site_id, source_id)` absorbs any replay;
- media and action rows are claimed with `FOR UPDATE SKIP LOCKED` until `claimed_until`,
  so several workers and daemons share the queues and a crashed worker's rows come back
  when its claim runs out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    ARRAY,
    Text,
    any_,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cms_ingest.db.errors import raises_unavailable
from cms_ingest.db.leases import fenced_sites
from cms_ingest.db.outbox import DELIVERIES_CHANNEL, NewAlarm, delivery_rows
from cms_ingest.db.schema import (
    actions,
    alarm_media,
    alarms,
    deliveries,
    site_leases,
    site_state,
)
from cms_ingest.db.storable import (
    EXPIRED_ERROR,
    NO_MEDIA_NOTE,
    storable_commit,
    storable_health,
    storable_json,
    storable_note,
    storable_result,
)
from cms_ingest.domain import (
    Action,
    ActionState,
    Alarm,
    CommHistory,
    CommitResult,
    CommitTerms,
    InsertedAlarm,
    MediaJob,
    MediaKind,
    MediaState,
    OpenOutage,
    PollCommit,
    RouteFilter,
    SiteHealth,
)

# The poll types live in the domain (the ports speak them) and the cleaning in `db.storable`;
# the few that importers of this module still take from here are re-exported.
__all__ = ["CommitTerms", "PollCommit", "Store", "storable_commit"]


class Store:
    """The daemon's database access, over one shared async engine: the PostgreSQL adapter of
    the storage ports (`cms_ingest.storage_ports`). Connection-level failures raise
    `DatabaseUnavailable`; every text and JSON value is cleaned here before it is written."""

    def __init__(self, engine: AsyncEngine, routes: Sequence[RouteFilter] = ()) -> None:
        self.engine = engine
        # The forwarders' filters: a commit queues a delivery per forwarder that wants an alarm.
        self.routes = tuple(routes)

    # ------------------------------------------------------------------ health

    @raises_unavailable
    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    # ------------------------------------------------------------------ cursors and polls

    @raises_unavailable
    async def load_cursors(self, site_ids: Iterable[str]) -> dict[str, Mapping[str, Any] | None]:
        ids = list(site_ids)
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(site_state.c.site_id, site_state.c.cursor).where(
                    site_state.c.site_id.in_(ids)
                )
            )
            found = {row.site_id: row.cursor for row in rows}
        return {site_id: found.get(site_id) for site_id in ids}

    @raises_unavailable
    async def supervision_states(self, site_ids: Iterable[str]) -> dict[str, CommHistory]:
        """Per site: its last successful poll, and its open outage (comm_lost source id and
        the start of the silence) when its newest comm_* alarm is a comm_lost."""
        ids = list(site_ids)
        newest_comm = (
            select(alarms.c.site_id, alarms.c.event_type, alarms.c.source_id, alarms.c.raw)
            .where(
                alarms.c.site_id.in_(ids),
                alarms.c.event_type.in_(("comm_lost", "comm_restored")),
            )
            .order_by(alarms.c.site_id, alarms.c.id.desc())
            .ext(distinct_on(alarms.c.site_id))
        )
        async with self.engine.connect() as connection:
            successes = {
                row.site_id: row.last_success_at
                for row in await connection.execute(
                    select(site_state.c.site_id, site_state.c.last_success_at).where(
                        site_state.c.site_id.in_(ids)
                    )
                )
            }
            outages: dict[str, OpenOutage] = {}
            for row in await connection.execute(newest_comm):
                if row.event_type == "comm_lost":
                    silent = (row.raw or {}).get("silent_since")
                    since = datetime.fromisoformat(silent) if silent else None
                    if since is not None:
                        outages[row.site_id] = OpenOutage(row.source_id, since)
        return {
            site_id: CommHistory(successes.get(site_id), outages.get(site_id)) for site_id in ids
        }

    @raises_unavailable
    async def commit_polls(
        self, commits: Sequence[PollCommit], terms: Mapping[str, CommitTerms]
    ) -> CommitResult:
        """Alarms, media rows and cursors of several sites in one transaction; the commits of
        sites whose lease (in `terms`, per site) is no longer held at its epoch are left out
        (fencing). Every site of `commits` has its terms.

        Everything is made storable first (`storable_commit`), here and nowhere else, so no
        device value can fail the transaction that other sites share."""
        commits = [storable_commit(commit) for commit in commits]
        async with self.engine.begin() as connection:
            fenced = await _fence(connection, commits, terms)
            admitted = [commit for commit in commits if commit.site_id not in fenced]
            inserted = await self._commit_polls(connection, admitted, terms)
            return CommitResult(inserted, fenced)

    async def _commit_polls(
        self,
        connection: AsyncConnection,
        commits: Sequence[PollCommit],
        terms: Mapping[str, CommitTerms],
    ) -> list[InsertedAlarm]:
        every_alarm = [alarm for commit in commits for alarm in commit.alarms]
        inserted: list[InsertedAlarm] = []
        if every_alarm:
            rows = (
                await connection.execute(_INSERT_ALARMS, {"alarms": _alarm_records(every_alarm)})
            ).all()
            inserted = [InsertedAlarm(row.id, row.site_id, row.source_id) for row in rows]
            await _count_repeats(connection, (row.group_id for row in rows))
        new = _new_alarms(every_alarm, inserted)
        media_rows = _media_rows(new, terms)
        if media_rows:
            await connection.execute(_INSERT_MEDIA, {"media": records_json(media_rows)})
        forwarding = delivery_rows(new, self.routes)
        if forwarding:
            await connection.execute(insert(deliveries), forwarding)
            await connection.execute(select(func.pg_notify(DELIVERIES_CHANNEL, "")))
        cursor_rows = [
            {"site_id": c.site_id, "vendor": c.vendor, "cursor": dict(c.cursor)}
            for c in commits
            if c.cursor is not None
        ]
        if not cursor_rows:
            return inserted
        upsert = insert(site_state)
        await connection.execute(
            upsert.on_conflict_do_update(
                index_elements=["site_id"],
                set_={
                    "cursor": upsert.excluded.cursor,
                    "cursor_updated_at": func.now(),
                    "updated_at": func.now(),
                },
            ).values(cursor_updated_at=func.now()),
            cursor_rows,
        )
        return inserted

    @raises_unavailable
    async def record_health(self, reports: Sequence[SiteHealth]) -> None:
        """Last poll, last success and failures per site, batched (a few times a minute)."""
        if not reports:
            return
        reports = [storable_health(report) for report in reports]
        rows = [
            {
                "site_id": r.site_id,
                "vendor": r.vendor,
                "last_poll_at": r.last_poll_at,
                "last_success_at": r.last_success_at,
                "consecutive_failures": r.consecutive_failures,
                "last_error": r.last_error,
            }
            for r in reports
        ]
        upsert = insert(site_state)
        async with self.engine.begin() as connection:
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=["site_id"],
                    set_={
                        "last_poll_at": upsert.excluded.last_poll_at,
                        "last_success_at": func.coalesce(
                            upsert.excluded.last_success_at, site_state.c.last_success_at
                        ),
                        "consecutive_failures": upsert.excluded.consecutive_failures,
                        "last_error": upsert.excluded.last_error,
                        "updated_at": func.now(),
                    },
                ),
                rows,
            )

    # ------------------------------------------------------------------ media queue

    @raises_unavailable
    async def claim_media(
        self, *, limit: int, claim_s: float, site_ids: Sequence[str] | None = None
    ) -> list[MediaJob]:
        """Due pending media rows, claimed by the caller for `claim_s` seconds; only of
        `site_ids` (the sites this daemon holds) when given."""
        claimable = (
            select(alarm_media.c.id)
            .where(
                _of_sites(alarm_media.c.site_id, site_ids),
                alarm_media.c.state == MediaState.PENDING.value,
                alarm_media.c.next_attempt_at <= func.now(),
                (alarm_media.c.claimed_until.is_(None))
                | (alarm_media.c.claimed_until < func.now()),
            )
            .order_by(alarm_media.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = (
            update(alarm_media)
            .where(alarm_media.c.id.in_(claimable))
            .values(claimed_until=func.now() + _seconds(claim_s), updated_at=func.now())
            .returning(
                alarm_media.c.id,
                alarm_media.c.alarm_id,
                alarm_media.c.site_id,
                alarm_media.c.kind,
                alarm_media.c.locator,
                alarm_media.c.attempts,
                alarm_media.c.deadline_at,
            )
        )
        async with self.engine.begin() as connection:
            rows = (await connection.execute(statement)).all()
            occurred = await _occurred_at(connection, [row.alarm_id for row in rows])
        return [
            MediaJob(
                id=row.id,
                alarm_id=row.alarm_id,
                site_id=row.site_id,
                kind=MediaKind(row.kind),
                locator=row.locator or {},
                attempts=row.attempts,
                deadline_at=row.deadline_at,
                occurred_at=occurred[row.alarm_id],
            )
            for row in rows
        ]

    @raises_unavailable
    async def media_retry_later(
        self,
        media_id: int,
        *,
        delay_s: float,
        note: str | None,
        locator: Mapping[str, Any] | None = None,
    ) -> None:
        """Check again after `delay_s`; `locator`, when given, replaces the row's (the vendor
        made something on the device that the next check must find again)."""
        changes: dict[str, Any] = {} if locator is None else {"locator": storable_json(locator)}
        await self._update_media(
            media_id,
            attempts=alarm_media.c.attempts + 1,
            last_error=storable_note(note),
            next_attempt_at=func.now() + _seconds(delay_s),
            claimed_until=None,
            **changes,
        )

    @raises_unavailable
    async def media_ready(
        self, media_id: int, *, path: str, content_type: str, size_bytes: int, sha256: str
    ) -> None:
        await self._update_media(
            media_id,
            state=MediaState.READY.value,
            path=path,
            content_type=content_type,
            size_bytes=size_bytes,
            sha256=sha256,
            attempts=alarm_media.c.attempts + 1,
            last_error=None,
            claimed_until=None,
        )

    @raises_unavailable
    async def media_final(self, media_id: int, state: MediaState, reason: str) -> None:
        """`unavailable` (the vendor has none) or `failed` (we gave up), with the reason."""
        await self._update_media(
            media_id,
            state=state.value,
            last_error=storable_note(reason),
            attempts=alarm_media.c.attempts + 1,
            claimed_until=None,
        )

    @raises_unavailable
    async def extend_media_claims(self, media_ids: Sequence[int], *, claim_s: float) -> None:
        if media_ids:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(alarm_media)
                    .where(
                        alarm_media.c.id.in_(list(media_ids)),
                        alarm_media.c.state == MediaState.PENDING.value,
                        # Still claimed: a row its job has just handed back (retry later,
                        # released) must not be claimed again for nobody.
                        alarm_media.c.claimed_until > func.now(),
                    )
                    .values(claimed_until=func.now() + _seconds(claim_s))
                )

    @raises_unavailable
    async def release_media(self, media_ids: Sequence[int]) -> None:
        """Hand claimed rows back untouched (shutdown): another worker may take them now."""
        if media_ids:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(alarm_media)
                    .where(alarm_media.c.id.in_(media_ids))
                    .values(claimed_until=None)
                )

    async def _update_media(self, media_id: int, **values: Any) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(alarm_media)
                .where(alarm_media.c.id == media_id)
                .values(updated_at=func.now(), **values)
            )

    # ------------------------------------------------------------------ actions queue

    @raises_unavailable
    async def enqueue_action(
        self,
        *,
        site_id: str,
        kind: str,
        target: str,
        params: Mapping[str, Any],
        requested_by: str | None,
        not_after: datetime | None = None,
    ) -> int:
        async with self.engine.begin() as connection:
            result = await connection.execute(
                insert(actions)
                .values(
                    site_id=site_id,
                    kind=kind,
                    target=target,
                    params=storable_json(dict(params)),
                    requested_by=requested_by,
                    not_after=not_after,
                )
                .returning(actions.c.id)
            )
            return int(result.scalar_one())

    @raises_unavailable
    async def action_row(self, action_id: int) -> dict[str, Any] | None:
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(select(actions).where(actions.c.id == action_id))
            ).first()
        return None if row is None else dict(row._mapping)

    @raises_unavailable
    async def expire_actions(self) -> int:
        """Queued actions past `not_after` become `expired`: never fired late."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(actions)
                .where(
                    actions.c.state == ActionState.QUEUED.value,
                    actions.c.not_after.is_not(None),
                    actions.c.not_after <= func.now(),
                )
                .values(
                    state=ActionState.EXPIRED.value,
                    finished_at=func.now(),
                    error=EXPIRED_ERROR,
                )
            )
            return int(result.rowcount)

    @raises_unavailable
    async def stale_running_actions(self, site_ids: Sequence[str] | None = None) -> list[Action]:
        """Actions left `running` by a worker whose claim ran out (a crash, a kill)."""
        async with self.engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(actions).where(
                        _of_sites(actions.c.site_id, site_ids),
                        actions.c.state == ActionState.RUNNING.value,
                        actions.c.claimed_until < func.now(),
                    )
                )
            ).all()
        return [_action(row._mapping) for row in rows]

    @raises_unavailable
    async def claim_actions(
        self, *, limit: int, claim_s: float, owner: str, site_ids: Sequence[str] | None = None
    ) -> list[Action]:
        claimable = (
            select(actions.c.id)
            .where(
                _of_sites(actions.c.site_id, site_ids),
                actions.c.state == ActionState.QUEUED.value,
                actions.c.next_attempt_at <= func.now(),
                actions.c.not_after.is_(None) | (actions.c.not_after > func.now()),
            )
            .order_by(actions.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = (
            update(actions)
            .where(actions.c.id.in_(claimable))
            .values(
                state=ActionState.RUNNING.value,
                attempts=actions.c.attempts + 1,
                started_at=func.coalesce(actions.c.started_at, func.now()),
                claimed_until=func.now() + _seconds(claim_s),
                claimed_by=owner,
            )
            .returning(*actions.c)
        )
        async with self.engine.begin() as connection:
            rows = (await connection.execute(statement)).all()
        return [_action(row._mapping) for row in rows]

    @raises_unavailable
    async def extend_action_claim(self, action_id: int, *, claim_s: float, owner: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(actions)
                .where(actions.c.id == action_id, actions.c.claimed_by == owner)
                .values(claimed_until=func.now() + _seconds(claim_s))
            )

    @raises_unavailable
    async def finish_action(
        self,
        action_id: int,
        state: ActionState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool:
        """Move an action to a final state; False when it was no longer in `expected`.

        `only_if_claim_expired`: for recovering a crashed worker's row, which must not race a
        live worker that still holds (and renews) the claim.
        """
        async with self.engine.begin() as connection:
            outcome = await connection.execute(
                update(actions)
                .where(
                    actions.c.id == action_id,
                    actions.c.state == expected.value,
                    *_claim_expired(only_if_claim_expired),
                )
                .values(
                    state=state.value,
                    result=storable_result(result),
                    error=storable_note(error),
                    finished_at=func.now(),
                    claimed_until=None,
                )
            )
            return bool(outcome.rowcount)

    @raises_unavailable
    async def requeue_action(
        self,
        action_id: int,
        *,
        delay_s: float,
        error: str,
        expected: ActionState = ActionState.RUNNING,
        only_if_claim_expired: bool = False,
    ) -> bool:
        async with self.engine.begin() as connection:
            outcome = await connection.execute(
                update(actions)
                .where(
                    actions.c.id == action_id,
                    actions.c.state == expected.value,
                    *_claim_expired(only_if_claim_expired),
                )
                .values(
                    state=ActionState.QUEUED.value,
                    error=storable_note(error),
                    next_attempt_at=func.now() + _seconds(delay_s),
                    claimed_until=None,
                    claimed_by=None,
                )
            )
            return bool(outcome.rowcount)

    # ------------------------------------------------------------------ observation

    @raises_unavailable
    async def alarms_by_id(self, alarm_ids: Sequence[int]) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(alarms).where(alarms.c.id.in_(list(alarm_ids))).order_by(alarms.c.id)
            )
            return [dict(row._mapping) for row in rows]

    @raises_unavailable
    async def media_changed_since(self, since: datetime) -> list[dict[str, Any]]:
        """Media rows settled (ready, unavailable, failed) after `since`, oldest first."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(alarm_media)
                .where(alarm_media.c.updated_at > since, alarm_media.c.state != "pending")
                .order_by(alarm_media.c.updated_at)
            )
            return [dict(row._mapping) for row in rows]

    @raises_unavailable
    async def actions_finished_since(self, since: datetime) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(actions).where(actions.c.finished_at > since).order_by(actions.c.finished_at)
            )
            return [dict(row._mapping) for row in rows]

    @raises_unavailable
    async def site_overview(self, site_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per site, for `cms-ingest status`: health, last alarm, latency, backlogs."""
        ids = list(site_ids)
        overview: dict[str, dict[str, Any]] = {site_id: {} for site_id in ids}
        queries = {
            "state": text(
                "SELECT site_id, last_success_at, consecutive_failures, last_error "
                "FROM site_state WHERE site_id = ANY(:ids)"
            ),
            "alarms": text(
                "SELECT site_id, max(received_at) AS last_alarm_at, "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
                "received_at - occurred_at)) FILTER (WHERE received_at > now() - interval '1 hour')"
                " AS latency_p50_s FROM alarms WHERE site_id = ANY(:ids) GROUP BY site_id"
            ),
            "media": text(
                "SELECT site_id, count(*) AS media_pending FROM alarm_media "
                "WHERE state = 'pending' AND site_id = ANY(:ids) GROUP BY site_id"
            ),
            "actions": text(
                "SELECT site_id, count(*) AS actions_open FROM actions "
                "WHERE state IN ('queued', 'running') AND site_id = ANY(:ids) GROUP BY site_id"
            ),
            "lease": text(
                "SELECT site_id, owner, owner IS NOT NULL AND expires_at > now() AS lease_live "
                "FROM site_leases WHERE site_id = ANY(:ids)"
            ),
        }
        async with self.engine.connect() as connection:
            for query in queries.values():
                for row in await connection.execute(query, {"ids": ids}):
                    overview[row.site_id].update(
                        {k: v for k, v in row._mapping.items() if k != "site_id"}
                    )
        return overview

    @raises_unavailable
    async def queue_depths(self) -> dict[str, int]:
        async with self.engine.connect() as connection:
            media = await connection.scalar(
                select(func.count())
                .select_from(alarm_media)
                .where(alarm_media.c.state == "pending")
            )
            queued = await connection.scalar(
                select(func.count())
                .select_from(actions)
                .where(actions.c.state.in_(("queued", "running")))
            )
        return {"media": int(media or 0), "actions": int(queued or 0)}


# ---------------------------------------------------------------------- row helpers


def _of_sites(column: Any, site_ids: Sequence[str] | None) -> Any:
    """Rows of the given sites, plus rows of sites no daemon has a lease row for (a site in
    no config: whoever claims it fails it with a clear error instead of leaving it queued)."""
    if site_ids is None:
        return true()
    unleased = ~exists().where(site_leases.c.site_id == column)
    return or_(column == any_(literal(list(site_ids), ARRAY(Text))), unleased)


async def _fence(
    connection: AsyncConnection, commits: Sequence[PollCommit], terms: Mapping[str, CommitTerms]
) -> set[str]:
    by_owner: dict[str, dict[str, int]] = {}
    for commit in commits:
        lease = terms[commit.site_id].lease
        if lease is not None:
            by_owner.setdefault(lease.owner, {})[commit.site_id] = lease.epoch
    fenced: set[str] = set()
    for owner, leases in by_owner.items():
        fenced |= await fenced_sites(connection, owner, leases)
    return fenced


def _seconds(value: float) -> Any:
    return func.make_interval(0, 0, 0, 0, 0, 0, value)


def _claim_expired(required: bool) -> list[Any]:
    return [actions.c.claimed_until < func.now()] if required else []


# A poll batch's alarms in one statement, the whole batch one JSON array of records (a storm
# of full pages from many sites at once: executemany built and bound each row on its own,
# about 4,000 alarms/s; one array per column cost asyncpg 4.9 µs of our CPU per alarm to
# encode, where orjson writes the records in 0.9 µs and PostgreSQL reads them in ~5 µs of
# its own: a daemon has one core for every site it polls, PostgreSQL usually cores of its
# own; on the 2-core bench machine, which shares them, it is about even).
# Ids follow the batch's order (WITH ORDINALITY ... ORDER BY): each site's alarms in the
# order its poll found them. A (site_id, source_id) stored before, or twice in the batch, is
# skipped by the unique key; RETURNING gives the ones inserted now.
# A flood member (`group_of`, its burst's first alarm) gets its `group_id` here, not by an
# UPDATE after (in a storm that rewrote most rows of the batch a second time): the head is
# stored before it, by an earlier commit (`stored`) or earlier in this batch, whose ids are
# drawn first (`batch`, materialized: each row's nextval once) so members can name them.
# A head this batch repeats while it is stored already is found as `stored`.
_INSERT_ALARMS = text(
    """
    WITH batch AS MATERIALIZED (
        SELECT nextval(pg_get_serial_sequence('alarms', 'id')) AS id, a.*
        FROM ROWS FROM (
            json_to_recordset(CAST(:alarms AS json)) AS (
                site_id text, vendor text, source_id text, camera_id text, camera_name text,
                event_type text, vendor_event text, description text, occurred_at timestamptz,
                armed boolean, priority smallint, raw jsonb, group_of text
            )
        ) WITH ORDINALITY AS a(site_id, vendor, source_id, camera_id, camera_name, event_type,
                               vendor_event, description, occurred_at, armed, priority, raw,
                               group_of, n)
        ORDER BY a.n
    ),
    batch_heads AS (
        SELECT DISTINCT ON (site_id, source_id) site_id, source_id, id
        FROM batch ORDER BY site_id, source_id, n
    )
    INSERT INTO alarms (id, site_id, vendor, source_id, camera_id, camera_name, event_type,
                        vendor_event, description, occurred_at, armed, priority, raw,
                        group_id)
    SELECT b.id, b.site_id, b.vendor, b.source_id, b.camera_id, b.camera_name, b.event_type,
           b.vendor_event, b.description, b.occurred_at, b.armed, b.priority,
           b.raw, COALESCE(stored.id, batch_head.id)
    FROM batch AS b
    LEFT JOIN alarms AS stored
        ON stored.site_id = b.site_id AND stored.source_id = b.group_of
    LEFT JOIN batch_heads AS batch_head
        ON batch_head.site_id = b.site_id AND batch_head.source_id = b.group_of
    ORDER BY b.n
    ON CONFLICT (site_id, source_id) DO NOTHING
    RETURNING id, site_id, source_id, group_id
    """
)

# Each burst's first alarm counts the members this commit stored.
_COUNT_REPEATS = text(
    """
    UPDATE alarms SET repeat_count = alarms.repeat_count + counted.members
    FROM unnest(CAST(:head_id AS bigint[]), CAST(:members AS integer[]))
        AS counted(head_id, members)
    WHERE alarms.id = counted.head_id
    """
)

_INSERT_MEDIA = text(
    """
    INSERT INTO alarm_media (alarm_id, site_id, kind, state, locator, last_error, deadline_at)
    SELECT m.alarm_id, m.site_id, m.kind, m.state, m.locator, m.last_error,
           now() + make_interval(secs => m.deadline_s)
    FROM json_to_recordset(CAST(:media AS json)) AS m(
        alarm_id bigint, site_id text, kind text, state text, locator jsonb, last_error text,
        deadline_s float8
    )
    """
)


def _alarm_records(batch: Sequence[Alarm]) -> str:
    """The batch's alarms as one JSON array of records (storable already: `storable_commit`).
    Times go as UTC: orjson writes an offset in whole minutes and would move an alarm whose
    zone has seconds (`astimezone` is exact; out of range it raises OverflowError, a data
    error like asyncpg's own)."""
    return records_json(
        [
            {
                "site_id": alarm.site_id,
                "vendor": alarm.vendor,
                "source_id": alarm.source_id,
                "camera_id": alarm.camera_id,
                "camera_name": alarm.camera_name,
                "event_type": alarm.event_type.value,
                "vendor_event": alarm.vendor_event,
                "description": alarm.description,
                "occurred_at": alarm.occurred_at.astimezone(UTC),
                "armed": alarm.armed,
                "priority": alarm.priority,
                "raw": alarm.raw,
                "group_of": alarm.group_of,
            }
            for alarm in batch
        ]
    )


def records_json(records: list[dict[str, Any]]) -> str:
    """Records (storable values; times as UTC datetimes) as one JSON array. orjson: 0.3 µs for
    a typical alarm's raw record where json.dumps takes 3.9 µs (4.5 % of the daemon's CPU in a
    storm). What orjson declines (an integer beyond 64 bits, a non-string key) goes through
    json.dumps as before, times in ISO 8601 as orjson writes them."""
    try:
        return orjson.dumps(records).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(records, default=_iso_time)


def _iso_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _new_alarms(batch: Sequence[Alarm], inserted: Sequence[InsertedAlarm]) -> list[NewAlarm]:
    """The batch's alarms stored by this commit, with their ids (a replayed alarm has its
    rows already: media, group, deliveries are made for new ones only)."""
    ids = {(row.site_id, row.source_id): row.id for row in inserted}
    return [
        NewAlarm(alarm, alarm_id)
        for alarm in batch
        if (alarm_id := ids.get((alarm.site_id, alarm.source_id))) is not None
    ]


async def _count_repeats(connection: AsyncConnection, group_ids: Iterable[int | None]) -> None:
    """Flood members stored now are counted by their burst's first alarm."""
    members = Counter(group_id for group_id in group_ids if group_id is not None)
    if members:
        await connection.execute(
            _COUNT_REPEATS, {"head_id": list(members), "members": list(members.values())}
        )


def _media_rows(new: Sequence[NewAlarm], terms: Mapping[str, CommitTerms]) -> list[dict[str, Any]]:
    return [
        {
            "alarm_id": alarm_id,
            "site_id": alarm.site_id,
            "kind": media.kind.value,
            "state": (MediaState.PENDING if media.available else MediaState.UNAVAILABLE).value,
            "locator": dict(media.locator),
            "last_error": None if media.available else NO_MEDIA_NOTE,
            "deadline_s": terms[alarm.site_id].media_deadline_s,
        }
        for alarm, alarm_id in new
        for media in alarm.media
    ]


async def _occurred_at(connection: AsyncConnection, alarm_ids: list[int]) -> dict[int, datetime]:
    if not alarm_ids:
        return {}
    rows = await connection.execute(
        select(alarms.c.id, alarms.c.occurred_at).where(alarms.c.id.in_(alarm_ids))
    )
    return {row.id: row.occurred_at for row in rows}


def _action(row: Mapping[Any, Any]) -> Action:
    return Action(
        id=row["id"],
        site_id=row["site_id"],
        kind=row["kind"],
        target=row["target"],
        params=row["params"] if isinstance(row["params"], dict) else {},
        attempts=row["attempts"],
        not_after=row["not_after"],
    )
