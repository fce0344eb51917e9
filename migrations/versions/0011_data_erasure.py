"""Erasure of the data copies: tombstones, erased requests and subjects, frozen evidence.

samples.erased_at: the tombstone data loading honours; forget_requests.erased_at: when the copies of
a completed request's samples were erased; subjects.erased_at: when a subject's last copy went (its
id is then replaced by its pseudonym); forget_request_parts.frozen_evidence and evidence_frozen_at:
a part's evidence kept as it stood before its samples were erased; a partial index on the completed
requests not erased yet, which the scheduler looks for every tick.

Existing data: nothing was erased yet, so every new column starts empty.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    for table in ("samples", "forget_requests", "subjects"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("erased_at", MOMENT, nullable=True))
    with op.batch_alter_table("forget_request_parts") as batch:
        batch.add_column(sa.Column("frozen_evidence", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("evidence_frozen_at", MOMENT, nullable=True))
    awaiting = sa.text("status = 'completed' AND erased_at IS NULL")
    op.create_index("ix_forget_requests_awaiting_erasure", "forget_requests", ["completed_at"],
                    sqlite_where=awaiting, postgresql_where=awaiting)


def downgrade() -> None:
    op.drop_index("ix_forget_requests_awaiting_erasure", table_name="forget_requests")
    with op.batch_alter_table("forget_request_parts") as batch:
        batch.drop_column("evidence_frozen_at")
        batch.drop_column("frozen_evidence")
    for table in ("subjects", "forget_requests", "samples"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("erased_at")
