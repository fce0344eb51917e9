"""Semi-parametric models (SPM): what the instant stage costs, and what each stage forgets.

Two parts, each printing its figures:

- `timing`: request-to-effect time of the instant stage on a CIFAR-10-sized datastore (the 50,000
  training images embedded by a cifar-cnn encoder, int8). A scratch SQLite database holds the model,
  the 50,000 samples (10 per subject) and its deployed SPM version; each repetition files one
  subject's request (committed), then runs the instant stage (workers.instant.take_instant_effect,
  without the evidence, which follows the commit) and reports the time from the request's commit to
  the stage's commit, with the engine's share (load, remove, save) and the nearest-neighbour search
  (torch top-k; faiss when installed) at that datastore size. The encoder is untrained: the figures
  depend on the sizes, not the weights.
- `quality`: FA, RA, TA and MIA of an SPM before, after the instant stage (datastore without the
  forget set), after the batch (Q-MUL on the encoder, the datastore embedded again), and of an SPM
  retrained without the forget set, with the gaps and AG to it; beside them the parametric model of
  the same encoder architecture, trained with the same recipe.

    python -m workers.benchmarks.spm timing [--repeat 5]
    python -m workers.benchmarks.spm quality [--dataset digits] [--epochs 15] [--forget-ratio 0.1]
"""

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from sqlalchemy import insert

from workers import engine as qf

SUBJECT_SIZE = 10


