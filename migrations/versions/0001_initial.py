"""alarms, alarm_media, actions, site_state and the NOTIFY triggers

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.text("now()")
EMPTY_JSON = sa.text("'{}'::jsonb")
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alarms",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("site_id", sa.Text, nullable=False),
        sa.Column("vendor", sa.Text, nullable=False),
        sa.Column("source_id", sa.Text, nullable=False),
        sa.Column("camera_id", sa.Text),
        sa.Column("camera_name", sa.Text),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("vendor_event", sa.Text, nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("occurred_at", TZ, nullable=False),
        sa.Column("received_at", TZ, nullable=False, server_default=NOW),
        sa.Column("armed", sa.Boolean),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="5"),
        sa.Column("status", sa.Text, nullable=False, server_default="new"),
        sa.Column("raw", JSONB, nullable=False, server_default=EMPTY_JSON),
        sa.Column(
            "group_id",
            sa.BigInteger,
            sa.ForeignKey("alarms.id", name="alarms_group_id_fkey"),
        ),
        sa.Column("repeat_count", sa.Integer, nullable=False, server_default="0"),
        sa.UniqueConstraint("site_id", "source_id", name="alarms_site_id_source_id_key"),
        sa.CheckConstraint("status IN ('new', 'claimed', 'closed')", name="alarms_status_check"),
        sa.CheckConstraint("priority BETWEEN 1 AND 9", name="alarms_priority_check"),
    )
    op.create_index("alarms_occurred_at_idx", "alarms", ["occurred_at"])
    op.create_index(
        "alarms_open_idx", "alarms", ["status"], postgresql_where=sa.text("status <> 'closed'")
    )

    op.create_table(
        "alarm_media",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "alarm_id",
            sa.BigInteger,
            sa.ForeignKey("alarms.id", ondelete="CASCADE", name="alarm_media_alarm_id_fkey"),
            nullable=False,
        ),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("path", sa.Text),
        sa.Column("content_type", sa.Text),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("sha256", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("site_id", sa.Text, nullable=False),
        sa.Column("locator", JSONB, nullable=False, server_default=EMPTY_JSON),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        sa.Column("next_attempt_at", TZ, nullable=False, server_default=NOW),
        sa.Column("deadline_at", TZ, nullable=False),
        sa.Column("claimed_until", TZ),
        sa.UniqueConstraint("alarm_id", "kind", name="alarm_media_alarm_id_kind_key"),
        sa.CheckConstraint(
            "kind IN ('snapshot', 'thumbnail', 'video')", name="alarm_media_kind_check"
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'ready', 'unavailable', 'failed')",
            name="alarm_media_state_check",
        ),
    )
    op.create_index(
        "alarm_media_due_idx",
        "alarm_media",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
    )

    op.create_table(
        "actions",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("site_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False, server_default=""),
        sa.Column("params", JSONB, nullable=False, server_default=EMPTY_JSON),
        sa.Column("state", sa.Text, nullable=False, server_default="queued"),
        sa.Column("requested_by", sa.Text),
        sa.Column("requested_at", TZ, nullable=False, server_default=NOW),
        sa.Column("not_after", TZ),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("finished_at", TZ),
        sa.Column("result", JSONB),
        sa.Column("error", sa.Text),
        sa.Column("started_at", TZ),
        sa.Column("next_attempt_at", TZ, nullable=False, server_default=NOW),
        sa.Column("claimed_until", TZ),
        sa.Column("claimed_by", sa.Text),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'expired')",
            name="actions_state_check",
        ),
    )
    op.create_index(
        "actions_open_idx",
        "actions",
        ["next_attempt_at"],
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )

    op.create_table(
        "site_state",
        sa.Column("site_id", sa.Text, primary_key=True),
        sa.Column("vendor", sa.Text, nullable=False),
        sa.Column("cursor", JSONB),
        sa.Column("cursor_updated_at", TZ),
        sa.Column("last_poll_at", TZ),
        sa.Column("last_success_at", TZ),
        sa.Column("last_error", sa.Text),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
    )

    # Every insert is announced: operators' software LISTENs on cms_alarms, the daemon's
    # action worker on cms_actions (so a plain INSERT by an operator wakes it at once).
    for channel, table in (("cms_alarms", "alarms"), ("cms_actions", "actions")):
        op.execute(
            f"""
            CREATE FUNCTION {channel}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{channel}', NEW.id::text);
                RETURN NEW;
            END $$
            """
        )
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {channel}_notify()"
        )


def downgrade() -> None:
    for channel, table in (("cms_alarms", "alarms"), ("cms_actions", "actions")):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {channel}_notify()")
    op.drop_table("site_state")
    op.drop_table("actions")
    op.drop_table("alarm_media")
    op.drop_table("alarms")
