"""The paper's table on one GPU, in one command that fits one device session.

    PYTHONPATH=. python -m workers.benchmarks.gpu_table --config paper --out "$OUT"
    PYTHONPATH=. python -m workers.benchmarks.gpu_table --config qmul-public --out "$OUT"
    PYTHONPATH=. python -m workers.benchmarks.gpu_table --config mobilenetv2-w2 --out "$OUT"
    PYTHONPATH=. python -m workers.benchmarks.gpu_table --config vit-tiny --out "$OUT"
    PYTHONPATH=. python -m workers.benchmarks.gpu_table --smoke --out /tmp/smoke    # CPU, tiny (the tests')

One command, inside --budget-s (default 510 s: the device tool's 9-minute command, less room for
starting Python and writing the files):

1. env: device, torch, how long the data took to decode (once, into $QFORGET_CACHE_DIR);
   probe: a solo training epoch's time (measured on part of an epoch after warm-up steps, with the
   engine's own train_model; in float32 too when bf16 is on, for the methods that run float32), the
   throughput of 2 and of --workers processes training at once, and one membership attacker's fit
   time;
2. plan (printed before anything trains): epochs of the original and the Retrain reference, at
   least the configuration's floor (below it the original is not expected to reach the paper's
   regime: said so, never shrunk silently), and which methods fit after them;
3. the original and Retrain side by side;
4. the first method of the list (Q-MUL; in qmul-public, Q-MUL as the public code runs it) alone,
   so that its time is the uncontended one the targets speak of; then the two
   evaluations of the original and Retrain and every other method, --workers at a time, each
   started only if its estimate still fits the budget (a method that does not is listed as skipped).

Each stage is bench.py's own stage (train_stage, method_row, reference_rows: the same keys,
records and models) in <work>/<config>/cache/, so a rerun on the same machine skips what is
recorded. $OUT/<config>/ gets env.json (device, probe, plan), stages.jsonl (one line per finished
stage) and table.md, all rewritten after every stage: what finished comes back even if the
command is cut. Three files per configuration; no models.

Why separate processes sharing the GPU, not CUDA streams in threads: a quantized ResNet-18 step on
32x32 images launches hundreds of small kernels (each fake quantizer's element-wise work,
BatchNorm, the optimiser), and launching them is Python work under one GIL: threads would queue on
it, and one process alone leaves the GPU idle between launches. Processes (spawned, one CUDA context
and a share of the device's 16 cores each) launch independently, and the GPU fills one context's gaps
with another's kernels. Each stage keeps its own time and peak memory (torch.cuda's counters are per
process); a stage that fails (out of memory) fails alone; the membership attackers (scikit-learn,
CPU) of one stage run while the others use the GPU; and the engine's loops run unchanged. The cost:
a CUDA context and a copy of the data (0.6 GB for CIFAR-10) per process. Without MPS the contexts
time-slice the GPU instead of sharing it at the same instant, so whether k processes beat one is
not assumed: the probe measures it, and the plan and every estimate use the measured speed-up.
--smoke runs the same process pool, probes and planner on the CPU.
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from workers.benchmarks.bench import (
    BenchConfig,
    SeedContext,
    base_key,
    method_label,
    method_overrides,
    method_row,
    method_stage_key,
    plain,
    plan_seed,
    read_json,
    reference_rows,
    stage_key,
    train_stage,
    write_json,
)
from workers.engine.data import load_dataset
from workers.engine.methods import method_config
from workers.engine.metrics import MIA_DRAWS, gaps
from workers.engine.training import train_model

# The paper's Table 1 (Tong et al. 2025; ResNet-18 W4A4, CIFAR-10, 10% random forgetting), as
# far as the targets quote it.
PAPER_RETRAIN = {"FA": 93.38, "RA": 100.0, "TA": 92.64, "MIA": 13.36}
PAPER_QMUL_AG = 1.30
PAPER_RETRAIN_EPOCHS = 160
REGIME = {"train_accuracy": 99.0, "test_accuracy": 91.0}  # "train near 100%, test at least 91%"

# What one epoch of each method reads, in passes over the forget and the retain set, and what it
# costs once (in training epochs over the whole train split): the planner's cost model. Q-MUL
# with its full gradient-norm estimate passes over both sets twice (the estimate is a forward and
# backward pass); OEU takes a second backward pass on its paired forget batches; IU's per-sample
# Fisher gradients are batches of one. Estimates: the run records what each method really took.
METHOD_PASSES = {
    "ft": (0, 1, 0.0), "l1-sparse": (0, 1, 0.0), "ga": (1, 0, 0.0), "rl": (1, 1, 0.0),
    "salun": (1, 1, 0.1), "qmul": (2, 2, 0.0), "qmul-no-sl": (2, 2, 0.0), "qmul-no-agr": (1, 1, 0.0),
    "qmul-public": (2, 2, 0.0), "oeu": (2, 1, 0.0), "quail": (1, 1, 0.1), "iu": (0, 0, 1.0),
}
EVAL_UNITS = 0.5  # forward passes over forget, retain and test (and the reference's), in epochs
PAPER_METHODS = ("qmul", "ft", "rl", "ga", "l1-sparse", "salun", "iu", "qmul-no-sl", "qmul-no-agr", "oeu",
                 "quail", "qmul-public")  # priority order: the last are dropped first
VIT_METHODS = ("qmul", "lethevit", "ft", "rl", "ga", "l1-sparse", "salun", "iu", "oeu", "quail")


@dataclass(frozen=True)
class TableSetup:
    """One configuration of the table: the model and data, the methods in priority order, and the
    bounds of the short recipe (epochs of the original and Retrain)."""

    name: str
    model: str
    weight_bits: int | None
    act_bits: int | None
    methods: tuple[str, ...]
    epochs_floor: int  # fewer, and the original is not expected to reach the paper's regime
    epochs_cap: int  # more would not pay for itself inside one command
    description: str
    dataset: str = "cifar10"
    dataset_options: dict = field(default_factory=dict)
    lr: float = 0.1
    batch_size: int = 256
    optimizer: str = "sgd"  # of the original and Retrain
    weight_decay: float = 5e-4
    unlearn_epochs: int = 10  # GA keeps its 5 (bench.method_overrides)
    unlearn_batch_size: int | None = 256
    method_overrides: dict = field(default_factory=dict)
    mia_draws: int = MIA_DRAWS
    budget_s: float = 510.0
    probe_steps: int = 40  # timed training steps of the probe (after warmup_steps)
    warmup_steps: int = 8
    workers: int = 4  # processes at once for the methods
    device: str = "cuda"
    bf16: bool = True
    paper_reference: bool = True  # show the paper's Table 1 figures beside

    def bench_config(self, epochs: int, seed: int, device: str, bf16: bool) -> BenchConfig:
        return BenchConfig(
            methods=list(self.methods), dataset=self.dataset, dataset_options=dict(self.dataset_options),
            model=self.model, quantizer="lsq+", weight_bits=self.weight_bits, act_bits=self.act_bits,
            forget_ratio=0.1, seeds=[seed], original_epochs=epochs, retrain_epochs=epochs,
            unlearn_epochs=self.unlearn_epochs, lr=self.lr, batch_size=self.batch_size,
            optimizer=self.optimizer, weight_decay=self.weight_decay, unlearn_batch_size=self.unlearn_batch_size, method_overrides=dict(self.method_overrides),
            mia_draws=self.mia_draws, device=device, name=self.name, bf16=bf16)


# The floors are a first guess (LSQ+ QAT from scratch, cosine lr 0.1, batch 256): the first device
# run's regime check says whether they hold.
GPU_OVERRIDES = {"iu": {"fisher_memory_gib": 16.0}}  # per-sample gradients, beside 3 other processes
SETUPS = {
    "paper": TableSetup(
        "paper", "resnet18", 4, 4, PAPER_METHODS, 30, 80,
        "ResNet-18 (CIFAR form), LSQ+ W4A4 (first and last layer 8 bits), the paper's text",
        method_overrides=GPU_OVERRIDES),
    "qmul-public": TableSetup(
        "qmul-public", "resnet18-qmul-public", 4, 4, ("qmul-public", "qmul"), 30, 80,
        "the authors' public code: ReActNet-style ResNet-18, W4 blocks with 8-bit activations, float "
        "stem, shortcuts and classifier; Q-MUL as that code runs it, and as the paper's text"),
    "mobilenetv2-w2": TableSetup(
        "mobilenetv2-w2", "mobilenetv2", 2, None, PAPER_METHODS, 30, 80,
        "MobileNetV2 (CIFAR strides), LSQ+ 2-bit weights, full-precision activations (the paper's "
        "Table 7 setting)", method_overrides=GPU_OVERRIDES),
    # The transformer of the ViT seed papers, from scratch: AdamW as on the CPU (the transformers
    # barely learn with SGD); far from DeiT's pretrained regime in one command, so no paper figures.
    "vit-tiny": TableSetup(
        "vit-tiny", "vit-tiny", 4, 4, VIT_METHODS, 30, 100,
        "DeiT-Tiny-like ViT for 32x32 (patch 4), LSQ+ W4A4 on every linear layer and matmul input, AdamW",
        lr=1e-3, optimizer="adamw", weight_decay=0.05, method_overrides=GPU_OVERRIDES, paper_reference=False),
    # The test suite's: the digits, every method, the same pool, probes and planner on the CPU.
    "smoke": TableSetup(
        "smoke", "digits-cnn", 4, 4, PAPER_METHODS, 1, 2, "smoke test: digits CNN, W4A4, CPU, bf16 as on the device",
        dataset="digits", lr=0.05, batch_size=64, unlearn_epochs=1, unlearn_batch_size=None,
        method_overrides={"iu": {"fisher_samples": 20}}, mia_draws=3, budget_s=240.0, probe_steps=3,
        warmup_steps=1, workers=2, device="cpu", bf16=True, paper_reference=False),
}


# ---------------------------------------------------------------------------------------------
# The planner


def method_seconds(config: BenchConfig, probe: dict, forget_fraction: float = 0.1) -> dict[str, float]:
    """Each method's estimated time alone: its cost in epochs at the probe's epoch time, the bf16 one
    where the method runs bf16, the float32 one otherwise."""
    return {m: method_units(config, m, forget_fraction)
            * (probe["epoch_s"] if config.precision(m) else probe.get("epoch_s_fp32", probe["epoch_s"]))
            for m in config.methods if m != "retrain"}


def method_units(config: BenchConfig, method: str, forget_fraction: float) -> float:
    """A method's cost in training epochs over the whole train split (METHOD_PASSES)."""
    forget_passes, retain_passes, once = METHOD_PASSES.get(method, (1, 1, 0.0))
    method_cfg = method_config(method, method_overrides(config, method, config.seeds[0]))
    epochs = getattr(method_cfg, "epochs", 1)
    return epochs * (forget_passes * forget_fraction + retain_passes * (1 - forget_fraction)) + once


