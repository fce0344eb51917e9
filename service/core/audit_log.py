"""The audit log: every state change appends one entry, hash-chained (docs/design.md, invariant 5).

Each entry's hash covers its predecessor's hash and its own contents, so editing, inserting or
deleting an entry anywhere but at the end breaks the chain at the first entry after the change.
(Deleting the newest entries, or rewriting the whole chain, needs the head hash kept elsewhere.)

Appenders must not interleave between reading the newest entry and inserting after it, or two
entries would share a predecessor. PostgreSQL: an advisory lock held to the end of the
transaction. SQLite: every transaction already holds the write lock (service.core.db, BEGIN IMMEDIATE).
Call `append_audit` in the same transaction as the change it records, as late as possible: the
lock serialises every appender until that transaction ends.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from service.core.models import AuditEntry, as_utc, utcnow

GENESIS_HASH = "0" * 64
# Any constant will do; every appender takes the same one.
AUDIT_LOCK_KEY = 0x716F7267_0002
# The fields an entry's hash covers, in order.
HASHED_FIELDS = ("prev_hash", "created_at", "actor", "action", "object_type", "object_id", "details")


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    first_broken_id: int | None = None
    reason: str | None = None


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_time(moment: datetime) -> str:
    # SQLite returns naive UTC, PostgreSQL aware datetimes in the session's time zone: hash the
    # same UTC text for both, to the microsecond (what both store).
    return as_utc(moment).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    *,
    prev_hash: str,
    created_at: datetime,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    details: dict,
) -> str:
    """The sha256 an entry with these fields must carry."""
    # Same order as HASHED_FIELDS.
    payload = [prev_hash, _canonical_time(created_at), actor, action, object_type, object_id, details]
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()


def append_audit(
    session: Session, *, actor: str, action: str, object_type: str, object_id: str, details: dict
) -> dict:
    """Append an entry to the chain inside the caller's transaction; it commits with the change.
    Returns the entry's fields as written (its hash, its time, ...)."""
    return append_audit_entries(
        session,
        [{"actor": actor, "action": action, "object_type": object_type, "object_id": object_id, "details": details}],
    )[0]


def append_audit_entries(session: Session, entries: list[dict]) -> list[dict]:
    """Append entries (each a dict of actor, action, object_type, object_id, details), in order,
    with one lock, one read of the newest hash and one executemany, whatever their number.
    Returns their fields as written."""
    if not entries:
        return []
    # Hash what will be read back: JSON turns tuples into lists and keys into strings. This also
    # rejects what JSON cannot hold (datetimes, NaN) here rather than at commit.
    contents = [{**entry, "details": json.loads(json.dumps(entry["details"], allow_nan=False))} for entry in entries]
    connection = session.connection()  # Core: none of the ORM's per-statement work
    if connection.dialect.name == "postgresql":
        connection.execute(_TAKE_LOCK)
    prev_hash = connection.scalar(_NEWEST_HASH) or GENESIS_HASH
    created_at = utcnow()
    rows = []
    for content in contents:
        fields = {"prev_hash": prev_hash, "created_at": created_at, **content}
        prev_hash = entry_hash(**fields)
        rows.append({**fields, "entry_hash": prev_hash})
    # One statement executed once per row, in list order, in this one session: the ids follow
    # the chain. (The same statement text for any number of rows: compiled and prepared once.)
    connection.execute(_INSERT_ENTRY, rows)
    return rows


_TAKE_LOCK = select(func.pg_advisory_xact_lock(AUDIT_LOCK_KEY))
_NEWEST_HASH = select(AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1)
_INSERT_ENTRY = insert(AuditEntry.__table__)


def verify_chain(session: Session) -> ChainReport:
    """Recompute the chain from the first entry; report the first entry that does not fit."""
    hashed = [getattr(AuditEntry, name) for name in HASHED_FIELDS]
    rows = session.execute(
        select(AuditEntry.id, AuditEntry.entry_hash, *hashed)
        .order_by(AuditEntry.id)
        .execution_options(yield_per=1000)
    )
    expected_prev = GENESIS_HASH
    entries = 0
    broken: tuple[int, str] | None = None
    for row in rows:
        entries += 1
        if broken is not None:
            continue  # keep counting: `entries` is the size of the whole log
        if row.prev_hash != expected_prev:
            broken = (row.id, "prev_hash is not the previous entry's hash: an entry before it was "
                              "removed, inserted or changed")
        elif row.entry_hash != entry_hash(**{name: row._mapping[name] for name in HASHED_FIELDS}):
            broken = (row.id, "entry_hash does not match the entry's contents: the entry was changed")
        expected_prev = row.entry_hash
    if broken is None:
        return ChainReport(ok=True, entries=entries)
    return ChainReport(ok=False, entries=entries, first_broken_id=broken[0], reason=broken[1])
