"""The migrations build exactly the schema of service/core/models.py, and can be undone."""

import hashlib
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import alembic.command
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import NullPool

from service.core.audit_log import GENESIS_HASH, AuditLogConfig, entry_message, verify_chain
from service.core.db import make_engine, session_factory, transaction
from service.core.migrate import alembic_config, downgrade_database, upgrade_database
from service.core.models import AuditEntry, Base, Batch, BatchStatus, ForgetRequest
from service.core.pseudonyms import pseudonym
from service.core.settings import get_settings

REPO = Path(__file__).resolve().parents[2]


def schema_differences(database_url: str) -> list:
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    return differences


def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url, poolclass=NullPool)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("empty_postgres_url")


def test_migrated_schema_matches_the_models(database_url):
    assert schema_differences(database_url) == []


def test_downgrade_to_base_then_upgrade_again(unmigrated_url):
    upgrade_database(unmigrated_url)
    downgrade_database(unmigrated_url)
    assert table_names(unmigrated_url) == {"alembic_version"}
    upgrade_database(unmigrated_url)
    assert table_names(unmigrated_url) == {table.name for table in Base.metadata.sorted_tables} | {"alembic_version"}
    assert schema_differences(unmigrated_url) == []


def test_upgrade_twice_is_a_no_op(database_url):
    upgrade_database(database_url)
    assert schema_differences(database_url) == []


def test_concurrent_upgrades_on_postgresql_both_succeed(empty_postgres_url):
    # Separate processes, as the API and the workers are (alembic's context is per process).
    command = [sys.executable, "-c", "import sys; from service.core.migrate import upgrade_database; "
               "upgrade_database(sys.argv[1])", empty_postgres_url]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    failures = [process.stderr.read() for process in processes if process.wait(timeout=60) != 0]
    assert failures == []
    assert schema_differences(empty_postgres_url) == []


def test_upgrade_works_from_any_directory_and_creates_the_sqlite_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'not' / 'yet' / 'there.db'}"
    upgrade_database(url)
    assert schema_differences(url) == []


def test_at_most_one_running_batch_per_model(engine, seed):
    def add_batch(status: BatchStatus) -> None:
        with transaction(engine) as session:
            session.add(Batch(model_name=seed.model, status=status, parent_version_id=seed.version_id))

    add_batch(BatchStatus.completed)
    add_batch(BatchStatus.completed)
    add_batch(BatchStatus.running)
    with pytest.raises(IntegrityError):
        add_batch(BatchStatus.running)


# Entries as the code before migration 0008 wrote them: ids in clear, plain sha256 chain.
CLEAR_ENTRIES = [
    ("request.received", "forget_request", "r1", {"subject_id": "alice", "model": "m", "sample_ids": [4, 5]}),
    ("samples.forgotten", "batch", "1", {"sample_ids": [4, 5], "version_id": 2}),
    ("request.completed", "forget_request", "r1", {"version_id": 2, "batch_id": 1}),
]


def sha256_chained(entries) -> list[dict]:
    rows, prev_hash = [], GENESIS_HASH
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i, (action, object_type, object_id, details) in enumerate(entries):
        fields = {"prev_hash": prev_hash, "created_at": start + timedelta(seconds=i), "actor": "before",
                  "action": action, "object_type": object_type, "object_id": object_id, "details": details}
        prev_hash = hashlib.sha256(entry_message(**fields)).hexdigest()
        rows.append({**fields, "entry_hash": prev_hash})
    return rows


@pytest.fixture
def audit_key_in_environment(monkeypatch):
    # The migration takes the key from the settings of the process that migrates.
    key = "an operator's audit key, 32 characters or more"
    monkeypatch.setenv("QFORGET_AUDIT_KEY", key)
    get_settings.cache_clear()
    yield key.encode()
    get_settings.cache_clear()


