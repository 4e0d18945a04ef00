"""the forwarding outbox (deliveries) and one sender per forwarder (forwarder_leases)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), primary_key=True),
        sa.Column("forwarder", sa.Text(), nullable=False),
        sa.Column(
            "alarm_id",
            sa.BigInteger(),
            sa.ForeignKey("alarms.id", ondelete="CASCADE", name="deliveries_alarm_id_fkey"),
            nullable=False,
        ),
        sa.Column("state", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("seq", sa.Integer()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("first_sent_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("last_answer", sa.Text()),
        sa.Column("last_error", sa.Text()),
        sa.UniqueConstraint("forwarder", "alarm_id", name="deliveries_forwarder_alarm_id_key"),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name="deliveries_state_check"
        ),
    )
    op.create_index(
        "deliveries_pending_idx",
        "deliveries",
        ["forwarder", "id"],
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "forwarder_leases",
        sa.Column("forwarder", sa.Text(), primary_key=True),
        sa.Column("owner", sa.Text()),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("next_seq", sa.Integer(), nullable=False, server_default="1"),
    )


def downgrade() -> None:
    op.drop_table("forwarder_leases")
    op.drop_index("deliveries_pending_idx", table_name="deliveries")
    op.drop_table("deliveries")
