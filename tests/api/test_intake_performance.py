"""Request intake under load: bounded database work per request, a bounded number of sessions at
once, an API process without model code, and the `qforget loadtest` command. No timed assertion:
the speed figures come from `qforget loadtest` (docs/performance.md)."""

import asyncio
import subprocess
import threading
import time

import httpx
import pytest
from sqlalchemy import event, insert, select, text

from service import cli
from service.core.db import transaction
from service.core.models import Sample, Subject
from tests.conftest import POSTGRES_ADMIN_URL


def count_statements(engine):
    """A list that collects every statement the engine sends, and a function that stops collecting."""
    statements: list[str] = []

    def collect(conn, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", collect)
    return statements, lambda: event.remove(engine, "before_cursor_execute", collect)


def add_subject(engine, subject: str, samples: int, first_index: int) -> list[int]:
    with transaction(engine) as session:
        session.execute(insert(Subject), [{"id": subject}])
        session.execute(insert(Sample), [{"dataset": "digits", "dataset_index": first_index + i, "subject_id": subject}
                                         for i in range(samples)])
        return list(session.scalars(select(Sample.id).where(Sample.subject_id == subject).order_by(Sample.id)))


def authenticate_once(client) -> None:
    """A request that leaves the client's key in the API's key cache (service/api/deps.py)."""
    assert client.get("/models").status_code == 200


def test_reading_a_request_runs_the_same_few_statements_for_5_or_500_samples(client, seed, engine):
    zoe = add_subject(engine, "zoe", 505, 500)
    small = client.post("/forget-requests", json={"subject_id": "zoe", "sample_ids": zoe[:5]}).json()["id"]
    large = client.post("/forget-requests", json={"subject_id": "zoe", "sample_ids": zoe[5:]}).json()["id"]
    authenticate_once(client)
    statements, stop = count_statements(client.app.state.engine)
    try:
        read_small = client.get(f"/forget-requests/{small}")
        small_count = len(statements)
        statements.clear()
        read_large = client.get(f"/forget-requests/{large}")
    finally:
        stop()
    assert read_small.status_code == read_large.status_code == 200
    assert read_large.json()["sample_ids"] == zoe[5:]
    assert len(statements) == small_count, statements
    # The request with its samples in one statement, its parts in another (SQLite adds its BEGIN
    # IMMEDIATE); the key was authenticated by an earlier request.
    assert len([s for s in statements if not s.startswith("BEGIN")]) == 2, statements


def test_an_unknown_request_is_404_after_the_same_statements(client, seed):
    authenticate_once(client)
    statements, stop = count_statements(client.app.state.engine)
    try:
        response = client.get("/forget-requests/00000000-0000-0000-0000-000000000000")
    finally:
        stop()
    assert response.status_code == 404
    assert len([s for s in statements if not s.startswith("BEGIN")]) == 1, statements


def test_filing_a_request_does_not_read_its_samples_back(client, seed):
    alice = seed.samples["alice"]
    authenticate_once(client)
    statements, stop = count_statements(client.app.state.engine)
    try:
        response = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:3]})
    finally:
        stop()
    assert response.status_code == 202, response.text
    assert response.json()["sample_ids"] == alice[:3]
    # The models, the subject, the samples, which model forgot them, their open parts, three inserts
    # (request, samples, parts), the audit lock (PostgreSQL), the newest audit hash, the audit entry:
    # nothing else.
    sent = [s for s in statements if not s.startswith("BEGIN")]
    assert len(sent) <= 11, sent
    # After the audit entry (which takes the audit lock, held to the commit) nothing is read.
    audit_insert = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO audit_log"))
    assert not any(s.startswith("SELECT") for s in statements[audit_insert:]), statements[audit_insert:]


def test_at_most_api_database_sessions_requests_hold_a_connection_at_once(settings, seed, bearer):
    from service.api.app import create_app

    settings.api_database_sessions = 2
    app = create_app(settings)
    engine = app.state.engine
    held, most, lock = 0, 0, threading.Lock()

    def checkout(*_):
        nonlocal held, most
        with lock:
            held += 1
            most = max(most, held)

    def checkin(*_):
        nonlocal held
        with lock:
            held -= 1

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    headers = bearer("submitter")

    async def many_reads() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            responses = await asyncio.gather(*(client.get(f"/forget-requests?subject_id=alice&limit={1 + i}")
                                               for i in range(12)))
        return [response.status_code for response in responses]

    try:
        assert asyncio.run(many_reads()) == [200] * 12
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "checkin", checkin)
        engine.dispose()
    assert 1 <= most <= 2