@dataclass
class Plan:
    epochs: int
    workers: int
    methods: list[str]  # in the order they start
    skipped: list[str]  # did not fit
    estimate_s: dict  # per phase, and "total" with what had been spent before the plan
    fits: bool
    notes: list[str]

    def text(self) -> str:
        lines = [f"plan: original and Retrain {self.epochs} epochs each, side by side; then "
                 f"{self.methods[0] if self.methods else 'no method'} alone, then {self.workers} at a time: "
                 f"{', '.join(self.methods[1:]) or 'none'}"]
        if self.skipped:
            lines.append(f"  not run (the budget): {', '.join(self.skipped)}")
        lines.append("  estimate: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.estimate_s.items()))
        lines += [f"  NOTE: {note}" for note in self.notes]
        return "\n".join(lines)


def phase_b_seconds(seconds: dict[str, float], speedup: float, workers: int, eval_s: float,
                    solo: str | None) -> float:
    """Wall time of the methods phase (seconds: each method's time alone): the solo method alone,
    then the rest sharing the GPU at the measured speed-up; every stage (and the two reference
    evaluations) adds its evaluation, which runs on the CPU beside the others."""
    solo_s = seconds.get(solo, 0.0) if solo else 0.0
    shared = sum(t for m, t in seconds.items() if m != solo) / max(speedup, 1e-9)
    evaluations = (len(seconds) + 2) * eval_s / workers
    return solo_s + shared + evaluations


def make_plan(setup: TableSetup, config: BenchConfig, probe: dict, budget_s: float, spent_s: float) -> Plan:
    """Epochs and methods from the probe's measured epoch time and speed-ups (module docstring).
    The epochs are at least the setup's floor: if the floor does not fit, the plan says so and
    methods are dropped from the end of the priority list instead."""
    epoch_s, eval_s = probe["epoch_s"], probe["eval_s"]
    forget = 0.1
    pair_speedup, workers = probe["speedup"]["2"], probe["workers"]
    speedup = probe["speedup"][str(workers)]
    margin = max(10.0, 0.05 * budget_s)
    methods = [m for m in setup.methods if m != "retrain"]
    seconds = method_seconds(config, probe, forget)
    solo = methods[0] if methods else None  # the first of the priority list runs alone
    pair_epoch_s = epoch_s * (1 + (1 - forget)) / pair_speedup  # one epoch of both, side by side

    def phase_a(epochs):
        return epochs * pair_epoch_s + EVAL_UNITS * epoch_s

    left = budget_s - spent_s - margin
    notes = []
    epochs_fit = math.floor((left - phase_b_seconds(seconds, speedup, workers, eval_s, solo)
                             - EVAL_UNITS * epoch_s) / pair_epoch_s)
    if epochs_fit >= setup.epochs_floor:
        epochs = min(epochs_fit, setup.epochs_cap)
    else:
        epochs = setup.epochs_floor
        notes.append(f"the regime floor ({setup.epochs_floor} epochs) and every method do not fit together "
                     f"in {budget_s:.0f} s at {epoch_s:.2f} s/epoch: methods are dropped from the end of the "
                     "priority list, not the epochs")
    kept = list(methods)
    while kept and phase_a(epochs) + phase_b_seconds({m: seconds[m] for m in kept}, speedup, workers,
                                                     eval_s, solo) > left:
        kept.pop()
    if not kept and methods:
        kept = methods[:1]
        notes.append(f"even {methods[0]} alone does not fit after the floor's training: the run will overrun "
                     "its budget (what finishes still comes back)")
    if phase_a(setup.epochs_floor) > left:
        notes.append(f"the floor's training alone ({phase_a(setup.epochs_floor):.0f} s) exceeds the "
                     f"{left:.0f} s left: this device cannot reach the paper's regime in one command")
    b = phase_b_seconds({m: seconds[m] for m in kept}, speedup, workers, eval_s, solo)
    estimate = {"spent": spent_s, "original+retrain": phase_a(epochs), "methods": b, "margin": margin}
    estimate["total"] = spent_s + phase_a(epochs) + b
    return Plan(epochs, workers, kept, [m for m in methods if m not in kept], estimate,
                estimate["total"] + margin <= budget_s, notes)


# ---------------------------------------------------------------------------------------------
# Work done in the pool's processes


_WORKER: dict = {}  # per process: the seed's data, loaded once (on the device)


def _init_worker(threads: int) -> None:
    """Each process gets its share of the cores, for torch and for fitting its attackers."""
    torch.set_num_threads(threads)
    os.environ.setdefault("QFORGET_MIA_THREADS", str(threads))
    # The batch shape is fixed within a stage: let cuDNN time its convolution kernels once and keep
    # the fastest (no effect on the CPU).
    torch.backends.cudnn.benchmark = True


def _seed_plan(config: BenchConfig, seed: int, device: str):
    key = stage_key("plan", config=config, seed=seed, device=device)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER.update(key=key, plan=plan_seed(config, seed, device))
    return _WORKER["plan"]


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "hostname": platform.node()}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    multiprocessors=props.multi_processor_count)
    return info


