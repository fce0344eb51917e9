"""Held batches, per-model Q-MUL settings, artifact retention.

batches.hold_reason: why the quality gate held a batch's version; models.unlearn_config: Q-MUL
settings an admin chose for a model's next runs; model_versions.artifact_deleted_at: when the
retention policy deleted the artifact file. New batch statuses (held, discarded) need no schema
change: statuses are stored as strings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("hold_reason", sa.Text(), nullable=True))
    op.add_column("models", sa.Column("unlearn_config", sa.JSON(), nullable=True))
    op.add_column("model_versions", sa.Column("artifact_deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("artifact_deleted_at")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("unlearn_config")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("hold_reason")
