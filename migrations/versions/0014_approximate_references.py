"""Approximate retrain references: model_versions.approximate.

A reference version trained on a coreset of the retain set (QFORGET_APPROXIMATE_REFERENCE_FRACTION)
is marked approximate: the audit uses it only until the full reference of the same state exists.
Every existing version is not (false).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("approximate", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("approximate")
