"""Stored responses (GET /v1/responses/{id}, previous_response_id) and the response cache: a table of
encrypted responses, a key's default cache time-to-live, a request log row's cache verdict

Revision ID: 0005_stored_responses
Revises: 0004_request_log_api
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_stored_responses"
# After 0004 (the request log's route), not beside it: two revisions on 0003 would be two heads,
# and `upgrade head` refuses to start with two.
down_revision = "0004_request_log_api"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("previous_response_id", sa.String(128), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "id"),
    )
    op.create_index("ix_stored_responses_expires_at", "stored_responses", ["expires_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("cache_ttl_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("request_logs") as batch:
        batch.add_column(sa.Column("cache", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        batch.drop_column("cache")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("cache_ttl_s")
    op.drop_index("ix_stored_responses_expires_at", table_name="stored_responses")
    op.drop_table("stored_responses")
