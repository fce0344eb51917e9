"""The API's edges: the bound on request heads (a real `qforget api` process), the headers browsers
get, no interactive documentation, no redirect built from the Host header."""

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.security_headers import PAGE_POLICY
from service.cli import MAX_REQUEST_HEAD_BYTES
from service.cli.processes import Processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live_api(tmp_path_factory) -> Iterator[int]:
    """`python -m service.cli api` on a free port and a SQLite file of its own; its port."""
    folder = tmp_path_factory.mktemp("live-api")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QFORGET_DATABASE_URL": f"sqlite:///{folder / 'qforget.db'}",
           "QFORGET_DATA_DIR": str(folder / "var"), "QFORGET_API_HOST": "127.0.0.1", "QFORGET_API_PORT": str(port),
           "QFORGET_LOG_FORMAT": "text"}
    processes = Processes(env, folder)
    processes.start("api", "api")
    try:
        processes.wait_until(lambda: _health_seconds(port) is not None, "the API to answer /health", timeout=60)
        yield port
    finally:
        processes.stop()


def _health_seconds(port: int) -> float | None:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            return time.monotonic() - started if response.status == 200 else None
    except OSError:
        return None


def _answer_to(port: int, head: bytes) -> bytes:
    """The first bytes the server answers to `head` sent on a raw socket; b"" if it closed or reset
    the connection instead."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            connection.sendall(head)
            return connection.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def _refused(answer: bytes) -> bool:
    return answer == b"" or answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))


# 48 MiB in the header or in the path: what held uvicorn's event loop for seconds before the bound.
OVERSIZED_HEADS = {
    "header": b"GET /health HTTP/1.1\r\nHost: api\r\nX-Padding: " + b"a" * (48 * 2**20) + b"\r\n\r\n",
    "request line": b"GET /" + b"a" * (48 * 2**20) + b" HTTP/1.1\r\nHost: api\r\n\r\n",
}


@pytest.mark.parametrize("where", OVERSIZED_HEADS)
def test_an_oversized_head_is_refused_while_health_answers_at_once(live_api, where):
    answers = []
    sender = threading.Thread(target=lambda: answers.append(_answer_to(live_api, OVERSIZED_HEADS[where])))
    sender.start()
    slowest = 0.0
    while True:  # /health at least once while the head is being sent
        seconds = _health_seconds(live_api)
        assert seconds is not None, "/health failed"
        slowest = max(slowest, seconds)
        if not sender.is_alive():
            break
    sender.join()
    assert _refused(answers[0]), answers[0]
    assert slowest < 0.5, f"/health took {slowest:.2f} s beside the oversized {where}"


def test_a_head_within_the_limit_is_served(live_api):
    padding = b"a" * (MAX_REQUEST_HEAD_BYTES // 2)
    answer = _answer_to(live_api, b"GET /health HTTP/1.1\r\nHost: api\r\nX-Padding: " + padding + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_there_is_no_interactive_documentation_but_the_openapi_document(anonymous):
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        assert anonymous.get(path).status_code == 404, path
    schema = anonymous.get("/openapi.json")
    assert schema.status_code == 200 and "/forget-requests" in schema.json()["paths"]


def test_a_trailing_slash_is_not_redirected_to_the_host_the_caller_named(client, seed):
    response = client.get("/subjects/alice/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    assert not [value for value in response.headers.values() if "evil.example" in value]


def test_every_answer_is_nosniff_and_not_stored(client, anonymous, seed):
    limit = client.app.state.settings.api_max_body_bytes
    filed = client.post("/forget-requests", json={"subject_id": "alice"})
    answers = {
        "filed": filed,
        "read": client.get(f"/forget-requests/{filed.json()['id']}"),
        "listed": client.get("/forget-requests", params={"subject_id": "alice"}),
        "subject": client.get("/subjects/alice"),
        "invalid": client.get("/subjects/alice", params={"limit": "x"}),
        "unauthenticated": anonymous.get("/subjects/alice"),
        "unmatched": client.get("/nowhere"),
        "too large": client.post("/forget-requests", content=b"x" * (limit + 1),
                                 headers={"Content-Type": "application/json"}),
        "health": anonymous.get("/health"),
        "openapi": anonymous.get("/openapi.json"),
    }
    assert filed.status_code == 202, filed.text
    for name, response in answers.items():
        assert response.headers.get("x-content-type-options") == "nosniff", name
        assert response.headers.get("cache-control") == "no-store", name


def test_an_unexpected_error_is_nosniff_and_not_stored(settings):
    app = create_app(settings)

    @app.get("/fails")
    def fails() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/fails")
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}
    assert response.headers["x-content-type-options"] == "nosniff" and response.headers["cache-control"] == "no-store"


def test_html_pages_load_nothing_run_nothing_and_are_not_framed(client, anonymous, seed):
    report = client.get("/audit/report", params={"model": seed.model})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.headers["content-security-policy"] == PAGE_POLICY
    assert "script-src" not in PAGE_POLICY and "frame-ancestors 'none'" in PAGE_POLICY
    assert "default-src 'none'" in PAGE_POLICY
    dashboard = anonymous.get("/dashboard")
    # The dashboard keeps its own policy, which lets its own script run and fetch.
    assert "script-src 'self'" in dashboard.headers["content-security-policy"]
    for page in (report, dashboard):
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
    assert report.headers["cache-control"] == "no-store"
    asset = anonymous.get("/dashboard/assets/dashboard.js")
    assert asset.headers["x-content-type-options"] == "nosniff" and asset.headers["cache-control"] == "no-cache"
