"""The audit log's hash chain: appended in order, verified, and broken by any edit or deletion."""

import math
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from service.core.audit_log import GENESIS_HASH, append_audit, entry_hash, verify_chain
from service.core.db import session_factory, transaction
from service.core.models import AuditEntry


def append(engine, count: int, action: str = "request.received") -> list[int]:
    """Appends `count` entries; returns their ids."""
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
    assert (report.ok, report.entries, report.first_broken_id) == (True, 0, None)


def test_the_hash_is_recomputable_from_what_the_database_returns(engine):
    with transaction(engine) as session:
        written = append_audit(session, actor="a", action="b", object_type="c", object_id="d", details={"x": [1.5]})
        written_at, written_hash = written["created_at"], written["entry_hash"]
    with session_factory(engine)() as session:
        stored = session.scalars(select(AuditEntry)).one()
        # SQLite returns it naive, PostgreSQL aware: the same instant to the microsecond either way.
        assert stored.created_at.replace(tzinfo=stored.created_at.tzinfo or timezone.utc) == written_at
        assert entry_hash(
            prev_hash=stored.prev_hash, created_at=stored.created_at, actor=stored.actor, action=stored.action,
            object_type=stored.object_type, object_id=stored.object_id, details=stored.details,
        ) == written_hash


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
    "tamper",
    [
        "UPDATE audit_log SET actor = 'mallory' WHERE id = 2",
        "UPDATE audit_log SET details = '{\"i\": 99}' WHERE id = 2",
        "UPDATE audit_log SET created_at = created_at + INTERVAL '1 second' WHERE id = 2",
    ],
    ids=["actor", "details", "created_at"],
)
def test_an_edited_entry_is_found(engine, tamper):
    append(engine, 3)
    if "INTERVAL" in tamper and engine.dialect.name == "sqlite":
        tamper = "UPDATE audit_log SET created_at = '2001-01-01 00:00:00.000000' WHERE id = 2"
    with engine.begin() as connection:
        connection.execute(text(tamper))
    report = verify(engine)
    assert (report.ok, report.entries, report.first_broken_id) == (False, 3, 2)
    assert "changed" in report.reason


def test_a_deleted_entry_is_found_at_its_successor(engine):
    append(engine, 4)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id = 2"))
    report = verify(engine)
    assert (report.ok, report.entries, report.first_broken_id) == (False, 3, 3)
    assert "prev_hash" in report.reason


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
