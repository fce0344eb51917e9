"""`qforget demo`: the whole flow on the embedded default, as separate processes talking over HTTP.

Bootstraps the digits model (QAT, with progress), starts the API, a real Celery worker and the
scheduler, files deletion requests as a client would, waits for them to be unlearned, trains the
retrain reference (POST /models/{model}/references), prints the audit and saves the audit report
(GET /audit/report) as audit-report.html in the data folder.
"""

import os
import shutil
import socket
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from service.cli.processes import Processes

METRICS = ("FA", "RA", "TA", "MIA")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _row(label: str, metrics: dict, extra: str = "") -> str:
    return f"  {label:<30}" + "".join(f"{metrics[key]:>8.2f}" for key in METRICS) + extra


def run_demo(data_dir: str = "var/demo", subjects: int = 12, epochs: int | None = None) -> int:
    started = time.monotonic()
    data_dir = Path(data_dir).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "logs").mkdir(parents=True)
    port = _free_port()
    env = {
        **os.environ,
        "QFORGET_DATA_DIR": str(data_dir),
        # The embedded default, whatever the caller's environment says.
        "QFORGET_DATABASE_URL": "",
        "QFORGET_BROKER_URL": "",
        "QFORGET_MODEL_STORE": str(data_dir / "models"),
        "QFORGET_SCHEDULER_INTERVAL_SECONDS": "2",
        "QFORGET_BATCH_MIN_SAMPLES": "1",  # a demo has no traffic to wait for
        # The worker shares two cores with the API, the scheduler and this process.
        "QFORGET_TORCH_THREADS": "1",
        "QFORGET_API_PORT": str(port),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                    os.environ.get("PYTHONPATH")])),
    }
    os.environ.update(env)  # this process bootstraps with the same settings as its children

    from service.core.settings import get_settings
    from workers.bootstrap import bootstrap, default_spec

    get_settings.cache_clear()
    settings = get_settings()
    print(f"qforget demo: embedded default in {data_dir} (SQLite, filesystem broker, local model store)")
    print("1/5 bootstrap: quantization-aware training of the digits CNN (LSQ+, 4-bit weights and activations)")
    original_id = bootstrap(settings, settings.default_model, default_spec(epochs))
    # The API wants an API key: made in-process here, as `qforget keys create --role admin` would.
    from service.core.api_keys import create_api_key
    from service.core.db import get_engine, transaction

    with transaction(get_engine(settings, "cli")) as session:
        _, api_key = create_api_key(session, role="admin", name="demo", actor="cli:demo")

    processes = Processes(env, data_dir / "logs")
    try:
        print(f"2/5 starting the API on 127.0.0.1:{port}, a Celery worker and the scheduler (logs in {data_dir / 'logs'})")
        processes.start("api", "api")
        processes.start("worker", "worker", "--concurrency", "1")
        processes.start("scheduler", "scheduler")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {api_key}"})

        def ready():
            try:
                return client.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        processes.wait_until(ready, "the API to be ready", timeout=60)

        print(f"3/5 filing deletion requests for {subjects} subjects over HTTP")
        request_ids = []
        for number in range(1, subjects + 1):
            response = client.post("/forget-requests", json={"subject_id": f"subject-{number:04d}"})
            response.raise_for_status()
            body = response.json()
            request_ids.append(body["id"])
            print(f"  POST /forget-requests subject-{number:04d} -> {response.status_code} {body['status']}, "
                  f"{body['sample_count']} samples, due {body['due_at'][:10]}")
        rejected = client.post("/forget-requests", json={"subject_id": "nobody"})
        print(f"  POST /forget-requests subject 'nobody' -> {rejected.status_code} {rejected.json()['detail'][0]['msg']}")

        print("4/5 waiting for the scheduler to batch them and the worker to run Q-MUL")
        with tqdm(total=len(request_ids), desc="requests completed", unit="req") as bar:
            def all_completed():
                statuses = [client.get(f"/forget-requests/{rid}").json() for rid in request_ids]
                failed = [part for s in statuses for part in s["parts"] if part["error"]]
                if failed:
                    raise RuntimeError(f"a batch of model {failed[0]['model']} failed: {failed[0]['error']}")
                done = sum(s["status"] == "completed" for s in statuses)
                bar.update(done - bar.n)
                return statuses if done == len(statuses) else None

            statuses = processes.wait_until(all_completed, "the requests to complete", timeout=600, interval=1)
        versions = sorted({part["completed_version_id"] for s in statuses for part in s["parts"]})
        print(f"  all {len(statuses)} requests completed by model version(s) {versions}")

        print("5/5 training the retrain reference (from scratch, without the forgotten samples) and auditing")
        queued = client.post(f"/models/{settings.default_model}/references")
        queued.raise_for_status()
        print(f"  POST /models/{settings.default_model}/references -> {queued.status_code}, reference request "
              f"{queued.json()['id']} for version {queued.json()['deployed_version_id']} (the scheduler sends it)")
        audit = processes.wait_until(lambda: (a := client.get("/audit").json())["status"] == "current" and a,
                                     "the audit evaluation", timeout=600, interval=1)
        evaluation = audit["evaluation"]
        report = client.get("/audit/report", params={"model": settings.default_model})
        report.raise_for_status()
        report_path = data_dir / "audit-report.html"
        report_path.write_text(report.text, encoding="utf-8")
    finally:
        processes.stop()

    from service.core.db import get_engine
    from workers.evaluation.deployment import evaluate_on_deployment_splits

    # The untouched original on the audit's splits: a method that does not beat it did nothing.
    original_metrics = evaluate_on_deployment_splits(get_engine(settings, "cli"), settings,
                                                     settings.default_model, original_id)
    reference = evaluation["reference_metrics"]
    original_gap = sum(abs(original_metrics[k] - reference[k]) for k in METRICS) / len(METRICS)
    print()
    print(f"Audit of model {audit['model']} (forget {evaluation['forget_count']} / retain "
          f"{evaluation['retain_count']} / test {evaluation['test_count']} samples), in percent:")
    print(f"  {'':<30}" + "".join(f"{key:>8}" for key in METRICS) + "      AG")
    print(_row(f"deployed, Q-MUL (v{evaluation['version_id']})", evaluation["metrics"],
               f"{evaluation['gaps']['AG']:>8.2f}"))
    print(_row(f"retrain reference (v{evaluation['reference_id']})", reference))
    print(_row("gap |deployed - reference|", evaluation["gaps"]))
    print(_row(f"original, no unlearning (v{original_id})", original_metrics, f"{original_gap:>8.2f}"))
    print()
    print(f"Audit report (printable HTML): {report_path}")
    print(f"Artifacts: model store {settings.model_store}, database {settings.database_url}, logs {data_dir / 'logs'}")
    print(f"Demo finished in {time.monotonic() - started:.0f} s")
    return 0
