"""Fixtures shared by every test directory: migrated databases, seed data, an API client.

Databases are built by the real migrations (service.core.migrate.upgrade_database), never by
metadata.create_all, so every run also tests the migrations.

- `database_url` (function; parametrised, ids "sqlite" and "postgresql"): the URL of an empty
  database at the newest migration. A test that takes it runs once per backend.
  SQLite: a fresh file in the test's tmp_path (a copy of one migrated per session).
  PostgreSQL: one database per test session, `qforget_t_<random>`, created through
  QFORGET_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test), emptied
  after each test (TRUNCATE), dropped at the end. Tests that use it commit for real, as the API
  and the workers do; nothing is hidden in a rolled-back outer transaction.
- `postgres_admin` (session): an AUTOCOMMIT engine on that admin database. PostgreSQL tests are
  skipped, saying why, when the server cannot be reached; under CI=true they fail instead.
- `postgres_url` (session): the migrated per-session PostgreSQL database, for PostgreSQL-only tests
  (each such test must leave it empty, or use `database_url`).
- `empty_postgres_url` (function): a brand-new PostgreSQL database with no schema, dropped after the
  test (migration tests).
- `engine` (function): service.core.db.make_engine(database_url, "test") carrying the audit log's key
  and checkpoint file of `settings` (as the API's engine does), disposed after the test.
- `one_torch_thread` (function): torch limited to one thread for the test (real training runs).
- `settings` (function): Settings on `database_url` with data_dir under tmp_path; no .env read.
- `seed` (function): inserts the model "digits-cnn-4bit" (data set "digits") with a deployed
  original version and subjects with active samples; returns a `Seed` (see below).
- `row_counts` (function): a callable returning {table name: row count} for every table.
- `api_key` (function): a callable `api_key(role="admin", model=None) -> str` that creates an API key
  (service.core.api_keys.create_api_key) in the test database and returns it.
- `bearer` (function): a callable `bearer(role="admin", model=None) -> dict`: the Authorization header
  of a new key with that role, for `client.get(..., headers=bearer("auditor"))`.
- `client` (function): a fastapi TestClient on service.api.app.create_app(settings), lifespan run,
  sending an admin key by default (headers passed to a call replace it); the broker folder of the
  embedded default exists, so /ready can be ready. `client.app` is the app.
- `anonymous` (function): a TestClient on the same app that sends no API key.
"""

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, func, insert, make_url, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from service.core.audit_log import AuditLogConfig
from service.core.db import make_engine, transaction
from service.core.migrate import upgrade_database
from service.core.models import Base, Dataset, Model, ModelVersion, Sample, Subject, VersionKind
from service.core.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get(
    "QFORGET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Seed:
    """What the `seed` fixture inserted. All samples are active; sample ids ascend per subject."""

    model: str  # "digits-cnn-4bit", data set "digits"
    dataset: str
    version_id: int  # the deployed original version
    samples: dict[str, list[int]]  # subject id -> its sample ids in "digits"
    other_dataset_samples: dict[str, list[int]]  # subject id -> its sample ids in another data set


# Subjects and how many samples each owns in "digits"; "dave" owns samples only in "fashion".
SEED_SUBJECTS = {"alice": 6, "bob": 6, "carol": 3}
SEED_OTHER_DATASET = {"dave": 2}


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    admin = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect():
            pass
    except OperationalError as exc:
        where = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=True)
        message = f"PostgreSQL at {where} (QFORGET_TEST_POSTGRES_URL) is unreachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield admin
    admin.dispose()


def _create_database(admin: Engine) -> str:
    name = f"qforget_t_{secrets.token_hex(6)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin: Engine, url: str) -> None:
    with admin.connect() as connection:
        # FORCE: pooled connections of engines the code under test cached are closed too.
        connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url(postgres_admin: Engine) -> Iterator[str]:
    url = _create_database(postgres_admin)
    try:
        upgrade_database(url)
        yield url
    finally:
        _drop_database(postgres_admin, url)


