"""Instant erasure for semi-parametric models (SPM): a forget request's part first takes effect by
removing its samples from the model's datastore, before the batch unlearns the encoder.

models.semi_parametric: whether the model is an SPM (its spec has "spm"); intake asks it so that a
request to such a model wakes the instant stage at once. Existing models are not (false).

forget_request_parts.instant_version_id / instant_at: the version whose datastore no longer holds
the part's samples, deployed when; NULL until then, and for every part of a parametric model. A
part's status may now also be `instant` (pending, with the instant stage done): a plain string
column, so no change of type.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("semi_parametric", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("forget_request_parts") as batch:
        batch.add_column(sa.Column("instant_version_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("instant_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key("fk_forget_request_parts_instant_version_id_model_versions", "model_versions",
                                 ["instant_version_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("forget_request_parts") as batch:
        batch.drop_constraint("fk_forget_request_parts_instant_version_id_model_versions", type_="foreignkey")
        batch.drop_column("instant_at")
        batch.drop_column("instant_version_id")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("semi_parametric")