def test_api_database_sessions_beyond_the_pool_is_refused_naming_it(tmp_path):
    from pydantic import ValidationError

    from service.core.settings import Settings

    with pytest.raises(ValidationError, match="api_database_sessions"):
        Settings(data_dir=tmp_path, api_database_sessions=31, _env_file=None)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--duration", "0"], "--duration"),
        (["--get-share", "1"], "--get-share"),
        (["--connections", "0"], "--connections"),
        (["--rate", "0"], "--rate"),
        (["--url", "http://example.com:8000", "--database-url", "sqlite://"], "--url"),
        (["--url", "http://127.0.0.1:8000"], "--database-url"),
    ],
)
def test_loadtest_refuses_bad_options_naming_them(arguments, named, capsys, postgres_admin):
    databases = _load_databases(postgres_admin)
    assert cli.main(["loadtest", *arguments]) == 2
    assert named in capsys.readouterr().err
    assert _load_databases(postgres_admin) == databases  # nothing was created


def _load_databases(admin) -> set[str]:
    with admin.connect() as connection:
        return set(connection.scalars(text("SELECT datname FROM pg_database WHERE datname LIKE 'qforget_load_%'")))


def test_loadtest_drives_a_real_api_and_cleans_up(postgres_admin, tmp_path, capsys):
    databases = _load_databases(postgres_admin)
    code = cli.main(["loadtest", "--requests", "60", "--duration", "60", "--warmup", "0", "--connections", "4",
                     "--api-workers", "1", "--postgres-url", POSTGRES_ADMIN_URL, "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["POST"], ["GET"])}
    assert int(rows["POST"][1]) + int(rows["GET"][1]) == 60, out  # every request answered as expected
    assert int(rows["POST"][1]) > 0 and int(rows["GET"][1]) > 0, out
    assert "errors: 0;" in out
    assert "API peak RSS" in out
    assert _load_databases(postgres_admin) == databases  # its database was dropped


def test_loadtest_beside_a_training_run_reports_its_share_and_stops_it(postgres_admin, tmp_path, capsys):
    code = cli.main(["loadtest", "--requests", "20", "--duration", "60", "--warmup", "0", "--connections", "2",
                     "--api-workers", "1", "--postgres-url", POSTGRES_ADMIN_URL, "--log-dir", str(tmp_path),
                     "--beside-training"])
    out = capsys.readouterr().out
    assert code == 0, out
    [share] = [line for line in out.splitlines() if line.startswith("training run beside it:")]
    assert float(share.split()[-2]) > 0.1, out  # it was training, not starting up
    leftover = subprocess.run(["pgrep", "-f", "epoch_floor.*--retrain-epochs 100000"], capture_output=True)
    assert leftover.stdout == b"", leftover.stdout  # stopped with the API


def test_loadtest_at_a_fixed_rate_sends_that_many_requests(postgres_admin, tmp_path, capsys):
    code = cli.main(["loadtest", "--rate", "40", "--duration", "1", "--warmup", "0", "--connections", "4",
                     "--api-workers", "1", "--postgres-url", POSTGRES_ADMIN_URL, "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] == ["all"]}
    assert rows["all"][1] == "40", out  # one request every 25 ms for 1 s, each answered
    assert "40 requests/s offered on schedule" in out


def test_an_open_loop_load_counts_the_wait_for_a_busy_connection_as_latency():
    """A server that takes 100 ms per answer, one connection, 20 requests/s due for 1 s: the
    requests queue behind each other, and the last is answered about 1 s after it was due. A
    closed loop would have sent 10 requests, each 100 ms, and hidden the queue."""
    from service.cli.loadtest import Load

    async def slow_server(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            await asyncio.sleep(0.1)
            body = b'{"id": "r"}'
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(slow_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        load = Load(host="127.0.0.1", port=port, key="k", samples=[(10_000 + i, "subject-0001") for i in range(50)],
                    duration=1.0, max_requests=None, get_share=0.0, warmup=0.0, rate=20.0)
        async with server:
            return await load.run(connections=1)

    results = asyncio.run(run())
    latencies = results.latencies["POST"]
    assert len(latencies) == 20 and not results.errors
    assert latencies[0] < 0.5
    assert latencies[-1] > 0.9  # due at 0.95 s, answered after the 19 before it (about 2 s)


def test_loadtest_counts_unexpected_answers_as_errors():
    from service.cli.loadtest import Results, report

    results = Results(seconds=2.0)
    results.latencies["POST"] = [0.010, 0.020]
    results.errors["POST 409"] = 3
    text_report = report(results)
    assert "errors: 3 (POST 409: 3)" in text_report
    assert text_report.splitlines()[1].split()[:3] == ["POST", "2", "1"]  # 2 answered, 1 per second


def test_a_pooled_connection_is_pinged_only_after_sitting_idle(postgres_url, monkeypatch):
    import psycopg

    from service.core import db

    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = db.make_engine(postgres_url, "test")
    pings = []
    monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(1) or True)
    try:
        with engine.connect() as connection:
            backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        with engine.connect() as connection:  # reused at once: no ping, no round trip
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar() == backend
        assert pings == []
        monkeypatch.undo()
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.2)
        # The server drops the connection while it sits in the pool: the ping at the next
        # checkout finds it dead and a new one serves the statement, without an error.
        plain_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [backend])
        time.sleep(0.3)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar() != backend
    finally:
        engine.dispose()
