"""Liveness, readiness, and what the API process loads."""

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok"}


@pytest.mark.parametrize(
    "database_url",
    ["postgresql+psycopg://postgres@127.0.0.1:1/nowhere", "sqlite:////nonexistent-folder/qforget.db"],
    ids=["postgresql", "sqlite"],
)
def test_not_ready_without_a_database(database_url, tmp_path):
    app = create_app(Settings(database_url=database_url, data_dir=tmp_path, _env_file=None))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"detail": "database unavailable, retry later"}


def test_a_request_without_a_database_is_a_503_in_the_usual_shape():
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere", _env_file=None)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/forget-requests", json={"subject_id": "alice"})
    assert response.status_code == 503
    assert response.json() == {"detail": "database unavailable, retry later"}


def test_every_route_documents_its_errors_and_has_a_docstring(client):
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description"), f"{method} {path} has no docstring"
            assert "200" in operation["responses"] or "202" in operation["responses"]
    assert {"404"} <= set(schema["paths"]["/forget-requests/{request_id}"]["get"]["responses"])
    assert {"409", "422"} <= set(schema["paths"]["/forget-requests"]["post"]["responses"])
    assert {"404"} <= set(schema["paths"]["/audit"]["get"]["responses"])
    for path in ("/forget-requests", "/forget-requests/{request_id}", "/audit", "/ready"):
        assert all("503" in operation["responses"] for operation in schema["paths"][path].values()), path


def test_the_api_loads_no_model_code():
    # The API image has no torch; importing it here would also slow every API process down.
    code = "import sys, service.api.app; print(sorted(m for m in ('torch', 'workers') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "[]"
