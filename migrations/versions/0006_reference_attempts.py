"""Reference requests count their failed attempts: after QFORGET_REFERENCE_MAX_ATTEMPTS one is closed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reference_requests") as table:
        table.add_column(sa.Column("failed_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("reference_requests") as table:
        table.drop_column("failed_attempts")
