"""A request's lifecycle beyond its parts: withdrawal, one deadline extension, linking.

forget_requests gains withdrawn_at and withdrawal_reason (a client withdrew it before any part was
batched), original_due_at, extended_at and extension_reason (its one extension, GDPR Art. 12(3)),
and linked_request_id (the subject's request it follows). The new status `withdrawn` needs no
type change: statuses are stored as strings of up to 16 characters, with no CHECK constraint.
Existing requests keep every new column empty.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-12
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LINK = "fk_forget_requests_linked_request_id_forget_requests"


def upgrade() -> None:
    # Batch mode: SQLite adds a column with a foreign key only by rebuilding the table.
    with op.batch_alter_table("forget_requests") as table:
        table.add_column(sa.Column("linked_request_id", sa.String(36), nullable=True))
        table.add_column(sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("withdrawal_reason", sa.Text(), nullable=True))
        table.add_column(sa.Column("original_due_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("extended_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("extension_reason", sa.Text(), nullable=True))
        table.create_foreign_key(LINK, "forget_requests", ["linked_request_id"], ["id"])


def downgrade() -> None:
    _refuse_what_the_older_schema_cannot_hold(op.get_bind())
    with op.batch_alter_table("forget_requests") as table:
        table.drop_constraint(LINK, type_="foreignkey")
        table.drop_column("extension_reason")
        table.drop_column("extended_at")
        table.drop_column("original_due_at")
        table.drop_column("withdrawal_reason")
        table.drop_column("withdrawn_at")
        table.drop_column("linked_request_id")


def _refuse_what_the_older_schema_cannot_hold(connection: sa.Connection) -> None:
    """The code before this revision knows no withdrawn status, and never settles an open request
    without parts (one that follows another): turning either into something it knows would run an
    erasure the subject withdrew, or leave one open for ever. Such rows stop the downgrade instead."""
    withdrawn = connection.scalar(sa.text("SELECT COUNT(*) FROM forget_requests WHERE status = 'withdrawn'"))
    following = connection.scalar(sa.text(
        "SELECT COUNT(*) FROM forget_requests r WHERE r.status IN ('pending', 'batched') "
        "AND NOT EXISTS (SELECT 1 FROM forget_request_parts p WHERE p.request_id = r.id)"))
    if withdrawn or following:
        raise RuntimeError(
            f"cannot downgrade below 0010: {withdrawn} withdrawn requests and {following} open requests without "
            "parts of their own, which the older schema cannot represent"
        )
