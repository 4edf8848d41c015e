"""The route of a request log row (chat, responses, messages, count_tokens)

Revision ID: 0004_request_log_api
Revises: 0003_token_classes
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_request_log_api"
down_revision = "0003_token_classes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        # Rows written before: the route was not recorded (null, not guessed).
        batch.add_column(sa.Column("api", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        batch.drop_column("api")