def probe_task(config: BenchConfig, seed: int, device: str, steps: int, warmup: int, barrier=None) -> dict:
    """Training throughput of one process (train_model on a slice of the train split, after warm-up
    steps that initialise the quantizers and let cuDNN pick its kernels). With a barrier, every
    process of a round starts its timed steps together."""
    plan = _seed_plan(config, seed, device)
    spec = config.spec(seed, 1)
    model = spec.build()
    batch = spec.train.batch_size

    def slice_of(n_steps, start=0):
        return plan.train.subset(range(start, min(start + n_steps * batch, len(plan.train))))

    train_model(model, slice_of(warmup), spec.train, device, progress=False, bf16=config.bf16)
    timed = slice_of(steps, warmup * batch)
    if barrier is not None:
        barrier.wait()
    _synchronize(device)
    start = time.time()
    train_model(model, timed, spec.train, device, progress=False, bf16=config.bf16)
    _synchronize(device)
    end = time.time()
    return {"start": start, "end": end, "samples": len(timed), "train_samples": len(plan.train),
            "pid": os.getpid(), "device_info": device_info(device)}


def attacker_fit_seconds(n_test: int, seed: int = 0) -> float:
    """One membership attacker's fit (the SVC metrics.fit_membership_attack fits per draw) on as many
    points as the real one: n_test members and n_test non-members, confidences shaped like a trained
    model's (members near 1, non-members spread)."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    members = 1 - rng.exponential(0.002, n_test).clip(0, 1)
    outsiders = np.concatenate([1 - rng.exponential(0.05, n_test - n_test // 7).clip(0, 1),
                                rng.uniform(0, 1, n_test // 7)])
    x = np.concatenate([members, outsiders])[:, None]
    y = np.r_[np.ones(n_test), np.zeros(n_test)]
    started = time.perf_counter()
    SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return time.perf_counter() - started


def _context(config: BenchConfig, seed: int, device: str, cache: Path) -> SeedContext:
    plan = _seed_plan(config, seed, device)
    original, original_record = train_stage(config, plan, "original", cache, device, progress=False)
    reference, reference_record = train_stage(config, plan, "retrain", cache, device, progress=False)
    return SeedContext(seed, plan.train, plan.forget_index, plan.forget, plan.retain, plan.test, original,
                       reference, original_record, reference_record, plan.keys)


def stage_record_path(kind: str, name: str, config: BenchConfig, seed: int, plan, cache: Path) -> Path:
    """Where bench.py keeps the record of a stage ("train", "eval" or "method" of name)."""
    if kind == "train":
        key = plan.trainings[name][0]
    elif kind == "eval":
        key = stage_key(f"eval-{name}", **base_key(config, plan.keys))
    else:
        key, _ = method_stage_key(config, name, seed, plan.keys)
    return cache / "stages" / f"{key}.json"


def stage_task(kind: str, name: str, config: BenchConfig, seed: int, device: str, cache: Path,
               solo_done=None) -> dict:
    """One stage in a pool process: "train" (name: original or retrain), "eval" (name: original or
    retrain, scored against the reference) or "method" (name: the method). Returns its record,
    with the process's timings: wall_s (the whole task), setup_s (data and models loaded),
    eval_s (scoring). solo_done, a manager Event, is set once the method's unlearning is over."""
    started = time.perf_counter()
    reused = stage_record_path(kind, name, config, seed, _seed_plan(config, seed, device), cache).exists()
    if kind == "train":
        plan = _seed_plan(config, seed, device)
        setup_s = time.perf_counter() - started
        _, record = train_stage(config, plan, name, cache, device, progress=False)
        result = {"stage": name, "kind": kind, **record}
    else:
        context = _context(config, seed, device, cache)
        setup_s = time.perf_counter() - started
        if kind == "eval":
            record = reference_rows(config, context, cache, device, which=(name,))[name]
        else:
            record = method_row(config, context, name, cache, device, progress=False,
                                after_unlearning=(lambda _: solo_done.set()) if solo_done is not None else None)
        result = {"stage": f"eval-{name}" if kind == "eval" else name, "kind": kind, **record}
    if solo_done is not None:
        solo_done.set()
    wall = time.perf_counter() - started
    result.update(wall_s=wall, setup_s=setup_s, pid=os.getpid(), reused=reused)
    if kind != "train":
        result["eval_s"] = wall - setup_s - (record.get("time_s", 0.0) if kind == "method" else 0.0)
    result.pop("forget_scores", None)  # 4,500 numbers a stage: they stay in the work cache
    return plain(result)  # configs as dicts, as a record read back from the cache has them


