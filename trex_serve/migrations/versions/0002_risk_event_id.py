"""risk_events.event_id: a unique id per event, so a redelivered stream entry is written once

Revision ID: 0002_risk_event_id
Revises: 0001_initial
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_risk_event_id"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("risk_events") as batch:
        batch.add_column(sa.Column("event_id", sa.String(64), nullable=True))
    op.create_index("ix_risk_events_event_id", "risk_events", ["event_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_risk_events_event_id", table_name="risk_events")
    with op.batch_alter_table("risk_events") as batch:
        batch.drop_column("event_id")