def test_0008_rekeys_and_pseudonymises_the_existing_log_then_refuses_changes(
    unmigrated_url, audit_key_in_environment, tmp_path
):
    key = audit_key_in_environment
    alembic.command.upgrade(alembic_config(unmigrated_url), "0006")
    before = create_engine(unmigrated_url, poolclass=NullPool)
    with before.begin() as connection:
        connection.execute(insert(AuditEntry.__table__), sha256_chained(CLEAR_ENTRIES))
    before.dispose()

    upgrade_database(unmigrated_url)
    engine = make_engine(unmigrated_url, "test", audit=AuditLogConfig(key, tmp_path / "checkpoints.jsonl"))
    try:
        with session_factory(engine)() as session:
            report = verify_chain(session)
            details = session.scalars(select(AuditEntry.details).order_by(AuditEntry.id)).all()
        assert (report.ok, report.entries) == (True, 3), report
        samples = [pseudonym(key, "sample", 4), pseudonym(key, "sample", 5)]
        assert details == [
            {"subject_pseudonym": pseudonym(key, "subject", "alice"), "model": "m", "sample_pseudonyms": samples},
            {"sample_pseudonyms": samples, "version_id": 2},
            {"version_id": 2, "batch_id": 1},
        ]
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text("DELETE FROM audit_log WHERE id = 3"))
    finally:
        engine.dispose()

    # Undone: the refusal is gone and the chain is plain sha256 again (the pseudonyms stay).
    downgrade_database(unmigrated_url, "0007")
    after = create_engine(unmigrated_url, poolclass=NullPool)
    with after.begin() as connection:
        rows = connection.execute(select(AuditEntry.__table__).order_by(AuditEntry.id)).all()
        connection.execute(text("DELETE FROM audit_log WHERE id = 3"))
    after.dispose()
    prev_hash = GENESIS_HASH
    for row in rows:
        fields = {name: row._mapping[name] for name in ("created_at", "actor", "action", "object_type", "object_id",
                                                          "details")}
        assert (row.prev_hash, row.entry_hash) == (prev_hash, hashlib.sha256(
            entry_message(prev_hash=prev_hash, **fields)).hexdigest())
        prev_hash = row.entry_hash


@pytest.mark.parametrize(
    ("tampering", "first_broken_id", "word"),
    [("UPDATE audit_log SET actor = 'mallory' WHERE id = 2", 2, "changed"),
     ("DELETE FROM audit_log WHERE id = 2", 3, "prev_hash")],
    ids=["edited", "deleted"],
)
def test_0008_keeps_what_was_done_to_the_log_before_visible(
    unmigrated_url, audit_key_in_environment, tmp_path, tampering, first_broken_id, word
):
    # Re-keying chains the entries again: it must not make a tampered log whole.
    alembic.command.upgrade(alembic_config(unmigrated_url), "0006")
    before = create_engine(unmigrated_url, poolclass=NullPool)
    with before.begin() as connection:
        connection.execute(insert(AuditEntry.__table__), sha256_chained(CLEAR_ENTRIES))
        connection.execute(text(tampering))
    before.dispose()

    upgrade_database(unmigrated_url)
    engine = make_engine(unmigrated_url, "test",
                         audit=AuditLogConfig(audit_key_in_environment, tmp_path / "checkpoints.jsonl"))
    try:
        with session_factory(engine)() as session:
            report = verify_chain(session)
    finally:
        engine.dispose()
    assert (report.ok, report.first_broken_id) == (False, first_broken_id), report
    assert word in report.reason


def test_0009_adds_the_webhook_outbox_and_keeps_existing_requests(unmigrated_url):
    alembic.command.upgrade(alembic_config(unmigrated_url), "0008")
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    before = create_engine(unmigrated_url, poolclass=NullPool)
    with before.begin() as connection:
        connection.execute(text("INSERT INTO subjects (id, created_at) VALUES ('alice', :now)"), {"now": now})
        connection.execute(text("INSERT INTO forget_requests (id, subject_id, status, received_at, due_at) "
                                "VALUES ('r1', 'alice', 'completed', :now, :now)"), {"now": now})
    before.dispose()

    upgrade_database(unmigrated_url)
    assert schema_differences(unmigrated_url) == []
    engine = make_engine(unmigrated_url, "test")  # SQLite: with its foreign keys enforced, as the service runs
    with engine.begin() as connection:
        assert connection.execute(text("SELECT id, erasure_acknowledged_at FROM forget_requests")).all() == [
            ("r1", None)]
        connection.execute(text(
            "INSERT INTO webhook_deliveries (id, event_type, request_id, payload, payload_sha256, status, attempts, "
            "attempt_log, created_at) VALUES ('msg_1', 'request.completed', 'r1', NULL, :sha, 'delivered', 1, "
            "'[]', :now)"), {"sha": "0" * 64, "now": now})
        with pytest.raises(IntegrityError), connection.begin_nested():
            connection.execute(text(
                "INSERT INTO webhook_deliveries (id, event_type, request_id, payload_sha256, status, attempts, "
                "attempt_log, created_at) VALUES ('msg_2', 'request.completed', 'nowhere', :sha, 'pending', 0, "
                "'[]', :now)"), {"sha": "0" * 64, "now": now})
    engine.dispose()

    downgrade_database(unmigrated_url, "0008")
    assert "webhook_deliveries" not in table_names(unmigrated_url)
    after = create_engine(unmigrated_url, poolclass=NullPool)
    columns = {column["name"] for column in inspect(after).get_columns("forget_requests")}
    with after.connect() as connection:
        assert connection.execute(text("SELECT id FROM forget_requests")).scalars().all() == ["r1"]
    after.dispose()
    assert "erasure_acknowledged_at" not in columns


