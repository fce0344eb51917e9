"""What per-model erasure costs at a million samples, on PostgreSQL: the holding record's size, and
the bookkeeping of one subject's request that fans out to three models.

A scratch database gets a data set of N samples (10 per subject), three deployed models on it, and
F of the samples already forgotten by each model. Timed, each the median of R repetitions:
filing one subject's request (the fan-out: which of the three models hold its samples), reading
a model's retain set (every sample it holds: what a run and a reference read), and recording a
deployment's forgotten samples. The record is sparse (a row per model and forgotten sample); its
size is printed beside what a per-version bitmap of the data set would take.

    python -m workers.benchmarks.fanout [--samples 1000000] [--forgotten 100000] [--repeat 5]
"""

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, make_url, text
from sqlalchemy.pool import NullPool
from tqdm import tqdm

from service.core.audit_log import AuditLogConfig
from service.core.db import make_engine, transaction
from service.core.migrate import upgrade_database
from service.core.models import Dataset, ForgottenSample, Model, ModelVersion, Sample, Subject, VersionKind, utcnow
from service.requests.holdings import held_by
from service.requests.intake import file_forget_request

MODELS = ("model-a", "model-b", "model-c")
CHUNK = 50_000


def _timed(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _populate(engine, samples: int, forgotten: int) -> None:
    subjects = samples // 10
    with transaction(engine) as session:
        session.add(Dataset(name="big", train_size=samples))
        for start in tqdm(range(0, subjects, CHUNK), desc="subjects", unit="chunk"):
            session.execute(insert(Subject), [{"id": f"s{i:07d}"} for i in range(start, min(start + CHUNK, subjects))])
    with transaction(engine) as session:
        for start in tqdm(range(0, samples, CHUNK), desc="samples", unit="chunk"):
            session.execute(insert(Sample), [{"dataset": "big", "dataset_index": i, "subject_id": f"s{i // 10:07d}"}
                                             for i in range(start, min(start + CHUNK, samples))])
    with transaction(engine) as session:
        for name in MODELS:
            session.add(Model(name=name, dataset="big", spec={}))
            session.flush()
            version = ModelVersion(model_name=name, kind=VersionKind.original, method="qat", config={}, metrics={},
                                   sha256="0" * 64, artifact_path="/nonexistent", excluded_sample_ids=[])
            session.add(version)
            session.flush()
            session.get(Model, name).deployed_version_id = version.id
            # The last `forgotten` samples, so that the first subjects are still held by every model.
            first_id = session.execute(text("SELECT MIN(id) FROM samples")).scalar()
            for start in range(samples - forgotten, samples, CHUNK):
                session.execute(insert(ForgottenSample), [
                    {"model_name": name, "sample_id": first_id + i, "forgotten_at": utcnow(), "version_id": version.id}
                    for i in range(start, min(start + CHUNK, samples))
                ])
        session.execute(text("ANALYZE"))


def run(admin_url: str, samples: int, forgotten: int, repeat: int) -> dict:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"qforget_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    # Filing appends to the audit log, which is keyed: a throwaway key, its checkpoints in a scratch folder.
    scratch = Path(tempfile.mkdtemp(prefix="qforget-fanout-"))
    try:
        upgrade_database(url)
        engine = make_engine(url, "bench", audit=AuditLogConfig(key=secrets.token_bytes(32),
                                                                checkpoint_file=scratch / "checkpoints.jsonl"))
        _populate(engine, samples, forgotten)
        subject_numbers = iter(range(samples // 10))

        def file_one():
            with transaction(engine) as session:
                filed = file_forget_request(session, subject_id=f"s{next(subject_numbers):07d}", sample_ids=None,
                                            model_name=None, deadline_days=30, actor="bench")
                assert len(filed.parts) == len(MODELS)

        def read_retain_set():
            with engine.connect() as connection:
                rows = connection.execute(held_by("model-a", "big")).all()
                assert len(rows) == samples - forgotten

        deployed = iter(range(10, samples, 10))

        def record_deployment():
            with transaction(engine) as session:
                first = next(deployed)
                session.execute(insert(ForgottenSample), [
                    {"model_name": "model-a", "sample_id": i, "forgotten_at": utcnow(), "version_id": 1}
                    for i in range(first, first + 10)
                ])

        figures = {
            "samples": samples, "forgotten_per_model": forgotten, "models": len(MODELS),
            "file_one_subject_fanout_ms": 1000 * _timed(file_one, repeat),
            "read_retain_set_ms": 1000 * _timed(read_retain_set, repeat),
            "record_10_forgotten_ms": 1000 * _timed(record_deployment, repeat),
        }
        with engine.connect() as connection:
            figures["forgotten_samples_table_mib"] = connection.execute(
                text("SELECT pg_total_relation_size('forgotten_samples')")).scalar() / 2**20
        # What the alternative would store: one bitmap of the data set per version of each model.
        figures["bitmap_per_version_mib"] = samples / 8 / 2**20
        engine.dispose()
        return figures
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="a PostgreSQL database to create the scratch database from")
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--forgotten", type=int, default=100_000, help="samples each model has forgotten already")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    figures = run(args.admin_url, args.samples, args.forgotten, args.repeat)
    for key, value in figures.items():
        print(f"{key:32s} {value:,.2f}" if isinstance(value, float) else f"{key:32s} {value:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