# ---------------------------------------------------------------------------------------------
# Outputs


class Report:
    """$OUT/<config>/: env.json, stages.jsonl and table.md, rewritten whole after every stage."""

    def __init__(self, folder: Path, setup: TableSetup, command: str):
        self.folder, self.setup, self.command = folder, setup, command
        self.env: dict = {"config": setup.name, "description": setup.description, "command": command}
        self.stages: dict[str, dict] = {}
        self.started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict) -> None:
        self.stages[record["stage"]] = record
        self.write()

    def write(self) -> None:
        self.env["elapsed_s"] = time.perf_counter() - self.started
        write_json(self.folder / "env.json", self.env)
        lines = "".join(json.dumps(plain(record)) + "\n" for record in self.stages.values())
        temp = self.folder / ".stages.jsonl.tmp"
        temp.write_text(lines)
        os.replace(temp, self.folder / "stages.jsonl")
        temp = self.folder / ".table.md.tmp"
        temp.write_text(self.markdown())
        os.replace(temp, self.folder / "table.md")

    def rows(self) -> list[tuple[str, dict]]:
        """(row, record with metrics) in the table's order: Retrain, original, methods as they ran."""
        rows = []
        for name, stage in (("retrain", "eval-retrain"), ("original", "eval-original")):
            if stage in self.stages:
                rows.append((name, self.stages[stage]))
        order = {name: i for i, name in enumerate(self.setup.methods)}
        methods = sorted((name for name, record in self.stages.items() if record["kind"] == "method"),
                         key=lambda name: order.get(name, len(order)))
        rows += [(name, self.stages[name]) for name in methods]
        return rows

    def markdown(self) -> str:
        env, setup = self.env, self.setup
        info = env.get("device_info", {})
        plan = env.get("plan", {})
        probe = env.get("probe", {})
        lines = [f"## gpu-table `{setup.name}`: {setup.description}", "",
                 f"- Device: {info.get('gpu', info.get('device', '?'))}, torch {info.get('torch', '?')}, "
                 f"{info.get('cpus', '?')} CPUs; data decode {env.get('decode_s', float('nan')):.1f} s.",
                 f"- Probe: {probe.get('epoch_s', float('nan')):.2f} s per training epoch alone "
                 f"({probe.get('epoch_s_fp32', float('nan')):.2f} s in float32); speed-up of "
                 + ", ".join(f"{k} processes {v:.2f}x" for k, v in probe.get("speedup", {}).items())
                 + f"; one attacker fit {probe.get('fit_s', float('nan')):.2f} s.",
                 f"- Plan: original and Retrain {plan.get('epochs', '?')} epochs; methods "
                 f"{plan.get('workers', '?')} at a time; skipped for the budget: "
                 f"{', '.join(plan.get('skipped', [])) or 'none'}."]
        lines += [f"- NOTE: {note}" for note in plan.get("notes", [])]
        original = self.stages.get("original")
        if original:
            reached = all(original[k] >= v for k, v in REGIME.items())
            lines.append(f"- Original: train accuracy {original['train_accuracy']:.2f} %, test accuracy "
                         f"{original['test_accuracy']:.2f} %: the paper's regime (train >= "
                         f"{REGIME['train_accuracy']:.0f}, test >= {REGIME['test_accuracy']:.0f}) "
                         f"{'reached' if reached else 'NOT reached'}.")
        lines += ["", "| Method | FA | RA | TA | MIA | AG ↓ | MIA sd/draw | Time (s) | Ran | bf16 | Peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = self.rows()
        reference = next((r["metrics"] for name, r in rows if name == "retrain"), None)
        for name, record in rows:
            metrics = record["metrics"]
            gap = gaps(metrics, reference) if reference else None
            cells = [f"{metrics[k]:.2f}" + (f" ({gap[k]:.2f})" if gap else "") for k in ("FA", "RA", "TA", "MIA")]
            source = self.stages.get(name, record)  # the training stage's time for Retrain
            time_s = source.get("time_s")
            ran = "alone" if record.get("ran_with", 1) == 1 else f"{record['ran_with']} at once"
            if name == "retrain":
                ran = "beside the original"
            lines.append("| " + " | ".join([
                method_label(name), *cells, f"{gap['AG']:.2f}" if gap else "-", f"{metrics.get('MIA_sd', 0):.2f}",
                "-" if name == "original" or time_s is None else f"{time_s:.1f}", "-" if name == "original" else ran,
                "yes" if source.get("bf16") else "no",
                "-" if name == "original" else f"{source.get('peak_mib', float('nan')):.0f}"]) + " |")
        if setup.paper_reference:
            lines.append("| Retrain, paper Table 1 | " + " | ".join(f"{PAPER_RETRAIN[k]:.2f}" for k in PAPER_RETRAIN)
                         + " | 0 | - | - | - | - | - |")
        skipped = plan.get("skipped", []) + env.get("skipped_at_run", [])
        if skipped:
            lines.append(f"\nNot run (budget): {', '.join(method_label(m) for m in skipped)}.")
        lines += ["", "### Targets", ""] + self.targets(reference) + [
            "", "Cells: value (gap to this run's Retrain); AG: mean of the four gaps. MIA: mean over "
            f"{setup.mia_draws} attackers; MIA sd/draw: their spread. Time: the stage's own wall clock "
            "(Retrain: its training, beside the original's); 'Ran': alone or how many stages shared the GPU "
            "at most while it ran. One seed: no spread between seeds to compare differences with.",
            f"Elapsed: {env.get('elapsed_s', 0):.0f} s of the {env.get('budget_s', setup.budget_s):.0f} s budget. "
            f"Command: `{self.command}`", ""]
        return "\n".join(lines)

    def targets(self, reference) -> list[str]:
        out = []
        probe = self.env.get("probe", {})
        retain_epoch_s = probe.get("epoch_s", float("nan")) * 0.9
        paper_retrain_s = PAPER_RETRAIN_EPOCHS * retain_epoch_s
        for method in ("qmul", "qmul-public"):
            record = self.stages.get(method)
            if not record:
                continue
            label = method_label(method)
            epochs = record["config"].get("epochs", 10)
            alone = record.get("ran_with", 1) == 1
            out.append(f"- {label}, {epochs} epochs: {record['time_s']:.1f} s "
                       f"({'alone' if alone else 'SHARED, not the uncontended time'}); target < 30 s: "
                       f"{'met' if record['time_s'] < 30 else 'NOT met'}.")
            ratio = record["time_s"] / paper_retrain_s
            out.append(f"- {label} / Retrain of the paper's length ({PAPER_RETRAIN_EPOCHS} epochs x "
                       f"{retain_epoch_s:.2f} s, the probe's epoch on the retain set: {paper_retrain_s:.0f} s) "
                       f"= {ratio:.3f}; target <= 1/16 = 0.0625: {'met' if ratio <= 1 / 16 else 'NOT met'}. "
                       "Q-MUL reads forget + retain every epoch (and both again for its gradient norms), so "
                       f"{epochs} epochs are at least {epochs / (PAPER_RETRAIN_EPOCHS * 0.9):.3f} of it.")
            if reference:
                ag = gaps(record["metrics"], reference)["AG"]
                out.append(f"- {label} AG {ag:.2f}; the paper's Q-MUL {PAPER_QMUL_AG:.2f}: "
                           f"{'met' if ag <= PAPER_QMUL_AG else 'NOT met'}.")
        out.append(f"- Whole command within the budget ({self.env.get('budget_s', 0):.0f} s): "
                   f"{self.env.get('elapsed_s', 0):.0f} s so far.")
        return out


# ---------------------------------------------------------------------------------------------
# The run


def load_data_once(config: BenchConfig) -> float:
    """Decode the data set into the cache before the pool starts (every process then reads the
    cache); returns the seconds it took (the decode itself on a fresh machine)."""
    started = time.perf_counter()
    load_dataset(config.dataset, seed=config.data_seed_of(config.seeds[0]), **config.dataset_options)
    return time.perf_counter() - started


def run_probe(pool, manager, config: BenchConfig, seed: int, device: str, setup: TableSetup,
              workers: int, threads: int) -> dict:
    """The solo epoch time and the aggregate throughput of 2 and of `workers` processes at once."""
    args = (config, seed, device, setup.probe_steps, setup.warmup_steps)
    solo = pool.submit(probe_task, *args).result()
    throughput = {1: solo["samples"] / (solo["end"] - solo["start"])}
    for k in sorted({2, workers}):
        barrier = manager.Barrier(k, timeout=180)  # a process that died before it fails the probe
        rounds = [f.result() for f in [pool.submit(probe_task, *args, barrier) for _ in range(k)]]
        span = max(r["end"] for r in rounds) - min(r["start"] for r in rounds)
        throughput[k] = sum(r["samples"] for r in rounds) / span
    n_test = len(_seed_plan(config, seed, "cpu").test)
    fit_s = attacker_fit_seconds(n_test)
    epoch_s = solo["train_samples"] / throughput[1]
    epoch_s_fp32 = epoch_s
    if config.bf16:  # the methods that run float32 are timed at float32's speed
        fp32 = pool.submit(probe_task, replace(config, bf16=False), *args[1:]).result()
        epoch_s_fp32 = fp32["train_samples"] * (fp32["end"] - fp32["start"]) / fp32["samples"]
    return {"epoch_s": epoch_s, "epoch_s_fp32": epoch_s_fp32, "samples_per_s": throughput[1], "fit_s": fit_s,
            "eval_s": math.ceil(config.mia_draws / threads) * fit_s + EVAL_UNITS * epoch_s,
            "speedup": {str(k): throughput[k] / throughput[1] for k in sorted(throughput) if k > 1},
            "workers": workers, "device_info": solo["device_info"]}


def choose_workers(probe: dict, most: int) -> int:
    """The most processes whose measured throughput beats 2 processes' by 5%; else 2."""
    speedup = probe["speedup"]
    return most if most > 2 and speedup[str(most)] > 1.05 * speedup["2"] else min(2, most)


def run(setup: TableSetup, out: Path, work: Path, budget_s: float, seed: int, device: str,
        workers: int, bf16: bool, command: str, progress: bool = True) -> dict:
    started = time.perf_counter()
    report = Report(out / setup.name, setup, command)
    cache = work / setup.name / "cache"
    report.env.update(budget_s=budget_s, seed=seed, bf16=bf16, work=str(work))
    threads = 1 if device == "cpu" else max(1, (os.cpu_count() or 1) // workers)
    base = setup.bench_config(setup.epochs_floor, seed, device, bf16)
    report.env["decode_s"] = load_data_once(base)
    print(f"data ready in {report.env['decode_s']:.1f} s; torch {torch.__version__}", flush=True)
    context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                           initargs=(threads,)) as pool:
        probe_path = work / setup.name / f"probe-{device}-{'bf16' if bf16 else 'fp32'}.json"
        probe = read_json(probe_path)
        if probe is None or probe.get("workers") != workers:
            probe = run_probe(pool, manager, base, seed, device, setup, workers, threads)
            write_json(probe_path, probe)
        report.env.update(probe=probe, device_info=probe["device_info"])
        print(f"device {probe['device_info'].get('gpu', device)}: {probe['epoch_s']:.2f} s/epoch alone, "
              f"speed-up {probe['speedup']}, attacker fit {probe['fit_s']:.2f} s", flush=True)
        probe = {**probe, "workers": choose_workers(probe, workers)}
        plan = make_plan(setup, base, probe, budget_s, time.perf_counter() - started)
        report.env["plan"] = asdict(plan)
        print(plan.text(), flush=True)
        report.write()
        config = setup.bench_config(plan.epochs, seed, device, bf16)
        scheduler = Scheduler(pool, report, config, seed, device, cache, plan.workers)

        skipped: list[str] = []
        try:
            # The original and Retrain side by side.
            for which in ("original", "retrain"):
                scheduler.submit("train", which)
            scheduler.drain()
            original = report.stages.get("original")
            if original:
                print(f"original: train {original['train_accuracy']:.2f} %, test {original['test_accuracy']:.2f} %",
                      flush=True)

            # The first method alone, then everything else as the budget allows.
            seconds = method_seconds(config, probe)
            speedup = probe["speedup"][str(plan.workers)]
            queue = [("eval", "retrain"), ("eval", "original")] + [("method", m) for m in plan.methods]
            if plan.methods:  # the first of the priority list alone: its time is the uncontended one
                queue.remove(("method", plan.methods[0]))
                solo_done = manager.Event()
                solo = scheduler.submit("method", plan.methods[0], solo_done=solo_done)
                while scheduler.running and not solo_done.wait(0.5):
                    scheduler.collect(timeout=0)
                scheduler.freeze(solo)  # its evaluation (CPU) may share; its timed unlearning did not
            while queue:
                kind, name = queue[0]
                if scheduler.room():
                    estimate = probe["eval_s"] + (seconds.get(name, 0.0) * plan.workers / speedup
                                                  if kind == "method" else 0.0)
                    left = budget_s - (time.perf_counter() - started)
                    queue.pop(0)
                    if kind == "method" and estimate > left and not scheduler.recorded(kind, name):
                        skipped.append(name)
                        print(f"skipped {name}: estimated {estimate:.0f} s, {left:.0f} s left", flush=True)
                        continue
                    scheduler.submit(kind, name)
                else:
                    scheduler.collect(timeout=None)
            scheduler.drain()
        except BrokenProcessPool as error:  # a process died outright: keep what finished, say so
            scheduler.failures.append({"kind": "pool", "name": "-", "error": repr(error)})
            print(f"FAILED: the process pool broke: {error!r}", flush=True)
        report.env["skipped_at_run"] = skipped
        report.env["failures"] = scheduler.failures
        report.write()
    print((report.folder / "table.md").read_text(), flush=True)
    return report.env


class Scheduler:
    """At most `workers` stages in the pool at once; each finished stage goes into the report. A
    stage that fails is recorded as a failure and the run goes on."""

    def __init__(self, pool, report: Report, config: BenchConfig, seed: int, device: str, cache: Path,
                 workers: int):
        self.pool, self.report, self.config, self.seed = pool, report, config, seed
        self.device, self.cache, self.workers = device, cache, workers
        # future -> [kind, name, most stages running at once while it ran, whether that count is final]
        self.running: dict = {}
        self.failures: list[dict] = []

    def room(self) -> bool:
        return len(self.running) < self.workers

    def recorded(self, kind: str, name: str) -> bool:
        plan = _seed_plan(self.config, self.seed, "cpu")
        return stage_record_path(kind, name, self.config, self.seed, plan, self.cache).exists()

    def submit(self, kind: str, name: str, solo_done=None):
        future = self.pool.submit(stage_task, kind, name, self.config, self.seed, self.device, self.cache,
                                  solo_done)
        self.running[future] = [kind, name, 1, False]
        for entry in self.running.values():
            if not entry[3]:
                entry[2] = max(entry[2], len(self.running))
        return future

    def freeze(self, future) -> None:
        """The stage's count stays as it is: its measured part (a solo method's unlearning) is over."""
        if future in self.running:
            self.running[future][3] = True

    def collect(self, timeout: float | None) -> None:
        done, _ = wait(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            kind, name, ran_with, _ = self.running.pop(future)
            try:
                record = future.result()
            except Exception as error:  # noqa: BLE001 - one stage's failure must not lose the others
                self.failures.append({"kind": kind, "name": name, "error": repr(error)})
                print(f"FAILED {kind} {name}: {error!r}", flush=True)
                self.report.env["failures"] = self.failures
                self.report.write()
                continue
            record["ran_with"] = ran_with
            self.report.add(record)
            seconds = record.get("time_s", record.get("wall_s", 0.0))
            print(f"done {record['stage']}: {seconds:.1f} s" + (f" (ran with {ran_with})" if ran_with > 1 else "")
                  + (f", FA {record['metrics']['FA']:.2f} TA {record['metrics']['TA']:.2f}"
                     if "metrics" in record else ""), flush=True)

    def drain(self) -> None:
        while self.running:
            self.collect(timeout=None)


# ---------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.benchmarks.gpu_table",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[name for name in SETUPS if name != "smoke"], default="paper")
    parser.add_argument("--smoke", action="store_true", help="the smoke configuration: digits, CPU, tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    parser.add_argument("--work", default=None,
                        help="stage cache (records, models): default ~/.cache/qforget/gpu-table")
    parser.add_argument("--budget-s", type=float, help="seconds the whole command may take (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="most processes at once (default: the config's)")
    parser.add_argument("--device", help="default: the config's (cuda; smoke: cpu)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 everywhere")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup = SETUPS["smoke" if args.smoke else args.config]
    if args.out is None:
        raise SystemExit("--out is needed where $OUT is not set")
    device = args.device or setup.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (use --smoke on a CPU)")
    workers = args.workers or setup.workers
    if workers < 2:
        raise SystemExit("--workers must be at least 2 (the original and Retrain run side by side)")
    work = Path(args.work) if args.work else Path.home() / ".cache" / "qforget" / "gpu-table"
    command = "python -m workers.benchmarks.gpu_table " + " ".join(argv)
    env = run(setup, Path(args.out), work, args.budget_s or setup.budget_s, args.seed, device, workers,
              setup.bf16 and not args.no_bf16, command)
    return 0 if not env.get("failures") else 1


if __name__ == "__main__":
    raise SystemExit(main())
