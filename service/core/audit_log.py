"""The audit log: every state change appends one entry, hash-chained with a secret key and anchored
outside the database (docs/design.md, invariant 5; docs/audit.md).

Each entry's hash is an HMAC-SHA256, under the audit key (QFORGET_AUDIT_KEY), of its predecessor's
hash and its own contents. Editing, inserting or deleting an entry breaks the chain at the first
entry after the change, and whoever holds the database but not the key cannot compute the hashes
that would mend it. What a chain cannot show by itself, its newest entries cut off or every entry
gone, its checkpoints show: signed records of the chain's head (entry count, last id, head hash,
time) appended to a file in the model store, out of the database's reach. One is written after
each transaction that deployed a version, that took the log's ids past a multiple of
CHECKPOINT_EVERY_ENTRIES, or that found the newest checkpoint older than CHECKPOINT_EVERY_SECONDS
(or none): the entries a cut can remove unseen are at most those of the last minute before a pause,
or the last thousand; a deployment is anchored at once. `verify_chain` checks the table against
every checkpoint. The database itself refuses UPDATE and DELETE on the table (migration 0008): to
tamper, one must first disable that.

The key and the checkpoint file reach every appender with its engine: service.core.db.get_engine
(settings) sets them (an AuditLogConfig) as the engine's execution option "audit_log", which every
connection and Session made from that engine inherits; `append_audit` and `verify_chain` read it
from the session's connection, so their callers (the API, the workers, the CLI) pass nothing. A
session whose engine carries none cannot append (AuditLogNotConfigured), rather than write entries
that no one could verify.

Appenders must not interleave between reading the newest entry and inserting after it, or two
entries would share a predecessor. PostgreSQL: an advisory lock held to the end of the
transaction. SQLite: every transaction already holds the write lock (service.core.db, BEGIN IMMEDIATE).
Call `append_audit` in the same transaction as the change it records, as late as possible: the
lock serialises every appender until that transaction ends. Appenders commit in id order, so the
committed log is always a prefix of the chain: what a checkpoint records stays true.

Details name no one: a subject or sample id is recorded as its pseudonym (service.core.pseudonyms,
with the key `audit_key(session)` gives).
"""

import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Connection, event, func, insert, select
from sqlalchemy.orm import Session

from service.core.models import AuditEntry, as_utc, utcnow
from service.core.settings import Settings

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# Any constant will do; every appender takes the same one.
AUDIT_LOCK_KEY = 0x716F7267_0002
# The fields an entry's hash covers, in order.
HASHED_FIELDS = ("prev_hash", "created_at", "actor", "action", "object_type", "object_id", "details")
# The execution option of an engine that carries its AuditLogConfig.
AUDIT_OPTION = "audit_log"
# A checkpoint at least this often: entries appended since the newest one can be cut unseen. Each
# costs a count of the log's entries, after the commit, and one line of the file (the minute's rule
# adds at most 1,440 lines a day).
CHECKPOINT_EVERY_ENTRIES = 1000
CHECKPOINT_EVERY_SECONDS = 60.0
# A deployment is checkpointed at once: a deployed version is what the log's evidence is about.
CHECKPOINTED_ACTIONS = frozenset({"model.deployed", "model.rolled_back"})


class AuditLogNotConfigured(RuntimeError):
    """The session's engine carries no audit key (see the module's docstring)."""


@dataclass(frozen=True)
class AuditLogConfig:
    """What appending to and verifying the log needs besides the database."""

    key: bytes = field(repr=False)
    checkpoint_file: Path
    checkpoint_every_entries: int = CHECKPOINT_EVERY_ENTRIES
    checkpoint_every_seconds: float = CHECKPOINT_EVERY_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> "AuditLogConfig":
        return cls(key=settings.audit_secret,
                   checkpoint_file=Path(settings.model_store) / "audit" / "log-checkpoints.jsonl")


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    first_broken_id: int | None = None
    reason: str | None = None
    checkpoints: int = 0  # the signed checkpoints the log was checked against


@dataclass(frozen=True)
class Checkpoint:
    """The chain's head at one moment: `entries` entries, the newest `last_id` with `head_hash`."""

    entries: int
    last_id: int
    head_hash: str
    at: str  # UTC, ISO 8601

    def signature(self, key: bytes) -> str:
        # Its own prefix: no checkpoint's message is an entry's (a JSON list) or a pseudonym's.
        return hmac.new(key, b"qforget-audit-checkpoint\n" + _canonical_json(asdict(self)).encode(),
                        hashlib.sha256).hexdigest()


def audit_config(connection: Connection) -> AuditLogConfig:
    """The AuditLogConfig the connection's engine carries."""
    config = connection.get_execution_options().get(AUDIT_OPTION)
    if config is None:
        raise AuditLogNotConfigured(
            "this session's engine carries no audit key: make it with service.core.db.get_engine(settings), "
            "or make_engine(url, name, audit=AuditLogConfig.from_settings(settings))")
    return config


