"""The forwarding outbox over PostgreSQL: forwarder leases and delivery rows.

Delivery rows are written by `Store.commit_polls` in the alarm's own transaction
(`delivery_rows`, below); this module is what the senders do with them:

- a forwarder is sent for by the holder of its `forwarder_leases` row; taking it bumps the
  epoch, renewing and every sequence assignment require the epoch the holder got;
- `next_deliveries` hands the holder its oldest pending rows in id order, each with its DC-09
  sequence number: given once, in the same transaction that advances the forwarder's
  `next_seq` (1..9999, then 1 again), and kept for every resend;
- a row becomes `delivered` only after the receiver's ACK, `failed` on its DUH.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from cms_ingest.db.errors import raises_unavailable
from cms_ingest.db.schema import alarms, deliveries, forwarder_leases
from cms_ingest.db.storable import storable_note
from cms_ingest.domain import (
    Alarm,
    Delivery,
    EventType,
    ForwarderLease,
    OutboxStats,
    RouteFilter,
)

DELIVERIES_CHANNEL = "cms_deliveries"  # NOTIFY'd by a commit that queued deliveries
MAX_SEQ = 9999

_ACQUIRE = text(
    """
    UPDATE forwarder_leases SET
        epoch = CASE WHEN owner = :me THEN epoch ELSE epoch + 1 END,
        owner = :me,
        expires_at = now() + make_interval(secs => :ttl)
    WHERE forwarder = :name AND (owner IS NULL OR owner = :me OR expires_at < now())
    RETURNING owner, epoch
    """
)


class NewAlarm(NamedTuple):
    """An alarm a commit stored now, with its id."""

    alarm: Alarm
    id: int


def delivery_rows(new: Sequence[NewAlarm], routes: Sequence[RouteFilter]) -> list[dict[str, Any]]:
    """One row per newly stored alarm and forwarder whose filter wants it."""
    return [row for alarm, alarm_id in new for row in _rows_of(alarm, alarm_id, routes)]


def _rows_of(alarm: Alarm, alarm_id: int, routes: Sequence[RouteFilter]) -> list[dict[str, Any]]:
    return [{"forwarder": r.forwarder, "alarm_id": alarm_id} for r in routes if r.wants(alarm)]


class OutboxStore:
    """The `Outbox` port (`cms_ingest.storage_ports`) over PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @raises_unavailable
    async def acquire_forwarder(self, name: str, me: str, ttl_s: float) -> ForwarderLease | None:
        """Take (or keep) the forwarder's lease when free, expired or already ours."""
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(forwarder_leases).values(forwarder=name).on_conflict_do_nothing()
            )
            row = (
                await connection.execute(_ACQUIRE, {"me": me, "name": name, "ttl": ttl_s})
            ).first()
        return None if row is None else ForwarderLease(row.owner, int(row.epoch))

    @raises_unavailable
    async def renew_forwarder(self, name: str, lease: ForwarderLease, ttl_s: float) -> bool:
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(forwarder_leases)
                .where(*_held(name, lease))
                .values(expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, ttl_s))
            )
        return bool(result.rowcount)

    @raises_unavailable
    async def release_forwarder(self, name: str, lease: ForwarderLease) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(forwarder_leases)
                .where(*_held(name, lease))
                .values(owner=None, expires_at=func.now())
            )

    @raises_unavailable
    async def next_deliveries(
        self, name: str, lease: ForwarderLease, *, limit: int
    ) -> list[Delivery]:
        """The oldest pending rows of the forwarder, in order, with their sequence numbers
        (new ones given now); [] when the lease is no longer held at its epoch."""
        async with self.engine.begin() as connection:
            next_seq = await connection.scalar(
                select(forwarder_leases.c.next_seq).where(*_held(name, lease)).with_for_update()
            )
            if next_seq is None:
                return []
            rows = (
                await connection.execute(
                    select(
                        deliveries.c.id,
                        deliveries.c.seq,
                        deliveries.c.attempts,
                        deliveries.c.alarm_id,
                        alarms.c.site_id,
                        alarms.c.event_type,
                        alarms.c.description,
                        alarms.c.camera_id,
                        alarms.c.camera_name,
                        alarms.c.occurred_at,
                        alarms.c.received_at,
                    )
                    .join(alarms, alarms.c.id == deliveries.c.alarm_id)
                    .where(deliveries.c.forwarder == name, deliveries.c.state == "pending")
                    .order_by(deliveries.c.id)
                    .limit(limit)
                )
            ).all()
            seqs: dict[int, int] = {}
            for row in rows:
                if row.seq is None:
                    seqs[row.id] = next_seq
                    next_seq = next_seq % MAX_SEQ + 1
            if seqs:
                await connection.execute(
                    text(
                        "UPDATE deliveries d SET seq = s.seq FROM unnest("
                        "CAST(:ids AS bigint[]), CAST(:seqs AS int[])) AS s(id, seq) "
                        "WHERE d.id = s.id AND d.seq IS NULL"
                    ),
                    {"ids": list(seqs), "seqs": list(seqs.values())},
                )
                await connection.execute(
                    update(forwarder_leases)
                    .where(forwarder_leases.c.forwarder == name)
                    .values(next_seq=next_seq)
                )
        return [
            Delivery(
                id=row.id,
                forwarder=name,
                alarm_id=row.alarm_id,
                seq=row.seq if row.seq is not None else seqs[row.id],
                attempts=row.attempts,
                site_id=row.site_id,
                event_type=EventType(row.event_type),
                description=row.description,
                camera_id=row.camera_id,
                camera_name=row.camera_name,
                occurred_at=row.occurred_at,
                committed_at=row.received_at,
            )
            for row in rows
        ]

    @raises_unavailable
    async def delivery_attempted(self, delivery_id: int, *, error: str) -> None:
        """A send that got no usable answer (timeout, refused, NAK): counted, kept pending."""
        async with self.engine.begin() as connection:
            await connection.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == "pending")
                .values(
                    attempts=deliveries.c.attempts + 1,
                    first_sent_at=func.coalesce(deliveries.c.first_sent_at, func.now()),
                    last_error=storable_note(error),
                )
            )

    @raises_unavailable
    async def delivery_finished(
        self, delivery_id: int, *, delivered: bool, answer: str, error: str | None = None
    ) -> bool:
        """ACK (delivered) or DUH (failed, with the reason); False when it was not pending."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == "pending")
                .values(
                    state="delivered" if delivered else "failed",
                    attempts=deliveries.c.attempts + 1,
                    first_sent_at=func.coalesce(deliveries.c.first_sent_at, func.now()),
                    finished_at=func.now(),
                    last_answer=storable_note(answer),
                    last_error=storable_note(error),
                )
            )
        return bool(result.rowcount)

    @raises_unavailable
    async def outbox_stats(self, names: Sequence[str]) -> dict[str, OutboxStats]:
        query = text(
            """
            SELECT n.name,
              (SELECT count(*) FROM deliveries d
                WHERE d.forwarder = n.name AND d.state = 'pending') AS pending,
              (SELECT min(d.created_at) FROM deliveries d
                WHERE d.forwarder = n.name AND d.state = 'pending') AS oldest,
              (SELECT count(*) FROM deliveries d
                WHERE d.forwarder = n.name AND d.state = 'delivered') AS delivered,
              (SELECT count(*) FROM deliveries d
                WHERE d.forwarder = n.name AND d.state = 'failed') AS failed,
              (SELECT max(d.finished_at) FROM deliveries d
                WHERE d.forwarder = n.name AND d.state = 'delivered') AS last_delivered,
              (SELECT l.owner FROM forwarder_leases l
                WHERE l.forwarder = n.name AND l.expires_at > now()) AS owner
            FROM unnest(CAST(:names AS text[])) AS n(name)
            """
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query, {"names": list(names)})).all()
        return {
            row.name: OutboxStats(
                int(row.pending),
                row.oldest,
                int(row.delivered),
                int(row.failed),
                row.last_delivered,
                row.owner,
            )
            for row in rows
        }

    @raises_unavailable
    async def delivery_rows(self, forwarder: str) -> list[dict[str, Any]]:
        """Every row of the forwarder, in id order (tools and tests)."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(deliveries)
                .where(deliveries.c.forwarder == forwarder)
                .order_by(deliveries.c.id)
            )
            return [dict(row._mapping) for row in rows]


def _held(name: str, lease: ForwarderLease) -> list[Any]:
    return [
        forwarder_leases.c.forwarder == name,
        forwarder_leases.c.owner == lease.owner,
        forwarder_leases.c.epoch == lease.epoch,
    ]