def timing(args) -> None:
    from service.core.audit_log import AuditLogConfig
    from service.core.db import make_engine, transaction
    from service.core.migrate import upgrade_database
    from service.core.models import Dataset, Model, ModelVersion, Sample, Subject, VersionKind
    from service.core.settings import Settings
    from service.requests.intake import file_forget_request
    from workers.instant import take_instant_effect

    spec = qf.ModelSpec(architecture="cifar-cnn", dataset="cifar10", spm={"embed_dim": args.embed_dim})
    started = time.perf_counter()
    data = spec.load_data()
    network = qf.build_datastore(spec.build(), data.train, range(len(data.train)))
    print(f"datastore: {network.datastore_size()} rows x {args.embed_dim} int8 "
          f"(embedded in {time.perf_counter() - started:.0f} s)")
    for queries in (1, args.queries):
        search(network, data.test.x[:queries])

    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(database_url=f"sqlite:///{scratch}/qforget.db", data_dir=Path(scratch), _env_file=None)
        upgrade_database(settings.database_url)
        engine = make_engine(settings.database_url, "benchmark", audit=AuditLogConfig.from_settings(settings))
        path, sha256 = qf.save_artifact(network, {"model": spec.model_kwargs(), "dataset": spec.dataset},
                                        Path(settings.model_store))
        print(f"artifact: {path.stat().st_size / 1e6:.1f} MB")
        subjects = [f"subject-{i:05d}" for i in range(len(data.train) // SUBJECT_SIZE)]
        with transaction(engine) as session:
            session.add(Dataset(name=spec.dataset, train_size=len(data.train)))
            session.execute(insert(Subject), [{"id": subject} for subject in subjects])
            session.execute(insert(Sample), [{"dataset": spec.dataset, "dataset_index": i,
                                              "subject_id": subjects[i // SUBJECT_SIZE]}
                                             for i in range(len(data.train))])
            session.add(Model(name="spm", dataset=spec.dataset, spec=spec.to_dict(), semi_parametric=True))
            session.flush()
            version = ModelVersion(model_name="spm", kind=VersionKind.original, method="qat", config={},
                                   metrics={}, sha256=sha256, artifact_path=str(path), excluded_sample_ids=[])
            session.add(version)
            session.flush()
            session.get(Model, "spm").deployed_version_id = version.id
        effects = []
        for repetition in range(args.repeat):
            with transaction(engine) as session:
                file_forget_request(session, subject_id=subjects[repetition], sample_ids=None, model_name="spm",
                                    deadline_days=30, actor="benchmark")
            filed = time.perf_counter()
            take_instant_effect(engine, settings, "spm", evidence=False)
            effects.append(time.perf_counter() - filed)
        engine.dispose()
    print(f"request to effect (commit to commit), {args.repeat} requests: median {statistics.median(effects):.3f} s, "
          f"max {max(effects):.3f} s, first {effects[0]:.3f} s")

    parts = {}
    with tempfile.TemporaryDirectory() as scratch:
        path_copy, sha256 = qf.save_artifact(network, {"model": spec.model_kwargs()}, Path(scratch))
        for _ in range(args.repeat):
            begun = time.perf_counter()
            loaded, loaded_spec = qf.load_artifact(path_copy, sha256)
            loaded_at = time.perf_counter()
            loaded.remove_samples(range(SUBJECT_SIZE))
            removed_at = time.perf_counter()
            qf.save_artifact(loaded, loaded_spec, Path(scratch))
            saved_at = time.perf_counter()
            for name, seconds in (("load", loaded_at - begun), ("remove", removed_at - loaded_at),
                                  ("save", saved_at - removed_at)):
                parts.setdefault(name, []).append(seconds)
    print("engine share (median): " + ", ".join(f"{name} {statistics.median(v):.3f} s" for name, v in parts.items()))


def search(network, queries: torch.Tensor) -> None:
    """k-nearest-neighbour search at this datastore size: torch top-k, and faiss's exact L2 index."""
    network.eval()
    begun = time.perf_counter()
    with torch.no_grad():
        q = network.encoder(queries)
    encoder_ms = (time.perf_counter() - begun) / len(q) * 1000
    k = network.options.k
    network.store_embeddings()  # dequantized once per datastore, not per query
    begun = time.perf_counter()
    for _ in range(5):
        network.nearest(q, k)
    torch_ms = (time.perf_counter() - begun) / 5 / len(q) * 1000
    line = (f"nearest {k} of {network.datastore_size()} for {len(q)} queries: encoder {encoder_ms:.3f} ms/query, "
            f"torch top-k {torch_ms:.3f} ms/query")
    try:
        import faiss  # not a dependency: measured where installed
    except ImportError:
        print(line + "; faiss not installed")
        return
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(network.store_embeddings().numpy())
    begun = time.perf_counter()
    for _ in range(5):
        index.search(q.numpy(), k)
    faiss_ms = (time.perf_counter() - begun) / 5 / len(q) * 1000
    print(line + f", faiss IndexFlatL2 {faiss_ms:.3f} ms/query")


def quality(args) -> None:
    options = {"train_per_class": args.train_per_class} if args.train_per_class else {}
    spm_spec = qf.ModelSpec(architecture=args.architecture, dataset=args.dataset, data_options=options,
                            train=qf.TrainConfig(epochs=args.epochs), spm={"embed_dim": args.embed_dim})
    parametric_spec = replace(spm_spec, spm=None)
    data = spm_spec.load_data()
    forget_index, retain_index = qf.random_forget_split(len(data.train), args.forget_ratio, seed=0)
    forget, retain = data.train.subset(forget_index), data.train.subset(retain_index)
    rows, times = {}, {}

    def timed(name, action):
        begun = time.perf_counter()
        result = action()
        times[name] = time.perf_counter() - begun
        return result

    parametric = timed("parametric", lambda: qf.train_original(parametric_spec, data, progress=False))
    spm = timed("spm", lambda: qf.train_original(spm_spec, data, progress=False))
    retrained = timed("retrain", lambda: qf.retrain_reference(spm_spec, retain, progress=False,
                                                              indices=retain_index.tolist()))
    instant = copy.deepcopy(spm)
    timed("instant", lambda: instant.remove_samples(forget_index.tolist()))
    batch_result = timed("batch", lambda: qf.unlearn("qmul", copy.deepcopy(instant), forget, retain,
                                                     qf.QMulConfig(epochs=args.qmul_epochs), progress=False))
    qf.build_datastore(batch_result.model, retain, retain_index.tolist())
    for name, network in (("parametric original", parametric), ("SPM original", spm),
                          ("SPM instant stage", instant), ("SPM instant + Q-MUL", batch_result.model),
                          ("SPM retrained", retrained)):
        rows[name] = qf.evaluate(network, forget, retain, data.test)
    reference = rows["SPM retrained"]
    print(f"{args.dataset} / {args.architecture} W4A4, {len(data.train)} train, {len(forget)} forgotten "
          f"({args.forget_ratio:.0%} random), {args.epochs} epochs; Q-MUL {args.qmul_epochs} epochs")
    print(f"{'model':24} {'FA':>6} {'RA':>6} {'TA':>6} {'MIA':>6} {'MIA_sd':>6} {'AG':>6}")
    for name, metrics in rows.items():
        ag = qf.gaps(metrics, reference)["AG"] if name.startswith("SPM") else float("nan")
        print(f"{name:24} {metrics['FA']:6.2f} {metrics['RA']:6.2f} {metrics['TA']:6.2f} {metrics['MIA']:6.2f} "
              f"{metrics['MIA_sd']:6.2f} {ag:6.2f}")
    print("seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared two-core machine)")
    parser.add_argument("--embed-dim", type=int, default=64)
    commands = parser.add_subparsers(dest="command", required=True)
    timing_parser = commands.add_parser("timing", help="request-to-effect time of the instant stage")
    timing_parser.add_argument("--repeat", type=int, default=5)
    timing_parser.add_argument("--queries", type=int, default=256, help="queries of the search timing")
    quality_parser = commands.add_parser("quality", help="FA, RA, TA, MIA per stage against a retrained SPM")
    quality_parser.add_argument("--dataset", default="digits")
    quality_parser.add_argument("--architecture", default="digits-cnn")
    quality_parser.add_argument("--train-per-class", type=int, default=None)
    quality_parser.add_argument("--epochs", type=int, default=15)
    quality_parser.add_argument("--qmul-epochs", type=int, default=5)
    quality_parser.add_argument("--forget-ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"timing": timing, "quality": quality}[args.command](args)


if __name__ == "__main__":
    main()
