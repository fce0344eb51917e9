"""Erasure per model: which model holds which sample, and a request's part for each model.

datasets: each data set's training-split size (registrations are checked against it);
forgotten_samples: per model, the samples it no longer holds (replaces the data-set-wide
samples.status, forgotten_at and forgotten_by_version_id); forget_request_parts: one per model a
request must be forgotten from, with the batch, version and time that did it (replaces
forget_requests.batch_id, completed_version_id and error); forget_requests.model_name becomes the
request's scope (None: every model holding the samples).

Existing data: a data set's size is taken as its highest registered index + 1; a model has
forgotten the samples its deployed version excludes; each request gets one part for its model.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import json
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("train_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_datasets"),
    )
    op.create_table(
        "forgotten_samples",
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model_name", "sample_id", name="pk_forgotten_samples"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_forgotten_samples_model_name_models"),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_forgotten_samples_sample_id_samples"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"],
                                name="fk_forgotten_samples_version_id_model_versions"),
    )
    op.create_index("ix_forgotten_samples_sample_id", "forgotten_samples", ["sample_id"])
    op.create_table(
        "forget_request_parts",
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("completed_version_id", sa.Integer(), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", "model_name", name="pk_forget_request_parts"),
        sa.ForeignKeyConstraint(["request_id"], ["forget_requests.id"],
                                name="fk_forget_request_parts_request_id_forget_requests"),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"], name="fk_forget_request_parts_model_name_models"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_forget_request_parts_batch_id_batches"),
        sa.ForeignKeyConstraint(["completed_version_id"], ["model_versions.id"],
                                name="fk_forget_request_parts_completed_version_id_model_versions"),
    )
    op.create_index("ix_forget_request_parts_batch_id", "forget_request_parts", ["batch_id"])
    op.create_index("ix_forget_request_parts_model_status", "forget_request_parts", ["model_name", "status"])

    connection = op.get_bind()
    now = datetime.now(timezone.utc)
    connection.execute(
        sa.text("INSERT INTO datasets (name, train_size, created_at) "
                "SELECT dataset, MAX(dataset_index) + 1, :now FROM samples GROUP BY dataset"),
        {"now": now},
    )
    _backfill_forgotten_samples(connection, now)
    connection.execute(sa.text(
        "INSERT INTO forget_request_parts (request_id, model_name, status, batch_id, completed_version_id, "
        "completed_at, error) SELECT id, model_name, status, batch_id, completed_version_id, completed_at, error "
        "FROM forget_requests"
    ))

    op.drop_index("ix_forget_requests_batch_id", table_name="forget_requests")
    op.drop_index("ix_forget_requests_model_status", table_name="forget_requests")
    with op.batch_alter_table("forget_requests") as table:
        table.drop_constraint("fk_forget_requests_batch_id_batches", type_="foreignkey")
        table.drop_constraint("fk_forget_requests_completed_version_id_model_versions", type_="foreignkey")
        table.drop_column("batch_id")
        table.drop_column("completed_version_id")
        table.drop_column("error")
        table.alter_column("model_name", existing_type=sa.String(64), nullable=True)
    with op.batch_alter_table("samples") as table:
        table.drop_constraint("fk_samples_forgotten_by_version_id_model_versions", type_="foreignkey")
        table.drop_column("status")
        table.drop_column("forgotten_at")
        table.drop_column("forgotten_by_version_id")


def _backfill_forgotten_samples(connection, now: datetime) -> None:
    """A model has forgotten what its deployed version excludes (the version lists them)."""
    forgotten_at = dict(connection.execute(sa.text(
        "SELECT id, COALESCE(forgotten_at, :now) FROM samples WHERE status = 'forgotten'"), {"now": now}).all())
    deployed = connection.execute(sa.text(
        "SELECT m.name, v.id, v.excluded_sample_ids FROM models m "
        "JOIN model_versions v ON v.id = m.deployed_version_id")).all()
    rows = []
    for model_name, version_id, excluded in deployed:
        if isinstance(excluded, str):  # SQLite hands JSON back as text through a plain text() query
            excluded = json.loads(excluded)
        rows += [{"model_name": model_name, "sample_id": sample_id, "forgotten_at": forgotten_at.get(sample_id, now),
                  "version_id": version_id} for sample_id in excluded or []]
    if rows:
        connection.execute(sa.text(
            "INSERT INTO forgotten_samples (model_name, sample_id, forgotten_at, version_id) "
            "VALUES (:model_name, :sample_id, :forgotten_at, :version_id)"), rows)


def downgrade() -> None:
    with op.batch_alter_table("samples") as table:
        table.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="active"))
        table.add_column(sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("forgotten_by_version_id", sa.Integer(), nullable=True))
        table.create_foreign_key("fk_samples_forgotten_by_version_id_model_versions", "model_versions",
                                 ["forgotten_by_version_id"], ["id"])
    with op.batch_alter_table("forget_requests") as table:
        table.add_column(sa.Column("batch_id", sa.Integer(), nullable=True))
        table.add_column(sa.Column("completed_version_id", sa.Integer(), nullable=True))
        table.add_column(sa.Column("error", sa.Text(), nullable=True))
        table.create_foreign_key("fk_forget_requests_batch_id_batches", "batches", ["batch_id"], ["id"])
        table.create_foreign_key("fk_forget_requests_completed_version_id_model_versions", "model_versions",
                                 ["completed_version_id"], ["id"])
    op.create_index("ix_forget_requests_batch_id", "forget_requests", ["batch_id"])
    op.create_index("ix_forget_requests_model_status", "forget_requests", ["model_name", "status"])
    op.drop_table("forget_request_parts")
    op.drop_table("forgotten_samples")
    op.drop_table("datasets")
