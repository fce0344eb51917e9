"""The audit log is keyed, names no one, and refuses changes: every existing entry's hash becomes an
HMAC with the audit key, subject and sample ids in entries become their pseudonyms, and the
database refuses UPDATE and DELETE on the table (PostgreSQL: TRUNCATE too).

The entries are re-keyed with the key of the settings of the process that migrates (as env.py
takes the database URL): QFORGET_AUDIT_KEY, else the key kept in <QFORGET_DATA_DIR>/audit.key. Set
the one every process will use before migrating a log that has entries (docs/audit.md). An entry
that did not fit the old chain stays unfit in the new one. The pseudonyms cannot be undone: a
downgrade keeps them, and hashes the entries with plain sha256 again.

On SQLite the refusal is a pair of triggers; a later batch migration that rebuilds audit_log must
create them again (SQLite drops a table's triggers with it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import hashlib
import hmac
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import context, op

from service.core.audit_log import GENESIS_HASH, HASHED_FIELDS, entry_message
from service.core.pseudonyms import pseudonym
from service.core.settings import get_settings

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIT_LOG = sa.table(
    "audit_log",
    sa.column("id", sa.Integer),
    sa.column("prev_hash", sa.String),
    sa.column("entry_hash", sa.String),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("object_type", sa.String),
    sa.column("object_id", sa.String),
    sa.column("details", sa.JSON),
)
# Entries re-hashed per round trip: the memory a migration of a long log needs stays bounded.
PAGE = 5000
Digest = Callable[[bytes], str]  # an entry's hash from the bytes it covers (entry_message)

POSTGRESQL_REFUSAL = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"""
SQLITE_REFUSAL = [
    f"CREATE TRIGGER audit_log_no_{operation.lower()} BEFORE {operation} ON audit_log "
    f"BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: {operation} refused'); END"
    for operation in ("UPDATE", "DELETE")
]


def upgrade() -> None:
    if context.is_offline_mode():
        raise RuntimeError("migration 0008 re-hashes the audit log's entries: run it on the database, not as --sql")
    connection = op.get_bind()
    if _has_entries(connection):
        key = get_settings().audit_secret
        _rechain(connection, _sha256, _hmac(key), lambda details: _pseudonymised(details, key))
    if connection.dialect.name == "postgresql":
        op.execute(POSTGRESQL_REFUSAL)
    else:
        for statement in SQLITE_REFUSAL:
            op.execute(statement)


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER audit_log_no_update")
        op.execute("DROP TRIGGER audit_log_no_delete")
    if _has_entries(connection):
        _rechain(connection, _hmac(get_settings().audit_secret), _sha256, lambda details: details)


def _has_entries(connection: sa.Connection) -> bool:
    # Only a log with entries needs the key: an empty database migrates without one.
    return connection.scalar(sa.select(AUDIT_LOG.c.id).limit(1)) is not None


def _sha256(message: bytes) -> str:
    return hashlib.sha256(message).hexdigest()


def _hmac(key: bytes) -> Digest:
    return lambda message: hmac.new(key, message, hashlib.sha256).hexdigest()


def _pseudonymised(details: dict, key: bytes) -> dict:
    """The entry's details with its subject id and sample ids replaced by their pseudonyms."""
    details = dict(details)
    if "subject_id" in details:
        details["subject_pseudonym"] = pseudonym(key, "subject", details.pop("subject_id"))
    if "sample_ids" in details:
        details["sample_pseudonyms"] = [pseudonym(key, "sample", sample_id) for sample_id in details.pop("sample_ids")]
    return details


def _rechain(connection: sa.Connection, old_digest: Digest, new_digest: Digest,
             rewrite: Callable[[dict], dict]) -> None:
    """Chain every entry again from the first, its details rewritten, hashing with `new_digest`
    instead of `old_digest`. An entry that did not fit the old chain does not fit the new one
    either (its hash, or its link to its predecessor, is kept as it was): re-keying hides nothing
    that was done to the log before."""
    # The parameters name the columns to set (prev_hash, entry_hash, details) and entry_id.
    update = sa.update(AUDIT_LOG).where(AUDIT_LOG.c.id == sa.bindparam("entry_id"))
    old_prev = new_prev = GENESIS_HASH
    last_id = 0
    while True:
        page = connection.execute(
            sa.select(AUDIT_LOG).where(AUDIT_LOG.c.id > last_id).order_by(AUDIT_LOG.c.id).limit(PAGE)
        ).all()
        if not page:
            return
        rows = []
        for entry in page:
            fields = {name: entry._mapping[name] for name in HASHED_FIELDS if name != "prev_hash"}
            linked = entry.prev_hash == old_prev
            intact = entry.entry_hash == old_digest(entry_message(prev_hash=entry.prev_hash, **fields))
            fields["details"] = rewrite(fields["details"])
            prev_hash = new_prev if linked else entry.prev_hash
            entry_hash = new_digest(entry_message(prev_hash=prev_hash, **fields)) if intact else entry.entry_hash
            rows.append({"entry_id": entry.id, "prev_hash": prev_hash, "entry_hash": entry_hash,
                         "details": fields["details"]})
            old_prev, new_prev = entry.entry_hash, entry_hash
        connection.execute(update, rows)
        last_id = page[-1].id
