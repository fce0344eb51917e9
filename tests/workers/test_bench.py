"""The benchmark CLI end to end on digits (one-epoch models), its resumable stages and its
verdict."""

import json

import pytest
import torch

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
    assert set(qmul["metrics"]) == {"FA", "RA", "TA", "MIA", "MIA_sd", "MIA-AUC", "MIA-AUC-cal"}
    assert qmul["metrics"]["MIA_sd"] >= 0 and "| MIA sd/draw |" in table
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


def test_the_ulira_stage_keeps_its_models_and_scores_for_an_outside_evaluator(tmp_path):
    args = ["--dataset", "digits", "--model", "digits-cnn", "--seeds", "0", "--original-epochs", "1",
            "--unlearn-epochs", "1", "--methods", "ft", "--threads", "1", "--no-progress", "--name", "ulira",
            "--ulira", "--ulira-models", "3", "--mia-draws", "3", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    run_dir = tmp_path / "ulira"
    manifest = json.loads((run_dir / "ulira.json").read_text())["seeds"]["0"]
    assert set(manifest["models"]) == {"retrain", "original", "ft"}
    n_forget = len(manifest["forget_indices"])
    for name, models in manifest["models"].items():
        assert len(models) == 3 and len(manifest["scores"][name]) == 3
        assert all(len(row) == n_forget for row in manifest["scores"][name])
        assert all((tmp_path / model["path"]).exists() for model in models)
    # Three training seeds per population, the first the seed's own original and reference.
    assert [m["spec"]["train"]["seed"] for m in manifest["models"]["retrain"]] == [0, 1000, 2000]
    assert [m["config"]["seed"] for m in manifest["models"]["ft"]] == [0, 1000, 2000]
    for name in ("original", "ft"):
        result = manifest["results"][name]
        assert 0 <= result["AUC"] <= 100 and 0 <= result["TPR@FPR"] <= 100 and result["models"] == 3
    assert manifest["reference_pair_difference"]["p95"] >= manifest["reference_pair_difference"]["p50"] >= 0

    # The scores are the saved models' own: an outside evaluator reloading one gets the same values.
    from workers.engine.data import load_dataset
    from workers.engine.metrics import logit_confidence
    from workers.engine.recipes import ModelSpec
    from workers.engine.training import predict_probs

    model_entry = manifest["models"]["ft"][2]
    model = ModelSpec.from_dict(model_entry["spec"]).build()
    model.load_state_dict(torch.load(tmp_path / model_entry["path"], weights_only=True))
    forget = load_dataset("digits", seed=0).train.subset(manifest["forget_indices"])
    rescored = logit_confidence(predict_probs(model, forget.x), forget.y)
    assert rescored == pytest.approx(manifest["scores"]["ft"][2], abs=1e-4)

    table = (run_dir / "table.md").read_text()
    assert "Per-example test (U-LiRA-style, K = 3" in table and "| FT |" in table.split("Per-example")[1]
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["ulira"]["0"]["results"]) == {"original", "ft"}
    assert results["config"]["mia_draws"] == 3
    assert len(results["per_seed"]["0"]["ft"]["metrics"]) == 7


def test_a_shared_data_seed_makes_the_seeds_models_the_ulira_populations_and_keeps_every_scored_model(tmp_path):
    args = ["--dataset", "digits", "--model", "digits-cnn", "--seeds", "0", "1", "2", "--data-seed", "7",
            "--original-epochs", "1", "--unlearn-epochs", "1", "--methods", "ft", "--threads", "1",
            "--no-progress", "--name", "shared", "--mia-draws", "3", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    run_dir = tmp_path / "shared"
    manifest = json.loads((run_dir / "models.json").read_text())["seeds"]
    forget_sets = [manifest[seed]["forget_indices"] for seed in ("0", "1", "2")]
    assert forget_sets[0] == forget_sets[1] == forget_sets[2]
    assert all(manifest[seed]["data"]["seed"] == 7 for seed in manifest)
    paths = {manifest[seed]["models"][row]["path"] for seed in manifest for row in ("retrain", "original", "ft")}
    assert len(paths) == 9, "each seed trains and unlearns its own models"

    # Every scored model is on disk and is the one that was scored.
    from workers.engine.data import load_dataset
    from workers.engine.recipes import ModelSpec
    from workers.engine.training import accuracy

    entry = manifest["1"]
    model = ModelSpec.from_dict(entry["spec"]).build()
    model.load_state_dict(torch.load(tmp_path / entry["models"]["ft"]["path"], weights_only=True))
    forget = load_dataset("digits", seed=7).train.subset(entry["forget_indices"])
    results = json.loads((run_dir / "results.json").read_text())
    assert accuracy(model, forget) == pytest.approx(results["per_seed"]["1"]["ft"]["metrics"]["FA"], abs=1e-6)
    assert entry["models"]["ft"]["config"]["seed"] == 1

    ulira = results["ulira"]["seeds"]["results"]
    assert set(ulira) == {"original", "ft"} and ulira["ft"]["models"] == 3
    assert ulira["ft"]["samples"] == len(forget_sets[0])
    assert "K = 3 models per population: the models of seeds [0, 1, 2], one forget set" in (
        run_dir / "table.md").read_text()


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
    assert cpu.methods == [m for m in bench.ALL_METHODS if m != "lethevit"]  # LetheViT needs a ViT
    assert {"oeu", "quail", "lethevit"} <= set(bench.ALL_METHODS)
    vit = bench.config_from_args(parser.parse_args(["--model", "digits-vit", "--optimizer", "adamw",
                                                    "--weight-decay", "0.05"]))
    assert vit.methods == bench.ALL_METHODS
    assert (vit.spec(0, 3).train.optimizer, vit.spec(0, 3).train.weight_decay) == ("adamw", 0.05)
    with pytest.raises(ValueError, match="vision transformer"):
        bench.config_from_args(parser.parse_args(["--methods", "lethevit", "qmul"]))
    cpu_vit = bench.config_from_args(parser.parse_args(["--preset", "cpu-cifar10-vit"]))
    assert cpu_vit.model == "vit-mini" and "lethevit" in cpu_vit.methods
    assert cpu_vit.spec(0, 20).train.optimizer == "adamw"
    memorising = bench.config_from_args(parser.parse_args(["--preset", "cpu-cifar10-memorising", "--seeds", "1"]))
    assert sorted(memorising.methods) == sorted(bench.default_methods("cifar-cnn")), "every method runs in the memorising preset"
    assert memorising.dataset_options["augment"] is False and memorising.data_seed == 0
    assert memorising.spec(1, 24).data_seed == 0 and memorising.spec(1, 24).train.seed == 1
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
