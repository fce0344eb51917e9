"""/metrics and /dashboard/data: every operations figure, read from the database and the broker."""

import os
import shutil
import subprocess

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.core.settings import Settings
from tests.api.operations_seed import GAPS, HOLD_REASON, METRICS, REFERENCE_METRICS, seed_operations

REDIS_TEST_URL = "redis://127.0.0.1:6379/13"


def samples(exposition: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of a Prometheus text exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition) for sample in family.samples}


def promtool_check(exposition: str, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package prometheus; .ci/run installs it)")
        return
    path = tmp_path / "metrics.txt"
    path.write_text(exposition)
    with path.open() as stdin:
        checked = subprocess.run([promtool, "check", "metrics"], stdin=stdin, capture_output=True, text=True,
                                 check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def operations(engine, seed):
    return seed_operations(engine, seed)


@pytest.fixture
def app_with_broker(database_url, tmp_path, bearer):
    """A TestClient (admin key) on an app whose settings use the given broker URL."""
    clients = []

    def make(broker_url: str) -> TestClient:
        settings = Settings(database_url=database_url, data_dir=tmp_path / "var", broker_url=broker_url,
                            _env_file=None)
        client = TestClient(create_app(settings), headers=bearer("admin"))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_metrics_expose_every_operations_figure(anonymous, operations, tmp_path):
    response = anonymous.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    model = (("model", operations.model),)

    def value(name, *labels):
        return got[(name, tuple(sorted(model + labels)))]

    assert value("qforget_forget_requests", ("status", "pending")) == operations.pending_requests
    assert value("qforget_forget_requests", ("status", "completed")) == operations.completed_requests
    assert value("qforget_forget_requests_past_due") == operations.past_due
    assert value("qforget_forget_requests_due_soon") == operations.past_due  # the other one is due in 30 days
    assert 35 * 86400 - 60 < value("qforget_oldest_open_request_age_seconds") < 35 * 86400 + 60
    assert value("qforget_pending_samples") == operations.pending_samples

    # The histogram is cumulative: 40 s and 95 s fall in le=60 (one) and le=120 (both).
    assert value("qforget_batch_duration_seconds_count") == 2
    assert value("qforget_batch_duration_seconds_sum") == pytest.approx(sum(operations.batch_durations), abs=0.01)
    assert value("qforget_batch_duration_seconds_bucket", ("le", "30.0")) == 0
    assert value("qforget_batch_duration_seconds_bucket", ("le", "60.0")) == 1
    assert value("qforget_batch_duration_seconds_bucket", ("le", "120.0")) == 2
    assert value("qforget_batch_duration_seconds_bucket", ("le", "+Inf")) == 2
    assert value("qforget_last_batch_duration_seconds") == pytest.approx(operations.batch_durations[-1], abs=0.01)

    assert value("qforget_batches", ("status", "held")) == 1
    assert value("qforget_batches", ("status", "completed")) == 2
    assert value("qforget_batch_events_total", ("event", "held")) == 1
    assert value("qforget_batch_events_total", ("event", "claimed")) == 3
    assert 3590 < value("qforget_oldest_held_batch_age_seconds") < 3700
    assert 200 < value("qforget_batch_lease_remaining_seconds") <= operations.lease_seconds

    assert value("qforget_deployed_version") == operations.deployed_version_id
    for metric in METRICS:
        assert value("qforget_deployed_metric_percent", ("metric", metric)) == METRICS[metric]
        assert value("qforget_reference_metric_percent", ("metric", metric)) == REFERENCE_METRICS[metric]
    assert value("qforget_deployed_gap_percent", ("metric", "AG")) == pytest.approx(GAPS["AG"])
    assert 290 < value("qforget_evaluation_age_seconds") < 400
    assert value("qforget_evaluation_approximate") == 0
    assert value("qforget_model_versions", ("kind", "unlearned")) == 2

    # The embedded default's broker: a folder, answering, with nothing queued yet.
    assert got[("qforget_broker_up", (("transport", "filesystem"),))] == 1
    assert got[("qforget_queue_messages", (("queue", "gpu"),))] == 0
    for labels in {labels for _, labels in got}:
        assert not {"subject", "subject_id", "request", "request_id"} & {name for name, _ in labels}
    promtool_check(response.text, tmp_path)


def test_metrics_of_an_empty_database_are_valid(anonymous, tmp_path):
    response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE qforget_batch_duration_seconds histogram" in response.text
    assert "qforget_forget_requests{" not in response.text
    promtool_check(response.text, tmp_path)


def _queue_gpu_runs(settings: Settings, count: int) -> None:
    # Real Celery messages, routed as the scheduler's are; no worker consumes them here.
    from service.core.tasks import UNLEARN_TASK
    from workers.celery_app import create_celery

    celery = create_celery(settings)
    for _ in range(count):
        celery.send_task(UNLEARN_TASK, args=["digits-cnn-4bit"])
    celery.close()


def test_queue_depth_of_the_filesystem_broker(client, seed):
    _queue_gpu_runs(client.app.state.settings, 2)
    got = samples(client.get("/metrics").text)
    assert got[("qforget_queue_messages", (("queue", "gpu"),))] == 2
    assert got[("qforget_queue_messages", (("queue", "control"),))] == 0


@pytest.fixture
def redis_broker():
    connection = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        connection.flushdb()
    except redis.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_TEST_URL} is unreachable: {exc}")
        pytest.skip(f"Redis at {REDIS_TEST_URL} is unreachable: {exc}")
    yield REDIS_TEST_URL
    connection.flushdb()
    connection.close()


