"""The audit log: a chain keyed with the audit key, appended in order, anchored by signed
checkpoints in the model store, refused UPDATE and DELETE by the database; and every tampering of
someone who has the database but not the key (edit, middle delete, tail cut, wipe, re-hashing)
found by verify_chain."""

import hashlib
import hmac
import json
import math
import os
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from service.core.audit_log import (
    AUDIT_OPTION,
    GENESIS_HASH,
    HASHED_FIELDS,
    AuditLogConfig,
    AuditLogNotConfigured,
    append_audit,
    append_audit_entries,
    audit_config,
    entry_hash,
    entry_message,
    read_checkpoints,
    verify_chain,
    write_checkpoint,
)
from service.core.db import make_engine, session_factory, transaction
from service.core.models import AuditEntry
from service.core.settings import Settings


def append(engine, count: int, action: str = "request.received") -> list[int]:
    """Appends `count` entries in one transaction; returns their ids."""
    with transaction(engine) as session:
        for i in range(count):
            append_audit(
                session, actor="test", action=action, object_type="forget_request",
                object_id=f"r{i}", details={"i": i, "note": "ünïcode"},
            )
        return list(session.scalars(select(AuditEntry.id).order_by(AuditEntry.id.desc()).limit(count)))[::-1]


def verify(engine):
    with session_factory(engine)() as session:
        return verify_chain(session)


def config_of(engine) -> AuditLogConfig:
    with engine.connect() as connection:
        return audit_config(connection)


def checkpoints(engine) -> list[tuple[int, int]]:
    """(entries, last id) of every checkpoint in the file, in the order written."""
    found, problem = read_checkpoints(config_of(engine))
    assert problem is None
    return [(checkpoint.entries, checkpoint.last_id) for checkpoint in found]


def tamper(engine, *statements: str) -> None:
    """Run statements as someone with the database would: first turn off its refusal of UPDATE
    and DELETE (PostgreSQL: disabled and enabled again in the same transaction; SQLite: dropped)."""
    with engine.begin() as connection:
        postgresql = connection.dialect.name == "postgresql"
        if postgresql:
            connection.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
        else:
            connection.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
            connection.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
        for statement in statements:
            connection.execute(text(statement))
        if postgresql:
            connection.execute(text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only"))


def rehash_after(engine, deleted_id: int, digest) -> None:
    """Delete an entry, then chain every later one again onto its predecessor with `digest` (a
    function of the bytes an entry's hash covers): the tampering the keyed hash exists to stop."""
    tamper(engine, f"DELETE FROM audit_log WHERE id = {deleted_id}")
    with session_factory(engine)() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    updates, prev_hash = [], GENESIS_HASH
    for entry in entries:
        if entry.id > deleted_id:
            fields = {name: getattr(entry, name) for name in HASHED_FIELDS} | {"prev_hash": prev_hash}
            updates.append((entry.id, prev_hash, digest(entry_message(**fields))))
            prev_hash = updates[-1][2]
        else:
            prev_hash = entry.entry_hash
    tamper(engine, *(f"UPDATE audit_log SET prev_hash = '{prev}', entry_hash = '{new}' WHERE id = {entry_id}"
                     for entry_id, prev, new in updates))


def test_entries_chain_from_the_genesis_hash(engine):
    append(engine, 2)
    append(engine, 1)
    with session_factory(engine)() as session:
        entries = session.query(AuditEntry).order_by(AuditEntry.id).all()
    assert entries[0].prev_hash == GENESIS_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash for e in entries[:-1]]
    assert verify(engine).ok and verify(engine).entries == 3


def test_an_empty_log_verifies(engine):
    report = verify(engine)
    assert (report.ok, report.entries, report.first_broken_id, report.checkpoints) == (True, 0, None, 0)


def test_the_hash_is_an_hmac_with_the_key_of_what_the_database_returns(engine, settings):
    with transaction(engine) as session:
        written = append_audit(session, actor="a", action="b", object_type="c", object_id="d", details={"x": [1.5]})
        written_at, written_hash = written["created_at"], written["entry_hash"]
    with session_factory(engine)() as session:
        stored = session.scalars(select(AuditEntry)).one()
    # SQLite returns it naive, PostgreSQL aware: the same instant to the microsecond either way.
    assert stored.created_at.replace(tzinfo=stored.created_at.tzinfo or timezone.utc) == written_at
    fields = {name: getattr(stored, name) for name in HASHED_FIELDS}
    assert entry_hash(settings.audit_secret, **fields) == written_hash
    # Not recomputable without the key: neither plain sha256 nor another key gives it.
    assert hashlib.sha256(entry_message(**fields)).hexdigest() != written_hash
    assert entry_hash(b"k" * 32, **fields) != written_hash


