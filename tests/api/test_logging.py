"""Structured logs: the formatters, the id context, and the API's X-Request-ID middleware."""

import json
import logging
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.request_logging import REQUEST_ID_HEADER, UNMATCHED_ROUTE
from service.core.logging_setup import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    bind_log_context,
    clear_log_context,
    current_log_context,
    log_context,
    logging_config,
)
from service.core.settings import Settings


def record(message="batch %s claimed", *args, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.getLogger("workers.tasks").makeRecord(
        "workers.tasks", logging.INFO, __file__, 1, message, args or (7,), exc_info, extra=extra or None)
    ContextFilter().filter(made)
    return made


def test_json_lines_carry_the_ids_of_the_context_and_of_extra():
    with log_context(batch_id=7, model="digits-cnn-4bit"):
        line = JsonFormatter().format(record(version_id=12))
    entry = json.loads(line)
    assert entry["message"] == "batch 7 claimed"
    assert (entry["level"], entry["logger"]) == ("INFO", "workers.tasks")
    assert (entry["batch_id"], entry["model"], entry["version_id"]) == (7, "digits-cnn-4bit", 12)
    assert entry["time"].endswith("+00:00")
    assert current_log_context() == {}  # the block's ids are gone after it


def test_an_id_given_with_extra_wins_over_the_context():
    with log_context(batch_id=7):
        entry = json.loads(JsonFormatter().format(record(batch_id=8)))
    assert entry["batch_id"] == 8


def test_json_keeps_a_traceback_in_one_line():
    try:
        raise RuntimeError("the GPU fell over")
    except RuntimeError:
        line = JsonFormatter().format(record("batch %s failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "batch 7 failed"
    assert "RuntimeError: the GPU fell over" in entry["exception"] and "Traceback" in entry["exception"]


def test_text_is_readable_with_the_ids_at_the_end():
    bind_log_context(batch_id=3, model="m")
    try:
        line = TextFormatter().format(record(version_id=4))
    finally:
        clear_log_context()
    assert line.endswith("INFO workers.tasks: batch 7 claimed [model=m batch_id=3 version_id=4]")
    assert "[" not in TextFormatter().format(record())  # no ids, no brackets


# What a forged record would look like: a line of its own, in the text format's shape.
FORGED = "\n2026-01-01 00:00:00,000 ERROR qforget.access: GET /forget-requests 200 0.1ms"


def test_a_text_record_is_one_line_whatever_it_logs():
    line = TextFormatter().format(record("path %s", f"/x{FORGED}", path=f"/x{FORGED}\r\x1b[2K\u2028"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "path /x\\n2026-01-01" in line  # written escaped, still readable
    assert line.endswith("[path=/x\\n2026-01-01 00:00:00,000 ERROR qforget.access: GET /forget-requests 200 0.1ms"
                         "\\r\\x1b[2K\\u2028]")
    assert "\n" not in JsonFormatter().format(record("path %s", f"/x{FORGED}"))


def test_a_traceback_follows_on_indented_lines():
    try:
        raise ValueError(f"bad input{FORGED}")
    except ValueError:
        text = TextFormatter().format(record("batch %s failed", exc_info=sys.exc_info()))
    first, *rest = text.split("\n")
    assert first.endswith("batch 7 failed")
    assert rest[0] == "  Traceback (most recent call last):"
    # The exception's own newline stays a line break, but an indented one: no line reads as a record.
    assert all(line.startswith("  ") for line in rest)
    assert [line for line in rest if line.startswith("  2026-01-01 00:00:00,000 ERROR")]


def test_uvicorns_coloured_copy_of_the_message_is_not_a_field():
    coloured = record("Uvicorn running on %s", "http://x", color_message="Uvicorn running on \x1b[1m%s\x1b[0m")
    assert "color_message" not in TextFormatter().format(coloured)
    assert "color_message" not in json.loads(JsonFormatter().format(coloured))


def test_unknown_context_fields_are_refused():
    with pytest.raises(ValueError, match="subject_id"):
        bind_log_context(subject_id="alice")
    with pytest.raises(ValueError, match="unknown log level"):
        logging_config("LOUD")


@pytest.mark.parametrize(("values", "json_lines"), [
    ({}, False),
    ({"environment": "production", "database_url": "postgresql+psycopg://db/q", "audit_key": "k" * 32}, True),
    ({"environment": "production", "database_url": "postgresql+psycopg://db/q", "audit_key": "k" * 32,
      "log_format": "text"}, False),
    ({"log_format": "json"}, True),
])
def test_json_in_production_unless_told(values, json_lines, tmp_path):
    assert Settings(data_dir=tmp_path, _env_file=None, **values).log_json is json_lines


def test_a_bad_log_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="log_format"):
        Settings(data_dir=tmp_path, log_format="xml", _env_file=None)


def test_a_process_configured_from_its_settings_writes_json_lines(tmp_path):
    # What `qforget api|worker|scheduler` do first, in a fresh process: the root logger's only handler.
    code = ("import logging; from service.core.logging_setup import configure_logging; "
            "from service.core.settings import get_settings; "
            "configure_logging('INFO', get_settings().log_json); "
            "logging.getLogger('qforget.check').info('hello %s', 'there', extra={'batch_id': 5})")
    env = {"QFORGET_LOG_FORMAT": "json", "QFORGET_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": "."}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stderr.strip().splitlines()[-1])
    assert (entry["message"], entry["batch_id"], entry["logger"]) == ("hello there", 5, "qforget.check")


def test_every_response_carries_a_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger="qforget.access"):
        fresh = client.get("/health")
        given = client.get("/health", headers={REQUEST_ID_HEADER: "abc-123.x_y"})
        forged = client.get("/health", headers={REQUEST_ID_HEADER: "bad id\nlevel=ERROR"})
    assert len(fresh.headers[REQUEST_ID_HEADER]) == 32
    assert given.headers[REQUEST_ID_HEADER] == "abc-123.x_y"
    assert forged.headers[REQUEST_ID_HEADER] not in ("bad id\nlevel=ERROR", fresh.headers[REQUEST_ID_HEADER])
    ids = [entry.request_id for entry in caplog.records]
    assert ids == [fresh.headers[REQUEST_ID_HEADER], "abc-123.x_y", forged.headers[REQUEST_ID_HEADER]]
    assert [(entry.method, entry.path, entry.status) for entry in caplog.records] == [("GET", "/health", 200)] * 3


def test_request_lines_name_the_route_not_the_subject(client, seed, caplog):
    with caplog.at_level(logging.INFO, logger="qforget.access"):
        response = client.get("/subjects/alice", params={"limit": "x"})
        missing = client.get("/forget-requests", params={"subject_id": "carol"}, headers={"Authorization": "Bearer no"})
    assert missing.status_code == 401
    lines = [json.loads(JsonFormatter().format(entry)) for entry in caplog.records]
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/subjects/{subject_id}", response.status_code), ("/forget-requests", 401)]
    text = "\n".join(json.dumps(line) for line in lines)
    assert "alice" not in text and "carol" not in text and "Bearer" not in text
    assert all(isinstance(line["duration_ms"], float) and line["request_id"] for line in lines)


def test_unmatched_paths_are_logged_without_them(client, seed, caplog):
    with caplog.at_level(logging.INFO, logger="qforget.access"):
        trailing_slash = client.get("/subjects/subject-0042/")
        unknown = client.get("/nowhere/subject-0042")
        forging = client.get(f"/nowhere{FORGED}".replace("\n", "%0A"))
    assert [trailing_slash.status_code, unknown.status_code, forging.status_code] == [404, 404, 404]
    assert [(entry.path, entry.status) for entry in caplog.records] == [(UNMATCHED_ROUTE, 404)] * 3
    lines = [formatter.format(entry) for entry in caplog.records for formatter in (TextFormatter(), JsonFormatter())]
    assert not [line for line in lines if "subject-0042" in line or "\n" in line or "nowhere" in line]


def test_a_database_outage_is_logged_with_the_route_not_the_path(tmp_path, caplog):
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere", data_dir=tmp_path,
                        _env_file=None)
    key = {"Authorization": "Bearer qf_0123abcd_" + "x" * 43}  # the right shape: the database is asked
    with (TestClient(create_app(settings), raise_server_exceptions=False) as client,
          caplog.at_level(logging.WARNING, logger="service.api.app")):
        response = client.get("/subjects/subject-0042", headers=key)
    assert response.status_code == 503
    [warning] = [entry.getMessage() for entry in caplog.records if entry.name == "service.api.app"]
    assert warning.startswith("GET /subjects/{subject_id}: database unavailable") and "subject-0042" not in warning


def test_a_refused_body_is_logged_with_its_status(client, seed, caplog):
    limit = client.app.state.settings.api_max_body_bytes
    with caplog.at_level(logging.INFO, logger="qforget.access"):
        response = client.post("/forget-requests", content=b"x" * (limit + 1),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and REQUEST_ID_HEADER in response.headers
    assert [(entry.path, entry.status) for entry in caplog.records] == [("/forget-requests", 413)]
