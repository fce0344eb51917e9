"""Per-sample audit evidence, membership score histograms, retrain reference requests.

sample_scores: a version's figures (correct, true-label confidence, attacker's membership call)
on one training sample, written by the workers; evaluations.score_histograms: the membership
score distributions of the forget and test splits; reference_requests: retrain references asked
for (by an admin or the schedule) and what became of them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("evaluations", sa.Column("score_histograms", sa.JSON(), nullable=True))
    op.create_table(
        "sample_scores",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("member", sa.Boolean(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version_id", "sample_id", name="pk_sample_scores"),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"], name="fk_sample_scores_version_id_model_versions"
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_sample_scores_sample_id_samples"),
    )
    op.create_index("ix_sample_scores_sample_id", "sample_scores", ["sample_id"])
    op.create_table(
        "reference_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("deployed_version_id", sa.Integer(), nullable=True),
        sa.Column("excluded_sample_count", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reference_version_id", sa.Integer(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reference_requests"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_reference_requests_model_name_models"),
        sa.ForeignKeyConstraint(
            ["deployed_version_id"], ["model_versions.id"],
            name="fk_reference_requests_deployed_version_id_model_versions",
        ),
        sa.ForeignKeyConstraint(
            ["reference_version_id"], ["model_versions.id"],
            name="fk_reference_requests_reference_version_id_model_versions",
        ),
    )
    op.create_index("ix_reference_requests_model_name", "reference_requests", ["model_name"])


def downgrade() -> None:
    op.drop_index("ix_reference_requests_model_name", table_name="reference_requests")
    op.drop_table("reference_requests")
    op.drop_index("ix_sample_scores_sample_id", table_name="sample_scores")
    op.drop_table("sample_scores")
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("score_histograms")