def test_the_key_is_made_once_and_kept_readable_by_its_owner_only(settings):
    key = settings.audit_secret
    path = settings.data_dir / "audit.key"
    assert len(key) == 64 and path.read_bytes().strip() == key
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert settings.audit_secret == key  # the same key on every use, and in every process that reads it


@pytest.mark.parametrize(
    ("key", "message"),
    [(None, "QFORGET_AUDIT_KEY: production needs the audit log's secret key"),
     ("", "QFORGET_AUDIT_KEY: production needs the audit log's secret key"),
     ("short", "QFORGET_AUDIT_KEY: at least 32 characters")],
    ids=["unset", "empty", "short"],
)
def test_production_refuses_to_start_without_a_real_key(tmp_path, key, message):
    with pytest.raises(ValidationError, match=message):
        Settings(environment="production", database_url="postgresql+psycopg://db/qforget", data_dir=tmp_path,
                 audit_key=key, _env_file=None)
    assert not (tmp_path / "audit.key").exists()  # never a key made up in production


def test_an_engine_without_the_key_cannot_append(database_url):
    engine = make_engine(database_url, "test")
    try:
        with pytest.raises(AuditLogNotConfigured, match="get_engine"), transaction(engine) as session:
            append_audit(session, actor="a", action="b", object_type="c", object_id="d", details={})
    finally:
        engine.dispose()


def test_details_are_stored_as_they_were_hashed(engine):
    with transaction(engine) as session:
        append_audit(session, actor="a", action="b", object_type="c", object_id="d", details={"ids": (1, 2), 3: "x"})
        entry_id = session.scalar(select(AuditEntry.id))
    with session_factory(engine)() as session:
        assert session.get(AuditEntry, entry_id).details == {"ids": [1, 2], "3": "x"}
    assert verify(engine).ok


@pytest.mark.parametrize("details", [{"at": datetime.now(timezone.utc)}, {"value": math.nan}])
def test_details_json_cannot_hold_are_refused(engine, details):
    with pytest.raises((TypeError, ValueError)), transaction(engine) as session:
        append_audit(session, actor="a", action="b", object_type="c", object_id="d", details=details)
    assert verify(engine).entries == 0


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET actor = 'mallory' WHERE id = 2", "DELETE FROM audit_log WHERE id = 3",
     "DELETE FROM audit_log", "TRUNCATE audit_log"],
    ids=["update", "delete", "delete-all", "truncate"],
)
def test_the_database_refuses_to_change_or_remove_entries(engine, statement):
    if statement.startswith("TRUNCATE") and engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no TRUNCATE")
    append(engine, 3)
    with pytest.raises(DBAPIError, match="audit_log is append-only"), engine.begin() as connection:
        connection.execute(text(statement))
    report = verify(engine)
    assert (report.ok, report.entries) == (True, 3)


# Each tampering of a log of 20 entries (appended at once, so checkpointed at entry 20): the
# statements, the entry verify names, and a word of its reason.
TAMPERING = {
    "actor edited": (["UPDATE audit_log SET actor = 'mallory' WHERE id = 5"], 5, "changed"),
    "payload edited": (["UPDATE audit_log SET details = '{\"i\": 99}' WHERE id = 5"], 5, "changed"),
    "middle entry deleted": (["DELETE FROM audit_log WHERE id = 5"], 6, "prev_hash"),
    "tail cut": (["DELETE FROM audit_log WHERE id >= 14"], 20, "cut"),
    "every entry deleted": (["DELETE FROM audit_log"], 20, "wiped"),
}


@pytest.mark.parametrize("tampering", TAMPERING)
def test_each_tampering_is_found(engine, tampering):
    statements, first_broken_id, word = TAMPERING[tampering]
    append(engine, 20)
    assert checkpoints(engine) == [(20, 20)]
    tamper(engine, *statements)
    report = verify(engine)
    assert (report.ok, report.first_broken_id, report.checkpoints) == (False, first_broken_id, 1), report
    assert word in report.reason


def test_an_edited_time_is_found(engine):
    append(engine, 3)
    new_time = ("created_at + INTERVAL '1 second'" if engine.dialect.name == "postgresql"
                else "'2001-01-01 00:00:00.000000'")
    tamper(engine, f"UPDATE audit_log SET created_at = {new_time} WHERE id = 2")
    report = verify(engine)
    assert (report.ok, report.entries, report.first_broken_id) == (False, 3, 2)


