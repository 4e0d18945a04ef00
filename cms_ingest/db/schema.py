"""The tables, as SQLAlchemy Core metadata.

`alarms`, `alarm_media` and `actions` carry the operator contract's columns unchanged; the
extra columns (claims, retry times, locators) are the daemon's bookkeeping. `site_state` holds
each site's poll cursor and health. The alembic migrations build exactly this; a test compares
the two.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

NOW = text("now()")
EMPTY_JSON = text("'{}'::jsonb")

alarms = Table(
    "alarms",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("site_id", Text, nullable=False),
    Column("vendor", Text, nullable=False),
    Column("source_id", Text, nullable=False),
    Column("camera_id", Text),
    Column("camera_name", Text),
    Column("event_type", Text, nullable=False),
    Column("vendor_event", Text, nullable=False, server_default=""),
    Column("description", Text, nullable=False, server_default=""),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("armed", Boolean),
    Column("priority", SmallInteger, nullable=False, server_default="5"),
    Column("status", Text, nullable=False, server_default="new"),
    Column("raw", JSONB, nullable=False, server_default=EMPTY_JSON),
    Column("group_id", BigInteger, ForeignKey("alarms.id", name="alarms_group_id_fkey")),
    Column("repeat_count", Integer, nullable=False, server_default="0"),
    UniqueConstraint("site_id", "source_id", name="alarms_site_id_source_id_key"),
    CheckConstraint("status IN ('new', 'claimed', 'closed')", name="alarms_status_check"),
    CheckConstraint("priority BETWEEN 1 AND 9", name="alarms_priority_check"),
)
Index("alarms_occurred_at_idx", alarms.c.occurred_at)
Index("alarms_open_idx", alarms.c.status, postgresql_where=text("status <> 'closed'"))
Index(
    "alarms_comm_idx",
    alarms.c.site_id,
    alarms.c.id,
    postgresql_where=text("event_type IN ('comm_lost', 'comm_restored')"),
)

alarm_media = Table(
    "alarm_media",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "alarm_id",
        BigInteger,
        ForeignKey("alarms.id", ondelete="CASCADE", name="alarm_media_alarm_id_fkey"),
        nullable=False,
    ),
    Column("kind", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("path", Text),
    Column("content_type", Text),
    Column("size_bytes", BigInteger),
    Column("sha256", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    # The daemon's bookkeeping:
    Column("site_id", Text, nullable=False),
    Column("locator", JSONB, nullable=False, server_default=EMPTY_JSON),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    Column("claimed_until", DateTime(timezone=True)),
    UniqueConstraint("alarm_id", "kind", name="alarm_media_alarm_id_kind_key"),
    CheckConstraint("kind IN ('snapshot', 'thumbnail', 'video')", name="alarm_media_kind_check"),
    CheckConstraint(
        "state IN ('pending', 'ready', 'unavailable', 'failed')", name="alarm_media_state_check"
    ),
)
Index(
    "alarm_media_due_idx",
    alarm_media.c.next_attempt_at,
    postgresql_where=text("state = 'pending'"),
)

actions = Table(
    "actions",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("site_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("target", Text, nullable=False, server_default=""),
    Column("params", JSONB, nullable=False, server_default=EMPTY_JSON),
    Column("state", Text, nullable=False, server_default="queued"),
    Column("requested_by", Text),
    Column("requested_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("not_after", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("finished_at", DateTime(timezone=True)),
    Column("result", JSONB),
    Column("error", Text),
    # The daemon's bookkeeping:
    Column("started_at", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("claimed_until", DateTime(timezone=True)),
    Column("claimed_by", Text),
    CheckConstraint(
        "state IN ('queued', 'running', 'succeeded', 'failed', 'expired')",
        name="actions_state_check",
    ),
)
Index(
    "actions_open_idx",
    actions.c.next_attempt_at,
    postgresql_where=text("state IN ('queued', 'running')"),
)

site_state = Table(
    "site_state",
    metadata,
    Column("site_id", Text, primary_key=True),
    Column("vendor", Text, nullable=False),
    Column("cursor", JSONB),
    Column("cursor_updated_at", DateTime(timezone=True)),
    Column("last_poll_at", DateTime(timezone=True)),
    Column("last_success_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)

# Several daemons over one database: each site is polled by the holder of its lease. `epoch`
# grows with every acquisition, and a poll commits only while its epoch is still the row's
# (checked in the commit's own transaction), so a paused or cut-off daemon cannot write.
site_leases = Table(
    "site_leases",
    metadata,
    Column("site_id", Text, primary_key=True),
    Column("owner", Text),  # a daemons.daemon_id; NULL: free (released or never taken)
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("acquired_at", DateTime(timezone=True)),
)

# The live daemons (heartbeat not expired) share the sites evenly between them.
daemons = Table(
    "daemons",
    metadata,
    Column("daemon_id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("boot_id", Text, nullable=False, server_default=""),
    Column("version", Text, nullable=False, server_default=""),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# The forwarding outbox: one row per alarm and forwarder (SIA DC-09 receiver), written in the
# alarm's own transaction; `delivered` only after the receiver's ACK. `seq` is the DC-09
# sequence number, given before the first send and kept for every resend (a receiver drops a
# repeat by it). No per-row claims: one daemon sends a forwarder's rows, in id order, while
# it holds the forwarder's row in `forwarder_leases` (epoch-fenced like site leases).
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("forwarder", Text, nullable=False),
    Column(
        "alarm_id",
        BigInteger,
        ForeignKey("alarms.id", ondelete="CASCADE", name="deliveries_alarm_id_fkey"),
        nullable=False,
    ),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("seq", Integer),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("first_sent_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("last_answer", Text),
    Column("last_error", Text),
    UniqueConstraint("forwarder", "alarm_id", name="deliveries_forwarder_alarm_id_key"),
    CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="deliveries_state_check"),
)
Index(
    "deliveries_pending_idx",
    deliveries.c.forwarder,
    deliveries.c.id,
    postgresql_where=text("state = 'pending'"),
)

forwarder_leases = Table(
    "forwarder_leases",
    metadata,
    Column("forwarder", Text, primary_key=True),
    Column("owner", Text),  # a daemons.daemon_id; NULL: free
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("next_seq", Integer, nullable=False, server_default="1"),  # 1..9999, then 1
)