@pytest.fixture
def empty_postgres_url(postgres_admin: Engine) -> Iterator[str]:
    url = _create_database(postgres_admin)
    yield url
    _drop_database(postgres_admin, url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite-template") / "qforget.db"
    upgrade_database(f"sqlite:///{path}")
    return str(path)


def _empty_postgres(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        # A test that leaves a transaction open would otherwise hang the whole run here.
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        # Test data need not survive a crash: do not wait for the WAL flush.
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        # audit_log refuses TRUNCATE (a trigger, migration 0007): the superuser empties a test database past it.
        connection.execute(text("SET LOCAL session_replication_role = replica"))
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "qforget.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_url")
        yield url
        _empty_postgres(url)


@pytest.fixture
def engine(database_url: str, settings: Settings) -> Iterator[Engine]:
    engine = make_engine(database_url, "test", audit=AuditLogConfig.from_settings(settings))
    yield engine
    engine.dispose()


@pytest.fixture
def one_torch_thread():
    """Real training runs in a test: one thread is as fast on these small models, and far faster
    than two on a busy two-core machine (OpenMP workers spin while waiting for a core)."""
    import torch  # here: the API's tests never load it

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path / "var", _env_file=None)


def add_deployed_model(engine, name: str, dataset: str = "digits") -> int:
    """A model with a deployed original version (it holds its data set's samples); the version's id."""
    with transaction(engine) as session:
        session.add(Model(name=name, dataset=dataset, spec={}))
        session.flush()
        version = ModelVersion(model_name=name, kind=VersionKind.original, method="qat", config={}, metrics={},
                               sha256="0" * 64, artifact_path=f"/nonexistent/{name}.pt", excluded_sample_ids=[])
        session.add(version)
        session.flush()
        session.get(Model, name).deployed_version_id = version.id
        return version.id


@pytest.fixture
def seed(engine: Engine) -> Seed:
    with transaction(engine) as session:
        session.add(Model(name="digits-cnn-4bit", dataset="digits", spec={"architecture": "test"}))
        session.flush()
        version = ModelVersion(
            model_name="digits-cnn-4bit",
            kind=VersionKind.original,
            method="qat",
            config={},
            metrics={},
            sha256="0" * 64,
            artifact_path="/nonexistent/original.pt",
            excluded_sample_ids=[],
        )
        session.add(version)
        session.flush()
        session.get(Model, "digits-cnn-4bit").deployed_version_id = version.id
        session.execute(insert(Dataset), [{"name": "digits", "train_size": 1437}, {"name": "fashion", "train_size": 1437}])
        session.execute(insert(Subject), [{"id": s} for s in [*SEED_SUBJECTS, *SEED_OTHER_DATASET]])
        rows, index = [], 0
        for dataset, subjects in (("digits", SEED_SUBJECTS), ("fashion", SEED_OTHER_DATASET)):
            for subject, count in subjects.items():
                rows += [{"dataset": dataset, "dataset_index": index + i, "subject_id": subject} for i in range(count)]
                index += count
        session.execute(insert(Sample), rows)
        owned = session.execute(select(Sample.subject_id, Sample.dataset, Sample.id).order_by(Sample.id)).all()
    by_dataset: dict[str, dict[str, list[int]]] = {"digits": {}, "fashion": {}}
    for subject, dataset, sample_id in owned:
        by_dataset[dataset].setdefault(subject, []).append(sample_id)
    return Seed(
        model="digits-cnn-4bit",
        dataset="digits",
        version_id=version.id,
        samples=by_dataset["digits"],
        other_dataset_samples=by_dataset["fashion"],
    )


@pytest.fixture
def row_counts(engine: Engine) -> Callable[[], dict[str, int]]:
    def counts() -> dict[str, int]:
        with engine.connect() as connection:
            return {
                table.name: connection.scalar(select(func.count()).select_from(table))
                for table in Base.metadata.sorted_tables
            }

    return counts


@pytest.fixture
def api_key(engine: Engine) -> Callable[..., str]:
    from service.core.api_keys import create_api_key

    def make(role: str = "admin", model: str | None = None) -> str:
        with transaction(engine) as session:
            return create_api_key(session, role=role, name=f"test {role}", model=model, actor="tests")[1]

    return make


@pytest.fixture
def bearer(api_key: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def make(role: str = "admin", model: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key(role, model)}"}

    return make


@pytest.fixture
def client(settings: Settings, bearer) -> Iterator[TestClient]:
    # Imported here so that a broken API cannot stop the engine's tests from being collected.
    from service.api.app import create_app

    # The embedded default's broker is a folder the workers create; /ready checks it.
    settings.broker_folder.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(settings), headers=bearer("admin")) as client:
        yield client


@pytest.fixture
def anonymous(client: TestClient) -> TestClient:
    return TestClient(client.app)