def test_0010_adds_the_request_lifecycle_and_keeps_the_requests(unmigrated_url):
    alembic.command.upgrade(alembic_config(unmigrated_url), "0008")
    received = datetime(2027, 1, 1, 9, 30, tzinfo=timezone.utc)
    request = {"id": "r1", "subject_id": "alice", "status": "pending", "received_at": received,
               "due_at": received + timedelta(days=30)}
    before = create_engine(unmigrated_url, poolclass=NullPool)
    with before.begin() as connection:
        connection.execute(text("INSERT INTO subjects (id, created_at) VALUES ('alice', :at)"), {"at": received})
        connection.execute(text("INSERT INTO samples (dataset, dataset_index, subject_id) VALUES ('d', 0, 'alice')"))
        connection.execute(text("INSERT INTO forget_requests (id, subject_id, status, received_at, due_at) "
                                "VALUES (:id, :subject_id, :status, :received_at, :due_at)"), request)
        connection.execute(text("INSERT INTO forget_request_samples (request_id, sample_id) VALUES ('r1', 1)"))
    before.dispose()

    upgrade_database(unmigrated_url)
    assert schema_differences(unmigrated_url) == []
    engine = create_engine(unmigrated_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            row = connection.execute(select(ForgetRequest.__table__)).one()._mapping
            assert {name: row[name] for name in ("id", "subject_id", "status")} == {"id": "r1", "subject_id": "alice",
                                                                                   "status": "pending"}
            new_columns = ("linked_request_id", "withdrawn_at", "withdrawal_reason", "original_due_at", "extended_at",
                           "extension_reason")
            assert [row[name] for name in new_columns] == [None] * len(new_columns)
            # The new status is a plain string of the column's length: no CHECK to pass.
            connection.execute(update(ForgetRequest.__table__).values(status="withdrawn", withdrawal_reason="asked"))
            connection.execute(insert(ForgetRequest.__table__).values(
                **{**request, "id": "r2", "status": "pending", "linked_request_id": "r1"}))
        # The older schema has no withdrawn status nor requests that follow another: the downgrade refuses.
        with pytest.raises(RuntimeError, match="1 withdrawn requests and 1 open requests without parts"):
            downgrade_database(unmigrated_url, "0008")
        with engine.begin() as connection:
            connection.execute(text("UPDATE forget_requests SET status = 'completed'"))
        downgrade_database(unmigrated_url, "0008")
        columns = {column["name"] for column in inspect(engine).get_columns("forget_requests")}
        assert not set(new_columns) & columns
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT COUNT(*) FROM forget_request_samples")) == 1
    finally:
        engine.dispose()


def test_0012_adds_the_logit_scaled_confidence_and_undoes_it(unmigrated_url):
    alembic.command.upgrade(alembic_config(unmigrated_url), "0011")
    upgrade_database(unmigrated_url)
    assert schema_differences(unmigrated_url) == []
    engine = create_engine(unmigrated_url, poolclass=NullPool)
    try:
        [column] = [c for c in inspect(engine).get_columns("sample_scores") if c["name"] == "confidence_logit"]
        assert column["nullable"]  # rows written before it was kept have none
        engine.dispose()
        downgrade_database(unmigrated_url, "0011")
        assert "confidence_logit" not in {c["name"] for c in inspect(engine).get_columns("sample_scores")}
    finally:
        engine.dispose()


def test_0014_marks_every_existing_version_full_and_undoes_it(unmigrated_url):
    alembic.command.upgrade(alembic_config(unmigrated_url), "0013")
    engine = create_engine(unmigrated_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO models (name, dataset, spec, created_at) "
                                    "VALUES ('m', 'digits', '{}', CURRENT_TIMESTAMP)"))
            connection.execute(text(
                "INSERT INTO model_versions (model_name, kind, method, config, metrics, sha256, artifact_path, "
                "excluded_sample_ids, created_at) VALUES ('m', 'reference', 'retrain', '{}', '{}', :sha, '/r.pt', "
                "'[1, 2]', CURRENT_TIMESTAMP)"), {"sha": "2" * 64})
        engine.dispose()
        upgrade_database(unmigrated_url)
        assert schema_differences(unmigrated_url) == []
        with engine.connect() as connection:  # a reference recorded before: a full one
            assert connection.scalar(text("SELECT approximate FROM model_versions")) in (False, 0)
        engine.dispose()
        downgrade_database(unmigrated_url, "0013")
        assert "approximate" not in {c["name"] for c in inspect(engine).get_columns("model_versions")}
    finally:
        engine.dispose()