def test_queue_depth_of_the_redis_broker(app_with_broker, redis_broker, seed):
    client = app_with_broker(redis_broker)
    _queue_gpu_runs(client.app.state.settings, 3)
    got = samples(client.get("/metrics").text)
    assert got[("qforget_broker_up", (("transport", "redis"),))] == 1
    assert got[("qforget_queue_messages", (("queue", "gpu"),))] == 3
    assert got[("qforget_queue_messages", (("queue", "control"),))] == 0


def test_an_unreachable_broker_reads_as_down_not_as_an_error(app_with_broker, seed, tmp_path):
    client = app_with_broker("redis://127.0.0.1:1/0")  # nothing listens on port 1
    response = client.get("/metrics")
    assert response.status_code == 200
    got = samples(response.text)
    assert got[("qforget_broker_up", (("transport", "redis"),))] == 0
    assert not [name for name, _ in got if name == "qforget_queue_messages"]
    assert got[("qforget_deployed_version", (("model", seed.model),))] == seed.version_id
    promtool_check(response.text, tmp_path)


def test_dashboard_data_is_the_same_figures_for_auditors(client, anonymous, bearer, operations):
    response = client.get("/dashboard/data", headers=bearer("auditor"))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    data = response.json()
    assert {"model": operations.model, "status": "pending", "count": 2} in data["requests"]
    assert data["due"][0]["past_due"] == operations.past_due
    [durations] = data["batch_durations"]
    assert durations["count"] == 2 and durations["last_seconds"] == pytest.approx(95.0, abs=0.01)
    [held] = data["held_batches"]
    assert (held["batch_id"], held["reason"]) == (operations.held_batch_id, HOLD_REASON)
    [deployment] = data["deployments"]
    assert deployment["version_id"] == operations.deployed_version_id
    assert deployment["evaluation"]["metrics"] == METRICS
    assert deployment["evaluation"]["reference_metrics"] == REFERENCE_METRICS
    assert data["broker"] == {"transport": "filesystem", "up": True, "queues": {"gpu": 0, "control": 0}}


def test_dashboard_data_needs_an_auditor_key(client, anonymous, bearer, seed):
    unauthenticated = anonymous.get("/dashboard/data")
    assert unauthenticated.status_code == 401 and "API key" in unauthenticated.json()["detail"]
    forbidden = client.get("/dashboard/data", headers=bearer("submitter"))
    assert forbidden.status_code == 403 and "auditor" in forbidden.json()["detail"]


def test_the_dashboard_page_is_static_and_locked_down(anonymous):
    page = anonymous.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert '<script src="/dashboard/assets/dashboard.js"' in page.text
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = anonymous.get(f"/dashboard/assets/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), asset
        # Nothing from elsewhere (the SVG namespace is a name, not something loaded).
        text = response.text.replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text
    missing = anonymous.get("/dashboard/assets/..%2Fmetrics.py")
    assert missing.status_code == 404
    assert anonymous.get("/dashboard/assets/app.py").status_code == 404
