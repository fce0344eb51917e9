"""API keys, idempotency records, and indexes for the list filters.

- api_keys: callers' credentials, stored hashed, with a role and optionally one model.
- idempotency_keys: the first response to a POST sent with an Idempotency-Key, per API key.
- indexes behind GET /forget-requests (status, time window) and GET /audit/log (action, object).

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_api_keys_model_name_models"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=False),
        sa.Column("response_body", sa.JSON(), nullable=False),
        sa.Column("forget_request_id", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("api_key_id", "key", name="pk_idempotency_keys"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name="fk_idempotency_keys_api_key_id_api_keys"),
        sa.ForeignKeyConstraint(
            ["forget_request_id"], ["forget_requests.id"], name="fk_idempotency_keys_forget_request_id_forget_requests"
        ),
    )
    op.create_index("ix_idempotency_keys_forget_request_id", "idempotency_keys", ["forget_request_id"])
    op.create_index("ix_forget_requests_status_received_at", "forget_requests", ["status", "received_at"])
    op.create_index("ix_forget_requests_received_at", "forget_requests", ["received_at"])
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_object", "audit_log", ["object_type", "object_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_object", table_name="audit_log")
    op.drop_index("ix_audit_log_action", table_name="audit_log")
    op.drop_index("ix_forget_requests_received_at", table_name="forget_requests")
    op.drop_index("ix_forget_requests_status_received_at", table_name="forget_requests")
    op.drop_index("ix_idempotency_keys_forget_request_id", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("api_keys")