@pytest.mark.parametrize(
    "digest",
    [lambda message: hashlib.sha256(message).hexdigest(),
     lambda message: hmac.new(b"not the audit key, but as long as one", message, hashlib.sha256).hexdigest()],
    ids=["plain-sha256", "wrong-key"],
)
def test_a_deletion_mended_by_rehashing_without_the_key_is_found(engine, digest):
    append(engine, 10)
    rehash_after(engine, 4, digest)
    report = verify(engine)
    assert (report.ok, report.entries, report.first_broken_id) == (False, 9, 5), report
    assert "without the key" in report.reason


def test_a_wipe_then_new_entries_is_found(engine):
    # Where ids start again at 1 (SQLite; PostgreSQL after TRUNCATE ... RESTART IDENTITY), the new
    # entries chain correctly, but they are not the ones checkpointed.
    append(engine, 20)
    tamper(engine, "TRUNCATE audit_log RESTART IDENTITY" if engine.dialect.name == "postgresql"
           else "DELETE FROM audit_log")
    append(engine, 20, action="something.else")
    report = verify(engine)
    assert (report.ok, report.first_broken_id) == (False, 20), report
    assert "rewritten" in report.reason


def test_checkpoints_at_the_first_entry_at_a_deployment_every_n_entries_and_after_a_pause(engine):
    config = config_of(engine)
    every_5 = engine.execution_options(**{AUDIT_OPTION: replace(config, checkpoint_every_entries=5)})
    append(every_5, 2)  # no checkpoint yet
    append(every_5, 2)  # the newest checkpoint is recent, no deployment, ids 3-4 cross no multiple of 5
    append(every_5, 2)  # ids 5-6: past a multiple of 5
    append(every_5, 1, action="model.deployed")
    os.utime(config.checkpoint_file, (0, 0))  # as if the newest checkpoint were old
    append(every_5, 1)
    append(every_5, 1)
    assert checkpoints(engine) == [(2, 2), (6, 6), (7, 7), (8, 8)]
    assert verify(engine).checkpoints == 4


def test_a_stale_checkpoint_is_claimed_by_the_first_transaction_after_it(engine):
    append(engine, 1)
    checkpoint_file = config_of(engine).checkpoint_file
    os.utime(checkpoint_file, (0, 0))
    with transaction(engine) as session:
        append_audit(session, actor="a", action="b", object_type="c", object_id="d", details={})
        # Before this transaction commits and writes its checkpoint, the next appender already
        # finds a recent one: it does not checkpoint too.
        assert time.time() - checkpoint_file.stat().st_mtime < 60
    assert checkpoints(engine) == [(1, 1), (2, 2)]


def test_a_rolled_back_append_writes_no_checkpoint(engine):
    with pytest.raises(RuntimeError), transaction(engine) as session:
        append_audit_entries(session, [{"actor": "a", "action": "model.deployed", "object_type": "c",
                                        "object_id": "d", "details": {}}])
        raise RuntimeError("the change fails")
    assert not config_of(engine).checkpoint_file.exists()
    assert verify(engine).ok


def test_a_checkpoint_that_cannot_be_written_does_not_undo_the_commit(engine, caplog):
    config = config_of(engine)
    config.checkpoint_file.mkdir(parents=True)  # a folder where the file should be: writing to it fails
    os.utime(config.checkpoint_file, (0, 0))  # old: the next append checkpoints
    append(engine, 1)
    assert verify(engine).entries == 1
    assert "checkpoint not written" in caplog.text


@pytest.mark.parametrize(
    "edit",
    [lambda line: line.replace('"entries":3', '"entries":2'), lambda line: "not json"],
    ids=["forged-count", "garbage"],
)
def test_an_edited_checkpoint_file_is_reported(engine, edit):
    append(engine, 3)
    path = config_of(engine).checkpoint_file
    path.write_text(edit(path.read_text().strip()) + "\n")
    report = verify(engine)
    assert (report.ok, report.first_broken_id) == (False, None)
    assert "line 1 of the checkpoint file" in report.reason


def test_a_checkpoint_records_the_committed_head(engine):
    append(engine, 3)
    with engine.connect() as connection:
        checkpoint = write_checkpoint(connection)
    with session_factory(engine)() as session:
        head = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
    assert (checkpoint.entries, checkpoint.last_id, checkpoint.head_hash) == (3, head.id, head.entry_hash)
    line = json.loads(config_of(engine).checkpoint_file.read_text().splitlines()[-1])
    assert line["signature"] == checkpoint.signature(config_of(engine).key)


def test_concurrent_appenders_keep_one_chain(engine):
    # On PostgreSQL the advisory lock does this; on SQLite, BEGIN IMMEDIATE.
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for _ in range(5):
                append(engine, 2, action=f"worker.{n}")
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = verify(engine)
    assert (report.ok, report.entries) == (True, 40)
