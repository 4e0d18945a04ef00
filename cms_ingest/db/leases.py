"""Site leases and daemon membership: the SQL behind several daemons sharing one database.

- A daemon announces itself in `daemons` with a heartbeat; the live ones (heartbeat not
  expired) split the configured sites evenly between them.
- A site is polled only by the holder of its row in `site_leases`. Taking a lease bumps its
  `epoch`; renewing or releasing it requires the epoch the holder got, so a daemon that was
  paused past its lease finds it gone.
- `fenced_sites` runs inside the poll commit's transaction: a commit whose epoch is no longer
  the row's is refused, and the row is share-locked until the commit ends, so a take-over
  waits for a commit in flight and then reads its cursor.

Rows are always locked in site_id order, so two daemons (or a renewal and a commit of the
same daemon) never wait on each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import and_, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cms_ingest.db.errors import raises_unavailable
from cms_ingest.db.schema import daemons, site_leases
from cms_ingest.domain import Acquired, DaemonIdentity, Heartbeat, LeaseRow

# The lease types live in the domain (the ports speak them); DaemonIdentity, which some
# importers still take from here, is re-exported.
__all__ = ["LEASES_CHANNEL", "DaemonIdentity", "LeaseStore", "fenced_sites"]


def _held(lock: str) -> str:
    """Our lease rows among :sites/:epochs (parallel arrays), still at those epochs,
    locked in site_id order (`lock`: FOR UPDATE or FOR SHARE)."""
    return f"""
        SELECT l.site_id FROM site_leases l
        JOIN unnest(CAST(:sites AS text[]), CAST(:epochs AS bigint[])) AS h(site_id, epoch)
          ON h.site_id = l.site_id AND h.epoch = l.epoch
        WHERE l.owner = :me
        ORDER BY l.site_id
        {lock} OF l
    """


_RENEW = text(
    f"""
    WITH mine AS ({_held("FOR UPDATE")})
    UPDATE site_leases l SET expires_at = now() + make_interval(secs => :ttl)
    FROM mine WHERE l.site_id = mine.site_id
    RETURNING l.site_id, l.epoch
    """
)

_RELEASE = text(
    f"""
    WITH mine AS ({_held("FOR UPDATE")})
    UPDATE site_leases l SET owner = NULL, expires_at = now()
    FROM mine WHERE l.site_id = mine.site_id
    RETURNING l.site_id
    """
)

_STILL_HELD = text(_held("FOR SHARE"))

# Every expired lease of another daemon among the candidates (its owner stopped renewing:
# dead, frozen or cut off; nobody may wait for it), plus up to :limit free ones (or left by
# an earlier process under our own id) towards this daemon's share.
_ACQUIRE = text(
    """
    WITH orphaned AS (
        SELECT site_id, owner FROM site_leases
        WHERE site_id = ANY(CAST(:candidates AS text[]))
          AND owner IS NOT NULL AND owner <> :me AND expires_at <= now()
        FOR UPDATE SKIP LOCKED
    ), free AS (
        SELECT site_id, owner FROM site_leases
        WHERE site_id = ANY(CAST(:candidates AS text[]))
          AND (owner IS NULL OR owner = :me)
        ORDER BY random()
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), pick AS (
        SELECT * FROM orphaned UNION ALL SELECT * FROM free
    )
    UPDATE site_leases l
    SET owner = :me, epoch = l.epoch + 1, acquired_at = now(),
        expires_at = now() + make_interval(secs => :ttl)
    FROM pick WHERE l.site_id = pick.site_id
    RETURNING l.site_id, l.epoch, pick.owner AS previous_owner
    """
)


LEASES_CHANNEL = "cms_leases"


def _notice(me: str) -> dict[str, str]:
    return {"channel": LEASES_CHANNEL, "me": me}


def _arrays(leases: Mapping[str, int]) -> dict[str, list[str] | list[int]]:
    sites = sorted(leases)
    return {"sites": sites, "epochs": [leases[site] for site in sites]}


async def fenced_sites(
    connection: AsyncConnection, owner: str, leases: Mapping[str, int]
) -> set[str]:
    """Of `leases` (site -> epoch), the sites whose lease `owner` no longer holds at that
    epoch. The others stay share-locked until the caller's transaction ends."""
    if not leases:
        return set()
    rows = await connection.execute(_STILL_HELD, {"me": owner, **_arrays(leases)})
    return set(leases) - {row.site_id for row in rows}


