"""The per-sample evidence compares a version with its reference on the logit-scaled confidence.

sample_scores.confidence_logit: log(p / (1 - p)) of the true label, as the worker computed it from
every class's probability (the stored probability alone rounds to 1 for confident samples, where
the logit is still finite). One float per version and sample, the same size as `confidence`.

Existing data: the workers kept no logit before, so existing rows stay NULL; the evidence reports
the comparison only on samples both versions have it for, until the next evaluation rewrites them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sample_scores") as batch:
        batch.add_column(sa.Column("confidence_logit", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sample_scores") as batch:
        batch.drop_column("confidence_logit")
