"""Token classes: a request log row's cache and reasoning tokens, a charge's tokens by class

Revision ID: 0003_token_classes
Revises: 0002_risk_event_id
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_token_classes"
down_revision = "0002_risk_event_id"
branch_labels = None
depends_on = None

_LOG_COLUMNS = ("tokens_cache_read", "tokens_cache_write", "tokens_cache_write_1h", "tokens_reasoning")


def upgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        for name in _LOG_COLUMNS:
            # Rows written before the classes existed: every token counted as its total's class.
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("tokens", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("tokens")
    with op.batch_alter_table("request_logs") as batch:
        for name in _LOG_COLUMNS:
            batch.drop_column(name)
