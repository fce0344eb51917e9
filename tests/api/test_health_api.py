"""Liveness, readiness, the OpenAPI documentation, and what the API process loads."""

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.settings import Settings

UNREACHABLE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
LOCAL_REDIS = "redis://127.0.0.1:6379/15"
# A key of the right shape, so that authentication has to ask the database.
SOME_KEY = {"Authorization": "Bearer qf_0123abcd_" + "x" * 43}


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "broker": "ok", "detail": None}


def test_probes_need_no_api_key(anonymous):
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/ready").status_code == 200


@pytest.mark.parametrize(
    "database_url", [UNREACHABLE_POSTGRES, "sqlite:////nonexistent-folder/qforget.db"], ids=["postgresql", "sqlite"]
)
def test_not_ready_without_a_database(database_url, tmp_path):
    settings = Settings(database_url=database_url, data_dir=tmp_path, _env_file=None)
    settings.broker_folder.mkdir(parents=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready", "database": "down", "broker": "ok", "detail": "unavailable: database"
    }


def test_a_missing_sqlite_file_is_not_ready_and_is_not_created(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'absent.db'}", data_dir=tmp_path, _env_file=None)
    settings.broker_folder.mkdir(parents=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["database"] == "down"
    assert not (tmp_path / "absent.db").exists()


def test_not_ready_without_the_broker_folder(settings):
    # The embedded default's broker is a folder; the workers create it, and here nobody has.
    assert not settings.broker_folder.exists()
    with TestClient(create_app(settings)) as client:
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready", "database": "ok", "broker": "down", "detail": "unavailable: broker"
    }


def test_redis_broker_is_pinged(database_url, tmp_path):
    try:
        redis.Redis.from_url(LOCAL_REDIS, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {LOCAL_REDIS}: {exc}")
    for broker_url, expected in ((LOCAL_REDIS, 200), ("redis://127.0.0.1:1/0", 503)):
        settings = Settings(database_url=database_url, broker_url=broker_url, data_dir=tmp_path, _env_file=None)
        with TestClient(create_app(settings)) as client:
            response = client.get("/ready")
        assert response.status_code == expected, response.text
        assert response.json()["broker"] == ("ok" if expected == 200 else "down")


def test_an_unknown_broker_kind_is_unchecked_not_down(database_url, tmp_path):
    settings = Settings(database_url=database_url, broker_url="amqp://nowhere//", data_dir=tmp_path, _env_file=None)
    with TestClient(create_app(settings)) as client:
        response = client.get("/ready")
    assert (response.status_code, response.json()["broker"]) == (200, "unchecked")


def test_ready_does_not_wait_behind_a_sqlite_writer(tmp_path, sqlite_template):
    path = tmp_path / "busy.db"
    path.write_bytes(Path(sqlite_template).read_bytes())
    settings = Settings(database_url=f"sqlite:///{path}", data_dir=tmp_path, _env_file=None)
    settings.broker_folder.mkdir(parents=True)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("BEGIN IMMEDIATE")  # what every API and worker transaction takes on SQLite
    writer.execute("INSERT INTO subjects (id, created_at) VALUES ('held', '2025-01-01 00:00:00')")
    try:
        with TestClient(create_app(settings)) as client:
            started = time.monotonic()
            response = client.get("/ready")
            elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert response.status_code == 200, response.text
    assert elapsed < 5


def test_a_request_without_a_database_is_a_503_in_the_usual_shape():
    settings = Settings(database_url=UNREACHABLE_POSTGRES, _env_file=None)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/forget-requests", json={"subject_id": "alice"}, headers=SOME_KEY)
    assert response.status_code == 503
    assert response.json() == {"detail": "database unavailable, retry later"}


def test_every_route_documents_its_errors_and_has_a_docstring(client):
    schema = client.get("/openapi.json").json()
    public = {"/health", "/ready", "/openapi.json", "/docs", "/redoc"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = set(operation["responses"])
            assert operation.get("description"), f"{method} {path} has no docstring"
            assert responses & {"200", "201", "202"}, f"{method} {path}"
            if path not in public:
                assert {"401", "403", "503"} <= responses, f"{method} {path}"
                assert operation["security"] == [{"ApiKey": []}], f"{method} {path}"
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= responses, f"{method} {path}"
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert "application/json" in response.get("content", {}), f"{method} {path} {code}"
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["ApiKey"][
            "description"]
    }
    paths = schema["paths"]
    assert {"404"} <= set(paths["/forget-requests/{request_id}"]["get"]["responses"])
    assert {"422"} <= set(paths["/forget-requests"]["post"]["responses"])
    for change in ("withdrawal", "extension"):
        assert {"403", "404", "409", "422"} <= set(paths[f"/forget-requests/{{request_id}}/{change}"]["post"]["responses"])
    assert {"404"} <= set(paths["/audit"]["get"]["responses"])
    assert {"304", "404", "500"} <= set(paths["/models/deployed/artifact"]["get"]["responses"])
    assert {"409"} <= set(paths["/datasets/{dataset}/samples"]["post"]["responses"])
    assert "503" in paths["/ready"]["get"]["responses"]


def test_the_api_loads_no_model_code():
    # The API image has no torch; importing it here would also slow every API process down.
    code = "import sys, service.api.app; print(sorted(m for m in ('torch', 'workers') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "[]"