def audit_key(session: Session) -> bytes:
    """The audit key of the session's engine: the key of the pseudonyms that audit details record."""
    return audit_config(session.connection()).key


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_time(moment: datetime) -> str:
    # SQLite returns naive UTC, PostgreSQL aware datetimes in the session's time zone: hash the
    # same UTC text for both, to the microsecond (what both store).
    return as_utc(moment).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_message(
    *,
    prev_hash: str,
    created_at: datetime,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    details: dict,
) -> bytes:
    """What an entry's hash covers: its HASHED_FIELDS, in order, as canonical JSON."""
    return _canonical_json(
        [prev_hash, _canonical_time(created_at), actor, action, object_type, object_id, details]
    ).encode()


def entry_hash(key: bytes, **fields) -> str:
    """The HMAC-SHA256 under `key` that an entry with these fields (HASHED_FIELDS) must carry."""
    return hmac.new(key, entry_message(**fields), hashlib.sha256).hexdigest()


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
    with one lock, one read of the newest entry and one executemany, whatever their number.
    Returns their fields as written."""
    if not entries:
        return []
    # Hash what will be read back: JSON turns tuples into lists and keys into strings. This also
    # rejects what JSON cannot hold (datetimes, NaN) here rather than at commit.
    contents = [{**entry, "details": json.loads(json.dumps(entry["details"], allow_nan=False))} for entry in entries]
    connection = session.connection()  # Core: none of the ORM's per-statement work
    config = audit_config(connection)
    if connection.dialect.name == "postgresql":
        connection.execute(_TAKE_LOCK)
    newest = connection.execute(_NEWEST_ENTRY).first()
    prev_hash = newest.entry_hash if newest else GENESIS_HASH
    created_at = utcnow()
    rows = []
    for content in contents:
        fields = {"prev_hash": prev_hash, "created_at": created_at, **content}
        prev_hash = entry_hash(config.key, **fields)
        rows.append({**fields, "entry_hash": prev_hash})
    # One statement executed once per row, in list order, in this one session: the ids follow
    # the chain. (The same statement text for any number of rows: compiled and prepared once.)
    connection.execute(_INSERT_ENTRY, rows)
    if _checkpoint_due(config, newest.id if newest else 0, contents):
        session.info[_CHECKPOINT_AFTER_COMMIT] = connection.engine
    return rows


_TAKE_LOCK = select(func.pg_advisory_xact_lock(AUDIT_LOCK_KEY))
_NEWEST_ENTRY = select(AuditEntry.id, AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1)
_INSERT_ENTRY = insert(AuditEntry.__table__)
# One statement, so one snapshot: the count is the newest entry's position in the chain.
_HEAD_AND_COUNT = (
    select(AuditEntry.id, AuditEntry.entry_hash, select(func.count()).select_from(AuditEntry).scalar_subquery())
    .order_by(AuditEntry.id.desc())
    .limit(1)
)
# session.info key: the engine to checkpoint through once the session's transaction has committed.
_CHECKPOINT_AFTER_COMMIT = "audit_log.checkpoint_after_commit"


def _checkpoint_due(config: AuditLogConfig, newest_id: int, entries: list[dict]) -> bool:
    # The new ids follow newest_id. A rolled-back append leaves a gap in the ids (PostgreSQL): a
    # multiple that falls in it is skipped, and the next one checkpoints.
    every = config.checkpoint_every_entries
    if (newest_id + len(entries)) // every > newest_id // every:
        return True
    if any(entry["action"] in CHECKPOINTED_ACTIONS for entry in entries):
        return True
    # The file's modification time is its newest checkpoint's, shared by every process that appends.
    # A stale one is touched at once, under the audit lock: the transactions right after this one,
    # which may commit before its checkpoint is written, do not checkpoint as well.
    try:
        if time.time() - config.checkpoint_file.stat().st_mtime < config.checkpoint_every_seconds:
            return False
        os.utime(config.checkpoint_file)
    except OSError:
        pass  # no file yet (the checkpoint makes it), or not writable (the checkpoint logs why)
    return True


@event.listens_for(Session, "after_commit")
def _checkpoint_after_commit(session: Session) -> None:
    # After the commit, not before: a checkpoint must name only entries that exist, and it is
    # written outside the audit lock.
    engine = session.info.pop(_CHECKPOINT_AFTER_COMMIT, None)
    if engine is None:
        return
    try:
        with engine.connect() as connection:
            write_checkpoint(connection)
    except Exception:  # the change is committed: a missing checkpoint must not turn it into an error
        log.exception("audit log checkpoint not written; a later one will cover these entries")


@event.listens_for(Session, "after_rollback")
def _no_checkpoint_after_rollback(session: Session) -> None:
    session.info.pop(_CHECKPOINT_AFTER_COMMIT, None)


def write_checkpoint(connection: Connection) -> Checkpoint | None:
    """Append a signed checkpoint of the committed chain's head to the checkpoint file; returns it
    (None for an empty log, which has nothing to anchor)."""
    config = audit_config(connection)
    head = connection.execute(_HEAD_AND_COUNT).first()
    if head is None:
        return None
    last_id, head_hash, entries = head
    checkpoint = Checkpoint(entries=entries, last_id=last_id, head_hash=head_hash, at=_canonical_time(utcnow()))
    line = _canonical_json({**asdict(checkpoint), "signature": checkpoint.signature(config.key)}) + "\n"
    config.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
    # One write to a file opened for appending: lines of processes that checkpoint at once never mix.
    descriptor = os.open(config.checkpoint_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return checkpoint


def read_checkpoints(config: AuditLogConfig) -> tuple[list[Checkpoint], str | None]:
    """The checkpoints of the checkpoint file (none if there is no file yet), up to the first line
    that is not a checkpoint signed with the key, and what is wrong with that line."""
    try:
        lines = config.checkpoint_file.read_text().splitlines()
    except FileNotFoundError:
        return [], None
    except OSError as error:
        return [], f"the checkpoint file cannot be read: {error.strerror or error}"
    checkpoints = []
    for number, line in enumerate(lines, start=1):
        try:
            fields = json.loads(line)
            signature = fields.pop("signature")
            checkpoint = Checkpoint(**fields)
            signed = hmac.compare_digest(signature, checkpoint.signature(config.key))
        except (ValueError, TypeError, KeyError, AttributeError):
            return checkpoints, f"line {number} of the checkpoint file is not a checkpoint"
        if not signed:
            return checkpoints, (f"line {number} of the checkpoint file is not signed with the audit key: "
                                 "it was edited, or written with another key")
        checkpoints.append(checkpoint)
    return checkpoints, None


def verify_chain(session: Session) -> ChainReport:
    """Recompute the chain from the first entry with the audit key, then check the table against
    every checkpoint; report the first entry that does not fit, else the first checkpoint the
    table no longer meets (its entry missing or changed: the log was cut, wiped or rewritten)."""
    config = audit_config(session.connection())
    # Read before the table: every checkpoint read then names entries this scan will see.
    checkpoints, checkpoint_problem = read_checkpoints(config)
    checkpointed_ids = {checkpoint.last_id for checkpoint in checkpoints}
    at_checkpointed: dict[int, tuple[str, int]] = {}  # id -> its hash, and the entries up to it
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
        if row.id in checkpointed_ids:
            at_checkpointed[row.id] = (row.entry_hash, entries)
        if broken is not None:
            continue  # keep counting: `entries` is the size of the whole log
        if row.prev_hash != expected_prev:
            broken = (row.id, ("prev_hash is not the previous entry's hash: an entry before it was "
                               "removed, inserted or changed"))
        elif row.entry_hash != entry_hash(config.key, **{name: row._mapping[name] for name in HASHED_FIELDS}):
            broken = (row.id, ("entry_hash does not match the entry's contents under the audit key: the entry "
                               "was changed, or hashed without the key"))
        expected_prev = row.entry_hash
    if broken is None:
        broken = next(((checkpoint.last_id, problem) for checkpoint in sorted(checkpoints, key=lambda c: c.last_id)
                       if (problem := _unmet(checkpoint, at_checkpointed.get(checkpoint.last_id)))), None)
    if broken is not None:
        return ChainReport(ok=False, entries=entries, first_broken_id=broken[0], reason=broken[1],
                           checkpoints=len(checkpoints))
    if checkpoint_problem is not None:
        return ChainReport(ok=False, entries=entries, reason=checkpoint_problem, checkpoints=len(checkpoints))
    return ChainReport(ok=True, entries=entries, checkpoints=len(checkpoints))


def _unmet(checkpoint: Checkpoint, found: tuple[str, int] | None) -> str | None:
    """What is wrong with the log, given what it holds at the checkpoint's entry; None if nothing."""
    recorded = f"the checkpoint of {checkpoint.at} recorded it as entry number {checkpoint.entries}"
    if found is None:
        return f"entry {checkpoint.last_id} is missing, but {recorded}: the log was cut or wiped"
    head_hash, entries = found
    if head_hash != checkpoint.head_hash:
        return f"entry {checkpoint.last_id} is not the one {recorded}: the log was rewritten"
    if entries != checkpoint.entries:
        return f"entry {checkpoint.last_id} is entry number {entries}, but {recorded}: entries before it were removed"
    return None
