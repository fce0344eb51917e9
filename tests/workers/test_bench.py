"""The benchmark CLI end to end on digits (one-epoch models), its resumable stages and its
verdict."""

import json

import pytest

from workers.benchmarks import bench

ARGS = ["--dataset", "digits", "--model", "digits-cnn", "--seeds", "0", "--original-epochs", "1",
        "--unlearn-epochs", "1", "--methods", "ft", "qmul", "oeu", "quail", "--set", "qmul.schedule=cycled",
        "--threads", "1", "--no-progress", "--name", "tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(ARGS + ["--out", str(out)]) == 0
    return out


def test_bench_writes_the_table_the_json_and_the_plot(tiny_run):
    run_dir = tiny_run / "tiny"
    table = (run_dir / "table.md").read_text()
    for needle in ["| Retrain |", "| No unlearning (original) |", "| FT |", "| Q-MUL |", "| OEU |", "| QUAIL |",
                   "Original model: train accuracy", "Q-MUL time / Retrain time", "Verdict",
                   "One seed", "python -m workers.benchmarks.bench --dataset digits"]:
        assert needle in table, needle
    assert (run_dir / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["table"]) == ["retrain", "original", "ft", "qmul", "oeu", "quail"]
    retrain = results["table"]["retrain"]
    assert retrain["AG"] == 0.0 and all(gap == 0.0 for gap in retrain["gaps"].values())
    qmul = results["per_seed"]["0"]["qmul"]
    assert qmul["config"]["schedule"] == "cycled" and qmul["config"]["epochs"] == 1
    assert qmul["time_s"] > 0 and qmul["memory_kind"] == "cpu_rss_peak_sampled"
    assert set(qmul["metrics"]) == {"FA", "RA", "TA", "MIA", "MIA-AUC", "MIA-AUC-cal"}
    assert results["config"]["forget_ratio"] == 0.1


def test_bench_resumes_from_its_stage_records(tiny_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(bench, "train_model", refuse)
    monkeypatch.setattr(bench, "unlearn", refuse)
    before = json.loads((tiny_run / "tiny" / "results.json").read_text())
    assert bench.main(ARGS + ["--out", str(tiny_run)]) == 0
    after = json.loads((tiny_run / "tiny" / "results.json").read_text())
    assert after["table"] == before["table"]


def test_presets_and_overrides_build_configs():
    parser = bench.build_parser()
    config = bench.config_from_args(parser.parse_args(
        ["--preset", "gpu-paper", "--seeds", "5", "--set", "salun.lr=0.006",
         "--set", "qmul.schedule=sequential", "--forget-class", "3"]))
    assert (config.model, config.original_epochs, config.retrain_epochs) == ("resnet18", 182, 160)
    assert config.unlearn_batch_size == 256 and config.seeds == [5]
    assert config.forget_class == 3 and config.forget_ratio is None
    assert config.method_overrides["salun"] == {"lr": 0.006}
    assert bench.method_overrides(config, "qmul", 5) == {
        "seed": 5, "epochs": 10, "batch_size": 256, "schedule": "sequential"}
    assert "epochs" not in bench.method_overrides(config, "ga", 5)  # GA keeps its 5 epochs
    cpu = bench.config_from_args(parser.parse_args(["--preset", "cpu-cifar10"]))
    assert cpu.model == "cifar-cnn" and cpu.dataset_options["train_per_class"] == 250
    assert cpu.methods == bench.ALL_METHODS and {"oeu", "quail"} <= set(bench.ALL_METHODS)
    with pytest.raises(SystemExit):
        bench.parse_sets(["qmul-schedule"])
    with pytest.raises(ValueError, match="unknown unlearning method"):
        bench.config_from_args(parser.parse_args(["--set", "nope.lr=1"]))


def row(ag_seeds):
    mean = sum(ag_seeds) / len(ag_seeds)
    std = (sum((a - mean) ** 2 for a in ag_seeds) / (len(ag_seeds) - 1)) ** 0.5
    return {"AG_per_seed": (mean, std)}


def test_verdict_says_when_seeds_cannot_separate_the_methods():
    noisy = {"retrain": row([0, 0, 0]), "original": row([3, 6, 9]),
             "ft": row([2, 5, 8]), "qmul": row([1, 7, 4])}
    text, summary = bench.verdict(noisy, 3)
    assert text.startswith("Too small to tell the methods apart")
    assert summary["original_tied_with_best"]
    clear = {"retrain": row([0, 0, 0]), "original": row([9, 10, 11]),
             "ft": row([6, 6.5, 7]), "qmul": row([1, 1.5, 2])}
    text, summary = bench.verdict(clear, 3)
    assert summary["best"] == "qmul" and summary["tied_with_best"] == []
    assert summary["better_than_original"] == ["ft", "qmul"]
    assert "Q-MUL has the lowest AG" in text
    assert bench.verdict(clear, 1)[0].startswith("One seed")
