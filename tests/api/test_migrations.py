"""The migrations build exactly the schema of service/core/models.py, and can be undone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from service.core.db import transaction
from service.core.migrate import downgrade_database, upgrade_database
from service.core.models import Base, Batch, BatchStatus

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
