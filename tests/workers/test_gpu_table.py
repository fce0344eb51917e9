"""The GPU table's command (workers.benchmarks.gpu_table) end to end on the CPU with --smoke: the
same process pool, probes, planner and stage records as on the device; its outputs, its plan's
arithmetic, a cut run's resume, and an import that needs none of the service's packages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.benchmarks import gpu_table
from workers.benchmarks.bench import BenchConfig
from workers.engine.data import load_dataset
from workers.engine.methods import method_applies, supports_bf16, unlearn
from workers.engine.models import MODELS
from workers.engine.recipes import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    assert gpu_table.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    return out, work


def read_stages(folder: Path) -> dict[str, dict]:
    lines = (folder / "stages.jsonl").read_text().splitlines()
    return {record["stage"]: record for record in map(json.loads, lines)}


def test_the_smoke_run_writes_three_files_that_parse(smoke):
    out, _ = smoke
    folder = out / "smoke"
    assert sorted(p.name for p in out.rglob("*")) == ["env.json", "smoke", "stages.jsonl", "table.md"]
    env = json.loads((folder / "env.json").read_text())
    assert env["probe"]["epoch_s"] > 0 and env["probe"]["speedup"]["2"] > 0
    assert env["device_info"]["torch"] == torch.__version__ and env["failures"] == []
    stages = read_stages(folder)
    methods = list(gpu_table.SETUPS["smoke"].methods)
    assert set(stages) == {"original", "retrain", "eval-original", "eval-retrain", *methods}
    for method in methods:
        record = stages[method]
        assert set(record["metrics"]) >= {"FA", "RA", "TA", "MIA", "MIA_sd"} and record["time_s"] > 0
        assert "forget_scores" not in record and not record["reused"]
    assert stages["ga"]["config"]["epochs"] == 5 and stages["ft"]["config"]["epochs"] == 1
    assert stages["qmul"]["ran_with"] == 1  # alone while it unlearned: the uncontended time
    assert stages["original"]["ran_with"] == 2 and stages["retrain"]["ran_with"] == 2  # side by side
    assert "train_accuracy" in stages["original"]
    # bf16 where the engine supports it, as on the device; float32 for the other methods, timed so
    assert stages["original"]["bf16"] and stages["qmul"]["bf16"] and stages["qmul-public"]["bf16"]
    assert not stages["ft"]["bf16"] and env["probe"]["epoch_s_fp32"] > 0
    table = (folder / "table.md").read_text()
    for needle in ["| Retrain |", "| No unlearning (original) |", "| Q-MUL |", "| QUAIL |", "### Targets",
                   "Q-MUL / Retrain of the paper's length", "alone"]:
        assert needle in table, needle
    assert "paper Table 1" not in table  # the digits are not the paper's setting


def test_the_plan_fits_the_budget_arithmetic(smoke):
    out, _ = smoke
    env = json.loads((out / "smoke" / "env.json").read_text())
    plan, setup = env["plan"], gpu_table.SETUPS["smoke"]
    assert setup.epochs_floor <= plan["epochs"] <= setup.epochs_cap
    estimate = plan["estimate_s"]
    assert estimate["total"] == pytest.approx(estimate["spent"] + estimate["original+retrain"] + estimate["methods"])
    assert plan["fits"] == (estimate["total"] + estimate["margin"] <= env["budget_s"])
    assert plan["fits"] and not plan["skipped"] and env["elapsed_s"] <= env["budget_s"]


def probe(epoch_s: float, speedup: float = 1.5) -> dict:
    return {"epoch_s": epoch_s, "eval_s": 5.0, "fit_s": 0.2, "workers": 4,
            "speedup": {"2": speedup, "4": speedup * 1.3}}


@pytest.mark.parametrize("name", sorted(gpu_table.SETUPS))
def test_each_configuration_lists_only_methods_its_model_takes_and_trains_with_its_optimizer(name):
    setup = gpu_table.SETUPS[name]
    config = setup.bench_config(setup.epochs_floor, 0, setup.device, setup.bf16)
    assert setup.model in MODELS and all(method_applies(method, setup.model) for method in setup.methods)
    assert (config.optimizer, config.weight_decay, config.lr) == (setup.optimizer, setup.weight_decay, setup.lr)
    assert config.spec(0, setup.epochs_floor).train.optimizer == setup.optimizer


def test_the_planner_keeps_the_regime_floor_and_drops_methods_instead():
    setup = gpu_table.SETUPS["paper"]
    config = setup.bench_config(setup.epochs_floor, 0, "cuda", True)
    fast = gpu_table.make_plan(setup, config, probe(0.5), 510, 20)
    assert fast.epochs == setup.epochs_cap and fast.methods == list(setup.methods) and fast.fits
    assert not fast.notes
    slower = gpu_table.make_plan(setup, config, probe(3.0), 510, 20)
    assert setup.epochs_floor <= slower.epochs < setup.epochs_cap and slower.fits
    slow = gpu_table.make_plan(setup, config, probe(5.0), 510, 20)
    assert slow.epochs == setup.epochs_floor and slow.skipped and slow.methods[0] == "qmul"
    assert slow.methods + slow.skipped == list(setup.methods)
    assert slow.estimate_s["total"] + slow.estimate_s["margin"] <= 510
    assert any("dropped" in note for note in slow.notes)
    hopeless = gpu_table.make_plan(setup, config, probe(20.0), 510, 20)
    assert hopeless.epochs == setup.epochs_floor and hopeless.methods == ["qmul"] and not hopeless.fits
    assert any("cannot reach the paper's regime" in note for note in hopeless.notes)


def test_method_costs_follow_what_each_method_reads():
    setup = gpu_table.SETUPS["paper"]
    config = setup.bench_config(30, 0, "cuda", True)
    units = {m: gpu_table.method_units(config, m, 0.1) for m in setup.methods}
    assert units["ga"] == pytest.approx(5 * 0.1)  # GA keeps its 5 epochs over the forget set
    assert units["ft"] == pytest.approx(10 * 0.9)
    assert units["qmul"] == pytest.approx(2 * units["qmul-no-agr"])  # the full gradient-norm estimate


def test_a_cut_run_resumes_from_its_stage_records(smoke, tmp_path):
    out, work = smoke
    # A cut: two methods' records never written.
    dropped = []
    for record in read_stages(out / "smoke").values():
        if record.get("method") in ("ft", "ga"):
            (work / "smoke" / "cache" / "stages" / f"{record['key']}.json").unlink()
            dropped.append(record["method"])
    assert sorted(dropped) == ["ft", "ga"]
    again = tmp_path / "again"
    assert gpu_table.main(["--smoke", "--out", str(again), "--work", str(work)]) == 0
    before, after = read_stages(out / "smoke"), read_stages(again / "smoke")
    assert set(after) == set(before)
    for name, record in after.items():
        assert record["reused"] == (name not in ("ft", "ga")), name
        if record["reused"]:
            assert record.get("metrics") == before[name].get("metrics")
            assert record.get("time_s") == before[name].get("time_s")


def test_bf16_keys_and_runs_only_where_the_engine_supports_it():
    assert supports_bf16("qmul") and supports_bf16("qmul-public") and not supports_bf16("ft")
    config = BenchConfig(bf16=True)
    assert config.precision() == {"bf16": True} and config.precision("qmul") == {"bf16": True}
    assert config.precision("ft") == {} and BenchConfig().precision("qmul") == {}
    data = load_dataset("digits")
    model = ModelSpec().build()
    with pytest.raises(ValueError, match="bf16"):
        unlearn("ft", model, data.train.subset(range(8)), data.train.subset(range(8, 64)), {"epochs": 1},
                progress=False, bf16=True)


def test_the_table_imports_without_the_service_packages():
    blocked = ("celery", "fastapi", "sqlalchemy", "kombu", "alembic", "pydantic", "pydantic_settings", "psycopg",
               "uvicorn", "starlette", "redis")  # none of them is on the device machines
    code = ("import sys\n"
            f"for name in {blocked!r}:\n    sys.modules[name] = None  # importing it raises ImportError\n"
            "import workers.benchmarks.gpu_table, workers.benchmarks.bench\n"
            f"assert not any(name in sys.modules and sys.modules[name] for name in {blocked!r})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=env)


def test_attackers_fitted_in_threads_are_the_same_attackers(monkeypatch):
    from workers.engine.metrics import fit_membership_attack, mia_over_draws

    rng = np.random.default_rng(0)
    retain_conf, test_conf = rng.beta(8, 1, (300, 1)), rng.beta(3, 1, (100, 1))  # N x 1, as the engine's
    retain_labels, test_labels = rng.integers(0, 4, 300), rng.integers(0, 4, 100)
    forget_conf = rng.beta(5, 1, (50, 1))
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("QFORGET_MIA_THREADS", threads)
        attack = fit_membership_attack(retain_conf, retain_labels, test_conf, test_labels, draws=5, seed=7)
        results.append((mia_over_draws(attack, forget_conf), [a.predict(forget_conf).tolist()
                                                                for a in attack.attackers]))
    assert results[0] == results[1]
