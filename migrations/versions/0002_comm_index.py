"""a partial index to find each site's newest comm_lost / comm_restored at start

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "alarms_comm_idx",
        "alarms",
        ["site_id", "id"],
        postgresql_where=sa.text("event_type IN ('comm_lost', 'comm_restored')"),
    )


def downgrade() -> None:
    op.drop_index("alarms_comm_idx", table_name="alarms")