class LeaseStore:
    """The PostgreSQL adapter of the `SiteLeases` port (`cms_ingest.storage_ports`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @raises_unavailable
    async def ensure_sites(self, site_ids: Iterable[str]) -> None:
        """A lease row for every configured site (free until someone takes it)."""
        rows = [{"site_id": site_id} for site_id in site_ids]
        if not rows:
            return
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(site_leases).on_conflict_do_nothing(index_elements=["site_id"]), rows
            )

    @raises_unavailable
    async def heartbeat(
        self,
        me: DaemonIdentity,
        ttl_s: float,
        held: Mapping[str, int],
        *,
        fresh_s: float | None = None,
    ) -> Heartbeat:
        """Announce ourselves, renew the leases we hold, and see who else is alive."""
        upsert = insert(daemons).values(
            daemon_id=me.daemon_id,
            host=me.host,
            pid=me.pid,
            boot_id=me.boot_id,
            version=me.version,
            heartbeat_at=func.now(),
            expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, ttl_s),
        )
        async with self.engine.begin() as connection:
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=["daemon_id"],
                    set_={
                        "heartbeat_at": upsert.excluded.heartbeat_at,
                        "expires_at": upsert.excluded.expires_at,
                    },
                )
            )
            renewed: dict[str, int] = {}
            if held:
                rows = await connection.execute(
                    _RENEW, {"me": me.daemon_id, "ttl": ttl_s, **_arrays(held)}
                )
                renewed = {row.site_id: row.epoch for row in rows}
            # Daemons gone for a day are history; keep the table small.
            await connection.execute(
                delete(daemons).where(daemons.c.expires_at < func.now() - text("interval '1 day'"))
            )
            alive = daemons.c.expires_at > func.now()
            orphans_in_s = None
            if fresh_s is not None:
                fresh = daemons.c.heartbeat_at >= func.now() - func.make_interval(
                    0, 0, 0, 0, 0, 0, fresh_s
                )
                orphans_in_s = await connection.scalar(
                    select(
                        func.extract("epoch", func.min(daemons.c.expires_at) - func.now())
                    ).where(alive, ~fresh)
                )
                alive = and_(alive, fresh)
            live = await connection.execute(
                select(daemons.c.daemon_id).where(alive).order_by(daemons.c.daemon_id)
            )
            live_ids = [row.daemon_id for row in live]
            started = (
                await connection.execute(select(func.pg_postmaster_start_time()))
            ).scalar_one()
            return Heartbeat(
                renewed=renewed,
                live=live_ids,
                server_started_at=started,
                orphans_in_s=None if orphans_in_s is None else float(orphans_in_s),
            )

    @raises_unavailable
    async def acquire(
        self, me: str, ttl_s: float, candidates: Sequence[str], limit: int
    ) -> list[Acquired]:
        """Every one of `candidates` whose lease another daemon let expire, plus up to
        `limit` that are free or left by an earlier process under our own id; each taken
        at a new epoch."""
        if limit < 0 or not candidates:
            return []
        async with self.engine.begin() as connection:
            rows = await connection.execute(
                _ACQUIRE,
                {"me": me, "ttl": ttl_s, "candidates": list(candidates), "limit": limit},
            )
            return [
                Acquired(
                    row.site_id,
                    row.epoch,
                    row.previous_owner if row.previous_owner != me else None,
                )
                for row in rows
            ]

    @raises_unavailable
    async def release(
        self, me: str, leases: Mapping[str, int], *, leaving: bool = False
    ) -> set[str]:
        """Give leases up at once (hand-off, shutdown); returns the sites released. When
        `leaving`, this daemon also leaves the membership in the same transaction, so the
        others, woken by the notice, already count it out and take its share at once."""
        if not leases and not leaving:
            return set()
        async with self.engine.begin() as connection:
            released: set[str] = set()
            if leases:
                rows = await connection.execute(_RELEASE, {"me": me, **_arrays(leases)})
                released = {row.site_id for row in rows}
            if leaving:
                await connection.execute(delete(daemons).where(daemons.c.daemon_id == me))
            await connection.execute(text("SELECT pg_notify(:channel, :me)"), _notice(me))
            return released

    @raises_unavailable
    async def announce(self, me: str) -> None:
        """Tell the other daemons (LISTEN cms_leases) to look at the sites' split now."""
        async with self.engine.begin() as connection:
            await connection.execute(text("SELECT pg_notify(:channel, :me)"), _notice(me))

    @raises_unavailable
    async def local_daemons(self, host: str, boot_id: str) -> list[tuple[str, int]]:
        """Live daemons recorded on this very machine (same host name and boot): id, pid."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(daemons.c.daemon_id, daemons.c.pid).where(
                    daemons.c.host == host,
                    daemons.c.boot_id == boot_id,
                    daemons.c.expires_at > func.now(),
                )
            )
            return [(row.daemon_id, row.pid) for row in rows]

    @raises_unavailable
    async def expire_daemons(self, daemon_ids: Sequence[str]) -> int:
        """Declare daemons dead now (their process is known gone): their leases expire at
        once instead of after lease_ttl. Returns how many leases that freed."""
        if not daemon_ids:
            return 0
        ids = list(daemon_ids)
        async with self.engine.begin() as connection:
            await connection.execute(
                daemons.update().where(daemons.c.daemon_id.in_(ids)).values(expires_at=func.now())
            )
            result = await connection.execute(
                site_leases.update()
                .where(site_leases.c.owner.in_(ids), site_leases.c.expires_at > func.now())
                .values(expires_at=func.now())
            )
            return int(result.rowcount)

    @raises_unavailable
    async def lease_rows(self, site_ids: Sequence[str]) -> dict[str, LeaseRow]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(
                    site_leases,
                    (
                        site_leases.c.owner.is_not(None) & (site_leases.c.expires_at > func.now())
                    ).label("live"),
                ).where(site_leases.c.site_id.in_(list(site_ids)))
            )
            return {
                row.site_id: LeaseRow(row.site_id, row.owner, row.epoch, row.expires_at, row.live)
                for row in rows
            }
