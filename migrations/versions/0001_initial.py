"""The initial schema.

Subjects and their samples, models and their versions, batches, forget requests, evaluations, and
the audit log: everything in the ORM models at the first release.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subjects",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_subjects"),
    )
    op.create_table(
        "models",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        # Its foreign key to model_versions is added below, once that table exists.
        sa.Column("deployed_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_models"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        # Its foreign key to batches is added below, once that table exists.
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("excluded_sample_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_model_versions_model_name_models"),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"
        ),
    )
    op.create_index("ix_model_versions_model_name", "model_versions", ["model_name"])
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=False),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_batches_model_name_models"),
        sa.ForeignKeyConstraint(
            ["parent_version_id"], ["model_versions.id"], name="fk_batches_parent_version_id_model_versions"
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"], ["model_versions.id"], name="fk_batches_result_version_id_model_versions"
        ),
    )
    op.create_index("ix_batches_model_name", "batches", ["model_name"])
    # One running batch per model, whatever the broker delivers twice.
    op.create_index(
        "uq_batches_one_running_per_model",
        "batches",
        ["model_name"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("dataset_index", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("forgotten_by_version_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name="fk_samples_subject_id_subjects"),
        sa.ForeignKeyConstraint(
            ["forgotten_by_version_id"],
            ["model_versions.id"],
            name="fk_samples_forgotten_by_version_id_model_versions",
        ),
    )
    op.create_index("ix_samples_subject_id", "samples", ["subject_id"])
    op.create_index("uq_samples_dataset_index", "samples", ["dataset", "dataset_index"], unique=True)
    op.create_table(
        "forget_requests",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("completed_version_id", sa.Integer(), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_forget_requests"),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name="fk_forget_requests_subject_id_subjects"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_forget_requests_model_name_models"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_forget_requests_batch_id_batches"),
        sa.ForeignKeyConstraint(
            ["completed_version_id"],
            ["model_versions.id"],
            name="fk_forget_requests_completed_version_id_model_versions",
        ),
    )
    op.create_index("ix_forget_requests_subject_id", "forget_requests", ["subject_id"])
    op.create_index("ix_forget_requests_batch_id", "forget_requests", ["batch_id"])
    op.create_index("ix_forget_requests_model_status", "forget_requests", ["model_name", "status"])
    op.create_table(
        "forget_request_samples",
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "sample_id", name="pk_forget_request_samples"),
        sa.ForeignKeyConstraint(
            ["request_id"], ["forget_requests.id"], name="fk_forget_request_samples_request_id_forget_requests"
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_forget_request_samples_sample_id_samples"),
    )
    op.create_index("ix_forget_request_samples_sample_id", "forget_request_samples", ["sample_id"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("reference_id", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reference_metrics", sa.JSON(), nullable=False),
        sa.Column("gaps", sa.JSON(), nullable=False),
        sa.Column("forget_count", sa.Integer(), nullable=False),
        sa.Column("retain_count", sa.Integer(), nullable=False),
        sa.Column("test_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], name="fk_evaluations_version_id_model_versions"),
        sa.ForeignKeyConstraint(
            ["reference_id"], ["model_versions.id"], name="fk_evaluations_reference_id_model_versions"
        ),
    )
    op.create_index("ix_evaluations_version_id", "evaluations", ["version_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sa.UniqueConstraint("entry_hash", name="uq_audit_log_entry_hash"),
    )

    # The two foreign keys that close a cycle (a model points at its deployed version, a version
    # at the batch that made it). Batch mode, because SQLite cannot ALTER TABLE ADD CONSTRAINT: it
    # rebuilds the table there, and is a plain ALTER TABLE on PostgreSQL.
    with op.batch_alter_table("models") as batch:
        batch.create_foreign_key("fk_models_deployed_version", "model_versions", ["deployed_version_id"], ["id"])
    with op.batch_alter_table("model_versions") as batch:
        batch.create_foreign_key("fk_model_versions_batch", "batches", ["batch_id"], ["id"])


def downgrade() -> None:
    # Break the cycle first, or neither models nor model_versions can be dropped.
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("fk_model_versions_batch", type_="foreignkey")
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("fk_models_deployed_version", type_="foreignkey")
    for table in (
        "audit_log",
        "evaluations",
        "forget_request_samples",
        "forget_requests",
        "samples",
        "batches",
        "model_versions",
        "models",
        "subjects",
    ):
        op.drop_table(table)
