"""How the cost per forget request falls with batch size, through the worker's real code path.

For each batch size B, a copy of one bootstrapped embedded deployment (SQLite, digits CNN) gets B
single-sample forget requests; the batch is claimed, unlearned with Q-MUL, evaluated, stored and
deployed (workers.batches.run), and timed. A Q-MUL epoch is a pass over the retain set, so a
run costs about the same whatever B is and the cost per request falls roughly as 1/B.

    python -m workers.benchmarks.batch_cost [--sizes 1 10 100 1000] [--epochs 10]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from service.core.db import get_engine, transaction
from service.core.models import Sample
from service.core.settings import Settings
from service.requests.intake import file_forget_request
from workers.batches.claims import claim_batch
from workers.batches.run import run_batch
from workers.bootstrap import bootstrap, default_spec


def run(sizes: list[int], epochs: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="qforget-batch-cost-"))
    template = work / "template"
    settings = Settings(data_dir=template, device="cpu", unlearn_epochs=epochs, quality_gate_max_ta_drop=100)
    bootstrap(settings, settings.default_model, default_spec(), progress=True)
    rows = []
    for size in sizes:
        copy = work / f"batch-{size}"
        shutil.copytree(template, copy)
        # The artifact paths in the copied database point into the template's model store, which
        # stays in place: the copy reads the same original version.
        settings_b = settings.model_copy(update={"data_dir": copy, "database_url": f"sqlite:///{copy / 'qforget.db'}",
                                                 "model_store": copy / "models"})
        engine = get_engine(settings_b, f"bench-{size}")
        with transaction(engine) as session:
            samples = session.execute(select(Sample.id, Sample.subject_id).order_by(Sample.id).limit(size)).all()
            for sample_id, subject_id in samples:
                file_forget_request(session, subject_id=subject_id, sample_ids=[sample_id],
                                    model_name=settings.default_model, deadline_days=30, actor="bench")
        started = time.perf_counter()
        claimed = claim_batch(engine, settings_b, settings.default_model)
        version_id = run_batch(engine, settings_b, claimed, progress=True)
        seconds = time.perf_counter() - started
        rows.append({"requests": size, "run_seconds": round(seconds, 2),
                     "seconds_per_request": round(seconds / size, 4), "version_id": version_id})
        print(json.dumps(rows[-1]), flush=True)
        engine.dispose()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--epochs", type=int, default=10, help="Q-MUL epochs per run (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    rows = run(args.sizes, args.epochs, args.threads)
    base = rows[0]["seconds_per_request"]
    print(f"\n{'requests':>9} {'run s':>8} {'s/request':>10} {'vs batch of ' + str(rows[0]['requests']):>16}")
    for row in rows:
        print(f"{row['requests']:>9} {row['run_seconds']:>8.2f} {row['seconds_per_request']:>10.4f} "
              f"{row['seconds_per_request'] / base:>16.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
