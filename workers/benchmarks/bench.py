"""The unlearning benchmark: the paper's table (FA, RA, TA, MIA with their gaps to Retrain, AG),
over seeds, for any set of registered methods.

    python -m workers.benchmarks.bench --preset cpu-cifar10
    python -m workers.benchmarks.bench --preset gpu-paper --device cuda
    python -m workers.benchmarks.bench --dataset digits --model digits-cnn --forget-ratio 0.1 \\
        --seeds 0 1 --original-epochs 30 --methods ft rl qmul --set qmul.schedule=cycled

For each seed: load the data (the seed picks the subset and the validation split), draw the
forget set, train the original model on the whole train split and the retrain reference on the
retain set (same recipe, from scratch), then run every method on the original and evaluate it.
Every stage writes a JSON record (and the two trained models a state dict) under
<out>/cache/, keyed by a hash of everything that determines it, and is skipped when its record
exists: a run that is cut resumes where it stopped (a training stage mid-stage, from its
checkpoint), and runs that share an original model or a reference share the work. The run folder
<out>/<name>/ gets table.md, results.json and gaps.png.

Rows: Retrain (the reference: its gaps are 0 by definition), "No unlearning (original)", then
each method. Cells: mean +- std over seeds, with the gap to Retrain's mean in parentheses (the
paper's layout); AG is the mean of the four gaps. "AG/seed" is AG computed per seed (against that
seed's reference), mean +- std: the spread that says whether two methods differ at all.
MIA is the mean over --mia-draws membership attackers (20), each on its own class-balanced member
draw; "MIA sd/draw" beside it is the spread between those draws (mean over seeds): one draw moves
MIA by that much, the mean of the draws by sd / sqrt(draws). MIA-AUC and MIA-AUC-cal (metrics.py)
sit beside MIA and do not enter AG.

--ulira adds a per-example test in the spirit of U-LiRA (metrics.ulira): per seed, K retrain
references (training seeds seed + 1000 k, without the forget set) and, per method, K unlearned
models (the method run from K originals trained with those seeds, its own seed varied alike); can a
per-sample likelihood ratio tell an unlearned model from a retrained one (AUC, TPR at 1% FPR)? Its
models are kept under <out>/cache/models/ and <out>/<name>/ulira.json lists them with the forget
indices and every model's per-sample scores, so that an outside evaluator can rerun the test.

Time is wall-clock seconds of the method alone (for Retrain: its training). Memory is, on CUDA,
torch.cuda.max_memory_allocated during the stage (tensors only, not the allocator's cache, and
the data held on the GPU included); on the CPU, the peak resident set size of the whole process
during the stage, sampled every 20 ms from /proc (data, models and Python included, so it reads
as "this stage needed at most so much", not as the method's own share). Each record also keeps
the increase over the stage's start, which on the CPU is mostly zero: the allocator reuses memory
that earlier stages freed.
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from workers.engine.data import Split, classwise_forget_split, load_dataset, random_forget_split
from workers.engine.methods import (
    UNLEARNING_METHODS,
    method_applies,
    method_config,
    method_info,
    supports_bf16,
    unlearn,
)
from workers.engine.metrics import METRIC_KEYS, MIA_DRAWS, evaluate_with_membership, logit_confidence, ulira
from workers.engine.recipes import ModelSpec
from workers.engine.training import (
    TrainConfig,
    accuracy,
    checkpoint_seconds,
    predict_probs,
    save_atomically,
    train_model,
)

EXTRA_KEYS = ("MIA-AUC", "MIA-AUC-cal")
ALL_METHODS = [name for name in UNLEARNING_METHODS if name != "retrain"]


def default_methods(architecture: str) -> list[str]:
    """Every method but Retrain that runs on the architecture (LetheViT only on a ViT)."""
    return [name for name in ALL_METHODS if method_applies(name, architecture)]

PRESETS = {
    # Sized on the shared two-core CPU this project develops on (see docs/engine.md, Benchmark):
    # a 1-seed run took about a third of the budget, three seeds stay under 30 minutes.
    "cpu-cifar10": {
        "dataset": "cifar10",
        "dataset_options": {"train_per_class": 250, "test_per_class": 100},
        "model": "cifar-cnn", "quantizer": "lsq+", "weight_bits": 4, "act_bits": 4,
        "forget_ratio": 0.1, "seeds": [0, 1, 2],
        "original_epochs": 15, "retrain_epochs": 15, "unlearn_epochs": 5,
        "lr": 0.05, "batch_size": 64, "threads": 1,
        "method_overrides": {
            "qmul": {"grad_norm_batches": 8}, "qmul-no-sl": {"grad_norm_batches": 8},
            "qmul-no-agr": {"grad_norm_batches": 8}, "iu": {"fisher_samples": 200},
        },
    },
    # The smallest CPU setting found where the original memorises (train accuracy 15+ points above
    # test, test above 70%), so that forgetting has something to remove and membership tests
    # something to find: 30k CIFAR-10 training images without augmentation, the 10k test images
    # subsampled to 5k only to keep the SVM attackers' fits affordable. One forget set for all
    # seeds (data_seed): the seeds' models are the U-LiRA-style test's populations. Sizing and
    # budget: docs/bench/cpu-cifar10-memorising.md.
    "cpu-cifar10-memorising": {
        "dataset": "cifar10",
        "dataset_options": {"train_per_class": 3000, "test_per_class": 500, "augment": False},
        "model": "cifar-cnn", "quantizer": "lsq+", "weight_bits": 4, "act_bits": 4,
        "forget_ratio": 0.1, "seeds": [0, 1, 2], "data_seed": 0,
        "methods": ["qmul", "qmul-public", "oeu", "quail", "ft", "rl", "salun", "l1-sparse", "ga", "iu",
                    "qmul-no-sl", "qmul-no-agr"],
        "original_epochs": 24, "retrain_epochs": 24, "unlearn_epochs": 5,
        "lr": 0.05, "batch_size": 128, "threads": 1, "mia_draws": 10,
        "method_overrides": {
            "qmul": {"grad_norm_batches": 8}, "qmul-no-sl": {"grad_norm_batches": 8},
            "qmul-no-agr": {"grad_norm_batches": 8}, "qmul-public": {"grad_norm_batches": 8},
        },
    },
    # Every method on a quantized ViT on the CPU, sized like cpu-cifar10 for under 30 minutes: vit-mini
    # (vit-tiny's one epoch of 5,000 images takes about 6 minutes on one thread), 100 train and 100
    # test images per class, one seed, AdamW for the original and the retrain (the transformers
    # barely learn with SGD), unlearning 3 epochs (LetheViT's retain stage too). A whole run took 27.5
    # minutes; a model this small on this little data underfits (docs/bench/cpu-cifar10-vit.md).
    "cpu-cifar10-vit": {
        "dataset": "cifar10",
        "dataset_options": {"train_per_class": 100, "test_per_class": 100},
        "model": "vit-mini", "quantizer": "lsq+", "weight_bits": 4, "act_bits": 4,
        "forget_ratio": 0.1, "seeds": [0],
        "original_epochs": 20, "retrain_epochs": 20, "unlearn_epochs": 3,
        "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "batch_size": 64, "threads": 1,
        "method_overrides": {
            "qmul": {"grad_norm_batches": 8}, "qmul-no-sl": {"grad_norm_batches": 8},
            "qmul-no-agr": {"grad_norm_batches": 8}, "iu": {"fisher_samples": 200},
            "lethevit": {"retain_epochs": 3},
        },
    },
    # The SalUn / Q-MUL setting: full CIFAR-10 (45k train after the 5k validation split, 10k
    # test), ResNet-18, LSQ+ W4A4, 10% random forgetting, original 182 epochs and retrain 160 at
    # lr 0.1, unlearning 10 epochs, batch 256.
    "gpu-paper": {
        "dataset": "cifar10", "dataset_options": {},
        "model": "resnet18", "quantizer": "lsq+", "weight_bits": 4, "act_bits": 4,
        "forget_ratio": 0.1, "seeds": [0, 1, 2],
        "original_epochs": 182, "retrain_epochs": 160, "unlearn_epochs": 10,
        "lr": 0.1, "batch_size": 256, "unlearn_batch_size": 256,
        "method_overrides": {"iu": {"fisher_memory_gib": 24.0}},
    },
}


@dataclass
class BenchConfig:
    methods: list[str] | None = None  # None: default_methods(model)
    dataset: str = "digits"
    dataset_options: dict = field(default_factory=dict)
    model: str = "digits-cnn"
    quantizer: str = "lsq+"
    weight_bits: int | None = 4
    act_bits: int | None = 4
    forget_ratio: float | None = 0.1
    forget_class: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    # One data split and forget set for every seed, which then varies the training alone (initial
    # weights, batch order, the methods' seeds); None: each seed draws its own data and forget set.
    data_seed: int | None = None
    original_epochs: int = 30
    retrain_epochs: int | None = None  # None: as the original
    unlearn_epochs: int | None = None  # None: each method's default
    lr: float = 0.05  # original and retrain
    batch_size: int = 64  # original and retrain
    optimizer: str = "sgd"  # original and retrain: "sgd" or "adamw" (the transformers)
    weight_decay: float = 5e-4  # original and retrain
    unlearn_batch_size: int | None = None  # None: each method's default
    method_overrides: dict = field(default_factory=dict)  # {method: {config key: value}}
    mia_draws: int = MIA_DRAWS  # membership attackers MIA is averaged over
    ulira: bool = False  # run the per-example U-LiRA-style stage
    ulira_models: int = 4  # K: references and unlearned models per method, per seed
    device: str = "auto"
    threads: int | None = None
    name: str | None = None
    preset: str | None = None
    # bfloat16 autocast for the training stages and the methods whose runner takes it (Q-MUL and its
    # variants: methods.supports_bf16); the quantizers stay float32. Part of every key it touches.
    bf16: bool = False

    def __post_init__(self):
        if self.methods is None:
            self.methods = default_methods(self.model)
        for method in self.methods:
            if not method_applies(method, self.model):
                raise ValueError(f"method {method!r} does not run on {self.model!r} (it needs a vision transformer)")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def data_seed_of(self, seed: int) -> int:
        return seed if self.data_seed is None else self.data_seed

    def spec(self, seed: int, epochs: int) -> ModelSpec:
        """The recipe of the original (and, with the retrain epochs, of the reference): the seed
        picks the initial weights and the batch order, and (without data_seed) the data subset
        and split."""
        return ModelSpec(
            architecture=self.model, dataset=self.dataset, weight_bits=self.weight_bits,
            act_bits=self.act_bits, quantizer=self.quantizer,
            train=TrainConfig(epochs=epochs, lr=self.lr, batch_size=self.batch_size, seed=seed,
                              optimizer=self.optimizer, weight_decay=self.weight_decay),
            data_seed=self.data_seed_of(seed), data_options=dict(self.dataset_options),
        )

    def seeded_spec(self, seed: int, epochs: int, train_seed: int) -> ModelSpec:
        """spec() with another training seed (initial weights, batch order): the same data, split
        and recipe, another model."""
        spec = self.spec(seed, epochs)
        return replace(spec, train=replace(spec.train, seed=train_seed))

    def precision(self, method: str | None = None) -> dict:
        """The stage-key part for bf16 (empty when off, so float32 keys are those of earlier runs);
        method: a method stage, which runs bf16 only where its runner supports it."""
        on = self.bf16 and (method is None or supports_bf16(method))
        return {"bf16": True} if on else {}

    def forget_label(self) -> str:
        if self.forget_class is not None:
            return f"class {self.forget_class} forgotten"
        return f"{self.forget_ratio:.0%} random forgetting"


# ---------------------------------------------------------------------------------------------
# Keys, records and measurements


def plain(value):
    """JSON-able form of configs (dataclasses, tuples, paths)."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(kind: str, **parts) -> str:
    blob = json.dumps(plain({"kind": kind, **parts}), sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def write_json(path: Path, data) -> None:
    """Atomically: a record is either whole or absent, whatever instant the run is cut at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(plain(data), indent=1))
    os.replace(temp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Measure:
    """Wall time and peak memory of a block (module docstring for what the memory means)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.result: dict = {}

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_memory = torch.cuda.memory_allocated()
        else:
            self.start_memory = self.peak = rss_bytes()
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            self.stop.set()
            self.sampler.join()
            peak, kind = max(self.peak, rss_bytes()), "cpu_rss_peak_sampled"
        self.result = {
            "time_s": time.perf_counter() - self.start,
            "memory_kind": kind,
            "peak_mib": peak / 2**20,
            "peak_increase_mib": max(peak - self.start_memory, 0) / 2**20,
        }
        return False


# ---------------------------------------------------------------------------------------------
# One seed


@dataclass
class SeedContext:
    seed: int
    train: Split
    forget_index: list[int]
    forget: Split
    retain: Split
    test: Split
    original: torch.nn.Module
    reference: torch.nn.Module
    original_record: dict
    reference_record: dict
    keys: dict


def to_device(split: Split, device: str) -> Split:
    """Images on the device (augmented there); labels stay on the CPU, where metrics read them."""
    return Split(split.x.to(device), split.y, split.augment)


def trained_model(cache: Path, key: str, spec: ModelSpec, data: Split, device: str,
                  progress: bool, desc: str, extra_eval, bf16: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train (or load) one model of the recipe; its record holds time, memory and accuracies.
    The training checkpoints itself (<key>.partial.pt): a run cut mid-stage resumes mid-stage, and
    its record's time adds the part before the cut (a long stage on a machine that grants ten
    minutes per command)."""
    record_path, model_path = cache / "stages" / f"{key}.json", cache / "models" / f"{key}.pt"
    record = read_json(record_path)
    if record is not None and model_path.exists():
        return load_model(spec, model_path, device), record
    model = spec.build()
    partial = cache / "models" / f"{key}.partial.pt"
    seconds_before_cut = checkpoint_seconds(partial)
    with Measure(device) as measured:
        train_model(model, data, spec.train, device, progress, desc=desc, checkpoint=partial, bf16=bf16)
    if seconds_before_cut:
        measured.result["time_s"] += seconds_before_cut
        measured.result["resumed_after_s"] = seconds_before_cut
    save_model(model, model_path)
    record = {"key": key, "spec": spec.to_dict(), "bf16": bf16, **measured.result, **extra_eval(model)}
    write_json(record_path, record)
    return model, record


@dataclass
class SeedPlan:
    """One seed's data, splits and the two trainings' recipes and keys, before anything is trained."""

    seed: int
    data: object  # DatasetSplits
    train: Split
    forget_index: list[int]
    forget: Split
    retain: Split
    test: Split
    trainings: dict  # "original" / "retrain" -> (key, spec, the split it trains on)
    keys: dict


def plan_seed(config: BenchConfig, seed: int, device: str) -> SeedPlan:
    data_seed = config.data_seed_of(seed)
    data = load_dataset(config.dataset, seed=data_seed, **config.dataset_options)
    data_part = {"dataset": config.dataset, "options": config.dataset_options, "seed": data_seed}
    if config.forget_class is not None:
        forget_index, retain_index = classwise_forget_split(data.train.y, config.forget_class)
        # As in the reference code: the forgotten class leaves the test set too.
        test = data.test.subset(torch.where(data.test.y != config.forget_class)[0])
    else:
        forget_index, retain_index = random_forget_split(len(data.train), config.forget_ratio,
                                                         data_seed)
        test = data.test
    train = to_device(data.train, device)
    forget, retain, test = (to_device(s, device) for s in
                            (data.train.subset(forget_index), data.train.subset(retain_index),
                             test))
    split_part = {"data": data_part, "forget_ratio": config.forget_ratio,
                  "forget_class": config.forget_class}
    original_spec = config.spec(seed, config.original_epochs)
    original_key = stage_key("original", data=data_part, spec=original_spec.to_dict(), **config.precision())
    reference_spec = config.spec(seed, config.retrain_epochs or config.original_epochs)
    reference_key = stage_key("retrain", split=split_part, spec=reference_spec.to_dict(), **config.precision())
    return SeedPlan(seed, data, train, [int(i) for i in forget_index], forget, retain, test,
                    {"original": (original_key, original_spec, train),
                     "retrain": (reference_key, reference_spec, retain)},
                    {"original": original_key, "retrain": reference_key, "split": split_part,
                     "data": data_part})


def train_stage(config: BenchConfig, plan: SeedPlan, which: str, cache: Path, device: str,
                progress: bool) -> tuple[torch.nn.Module, dict]:
    """The original ("original": on the whole train split, its record with train and test accuracy)
    or the retrain reference ("retrain": on the retain set), trained or loaded from the cache."""
    key, spec, data = plan.trainings[which]
    if which == "original":
        def extra_eval(model):
            return {"train_accuracy": accuracy(model, plan.train, device),
                    "test_accuracy": accuracy(model, plan.data.test, device)}
    else:
        def extra_eval(model):
            return {}
    return trained_model(cache, key, spec, data, device, progress, which, extra_eval, bf16=config.bf16)


def prepare_seed(config: BenchConfig, seed: int, cache: Path, device: str,
                 progress: bool) -> SeedContext:
    plan = plan_seed(config, seed, device)
    original, original_record = train_stage(config, plan, "original", cache, device, progress)
    reference, reference_record = train_stage(config, plan, "retrain", cache, device, progress)
    return SeedContext(seed, plan.train, plan.forget_index, plan.forget, plan.retain, plan.test, original,
                       reference, original_record, reference_record, plan.keys)


def method_overrides(config: BenchConfig, method: str, seed: int) -> dict:
    known = {f.name for f in fields(method_info(method).config_class)}
    overrides = {"seed": seed} if "seed" in known else {}
    if config.unlearn_epochs is not None and "epochs" in known and method != "ga":
        overrides["epochs"] = config.unlearn_epochs  # GA keeps its own (5 in the reference)
    if config.unlearn_batch_size is not None and "batch_size" in known:
        overrides["batch_size"] = config.unlearn_batch_size
    overrides.update(config.method_overrides.get(method, {}))
    return overrides


def forget_scores(model, forget: Split, device: str) -> list[float]:
    """The model's logit-scaled true-class confidence on each forget sample: what the U-LiRA-style
    test compares between populations of models."""
    return logit_confidence(predict_probs(model, forget.x, device), forget.y).tolist()


def evaluate_stage(cache: Path, key: str, model, context: SeedContext, device: str,
                   extra: dict, draws: int) -> dict:
    record = read_json(cache / "stages" / f"{key}.json")
    if record is None:
        metrics = evaluate_with_membership(model, context.forget, context.retain, context.test,
                                           reference=context.reference, device=device,
                                           seed=context.seed, draws=draws)
        record = {"key": key, "metrics": metrics, "forget_scores": forget_scores(model, context.forget, device),
                  **extra}
        write_json(cache / "stages" / f"{key}.json", record)
    return record


def save_model(model, path: Path) -> None:
    save_atomically({name: value.detach().cpu() for name, value in model.state_dict().items()}, path)


def load_model(spec: ModelSpec, path: Path, device: str) -> torch.nn.Module:
    model = spec.build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device)


def base_key(config: BenchConfig, keys: dict) -> dict:
    """What every evaluation and method stage of a seed is keyed by besides its own config."""
    return {"original": keys["original"], "retrain": keys["retrain"],
            "mia": {"draws": config.mia_draws, "class_balanced": True}}


def reference_rows(config: BenchConfig, context: SeedContext, cache: Path, device: str,
                   which: tuple[str, ...] = ("retrain", "original")) -> dict[str, dict]:
    """The Retrain and original rows of a seed (or those named in which): each model evaluated (or
    its record loaded)."""
    base, draws = base_key(config, context.keys), config.mia_draws
    models = {"retrain": context.reference, "original": context.original}
    extras = {"retrain": {k: context.reference_record[k] for k in ("time_s", "memory_kind", "peak_mib",
                                                                   "peak_increase_mib")},
              "original": {}}
    rows = {}
    for row in which:
        rows[row] = evaluate_stage(cache, stage_key(f"eval-{row}", **base), models[row], context, device,
                                   extras[row], draws)
        rows[row]["model"] = f"cache/models/{context.keys[row]}.pt"
    return rows


def method_stage_key(config: BenchConfig, method: str, seed: int, keys: dict) -> tuple[str, object]:
    """(stage key, config) of one method's stage for a seed."""
    method_cfg = method_config(method, method_overrides(config, method, seed))
    return stage_key(f"method-{method}", config=method_cfg, **base_key(config, keys),
                     **config.precision(method)), method_cfg


def method_row(config: BenchConfig, context: SeedContext, method: str, cache: Path, device: str,
               progress: bool, after_unlearning=None) -> dict:
    """One method's record for a seed: run on the original, saved, evaluated; or loaded from the
    cache. after_unlearning(record so far) is called between the run and its evaluation."""
    key, method_cfg = method_stage_key(config, method, context.seed, context.keys)
    record = read_json(cache / "stages" / f"{key}.json")
    if record is None:
        bf16 = bool(config.precision(method))
        with Measure(device) as measured:
            result = unlearn(method, context.original, context.forget, context.retain,
                             method_cfg, device=device, progress=progress, bf16=bf16)
        save_model(result.model, cache / "models" / f"{key}.pt")
        if after_unlearning is not None:
            after_unlearning(measured.result)
        record = evaluate_stage(cache, key, result.model, context, device,
                                {"method": method, "config": method_cfg, "bf16": bf16, **measured.result,
                                 "history": result.history, "model": f"cache/models/{key}.pt"},
                                config.mia_draws)
    return record


def run_seed(config: BenchConfig, context: SeedContext, cache: Path, device: str,
             progress: bool) -> dict[str, dict]:
    """{row name: record} for Retrain, the original and every method, for one seed. Every scored
    model stays in cache/models/ (the record's "model" path), for outside evaluators."""
    rows = reference_rows(config, context, cache, device)
    methods = [m for m in config.methods if m != "retrain"]
    for method in tqdm(methods, desc=f"seed {context.seed}", disable=not progress, leave=False):
        rows[method] = method_row(config, context, method, cache, device, progress)
    return rows


def ulira_seed(config: BenchConfig, context: SeedContext, cache: Path, device: str,
               progress: bool) -> dict:
    """The U-LiRA-style stage of one seed: K references and K originals (training seeds seed + 1000 k;
    k = 0 are the seed's own), each method run from each original (its seed varied alike), every
    model's logit-scaled confidences on the forget set, and metrics.ulira of each method's models
    (and of the originals: doing nothing) against the references. The unlearned models are saved
    beside the trained ones (cache/models/<key>.pt) so that the test can be rerun from the files."""
    seed, forget = context.seed, context.forget
    methods = [m for m in config.methods if m != "retrain"]
    models: dict[str, list[dict]] = {"retrain": [], "original": [], **{m: [] for m in methods}}
    scores: dict[str, list[list[float]]] = {name: [] for name in models}

    for k in range(config.ulira_models):
        train_seed = seed + 1000 * k
        reference_spec = config.seeded_spec(seed, config.retrain_epochs or config.original_epochs, train_seed)
        reference_key = stage_key("retrain", split=context.keys["split"], spec=reference_spec.to_dict())
        reference, _ = trained_model(cache, reference_key, reference_spec, context.retain, device, progress,
                                     f"U-LiRA retrain {k}", lambda model: {})
        original_spec = config.seeded_spec(seed, config.original_epochs, train_seed)
        original_key = stage_key("original", data=context.keys["data"], spec=original_spec.to_dict())
        original, _ = trained_model(
            cache, original_key, original_spec, context.train, device, progress, f"U-LiRA original {k}",
            lambda model: {"train_accuracy": accuracy(model, context.train, device),
                           "test_accuracy": accuracy(model, context.test, device)})
        for name, key, spec, model in (("retrain", reference_key, reference_spec, reference),
                                       ("original", original_key, original_spec, original)):
            models[name].append({"path": f"cache/models/{key}.pt", "spec": spec.to_dict()})
            scores[name].append(forget_scores(model, forget, device))
        for method in methods:
            overrides = method_overrides(config, method, seed)
            if "seed" in overrides:
                overrides["seed"] = train_seed
            method_cfg = method_config(method, overrides)
            key = stage_key(f"ulira-{method}", config=method_cfg, original=original_key)
            path = cache / "models" / f"{key}.pt"
            if path.exists():
                model = load_model(original_spec, path, device)
            else:
                model = unlearn(method, original, forget, context.retain, method_cfg, device=device,
                                progress=progress).model
                save_model(model, path)
            models[method].append({"path": f"cache/models/{key}.pt", "spec": original_spec.to_dict(),
                                   "config": method_cfg, "original": f"cache/models/{original_key}.pt"})
            scores[method].append(forget_scores(model, forget, device))
    return {"forget_indices": context.forget_index, "data": context.keys["data"], "models": models,
            "scores": scores, **ulira_test(scores)}


def ulira_across_seeds(per_seed: dict[int, dict], rows: list[str]) -> dict:
    """The U-LiRA-style test where every seed shares one data split and forget set (data_seed): the
    seeds' own retrain references and unlearned models are the populations, no extra training."""
    return ulira_test({row: [per_seed[seed][row]["forget_scores"] for seed in per_seed] for row in rows})


def ulira_test(scores: dict[str, list[list[float]]]) -> dict:
    """metrics.ulira of every population in scores (row -> K x n forget-set scores) against the
    "retrain" one, and how far two references lie apart per sample."""
    retrained = np.array(scores["retrain"])
    results = {name: ulira(retrained, np.array(values)) for name, values in scores.items() if name != "retrain"}
    pairs = [np.abs(retrained[i] - retrained[j]) for i in range(len(retrained))
             for j in range(i + 1, len(retrained))]
    return {"results": results,
            "reference_pair_difference": {
                "what": "|difference of logit-scaled confidences| between two references (different training "
                        "seeds) on the forget samples, over every pair: what the service's evidence threshold is",
                "p50": float(np.percentile(pairs, 50)), "p95": float(np.percentile(pairs, 95)),
                "p99": float(np.percentile(pairs, 99))}}


# ---------------------------------------------------------------------------------------------
# Aggregation and reports


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(per_seed: dict[int, dict[str, dict]], row_names: list[str]) -> dict[str, dict]:
    keys = METRIC_KEYS + EXTRA_KEYS
    reference = {k: mean_std([per_seed[s]["retrain"]["metrics"][k] for s in per_seed])[0]
                 for k in keys}
    table = {}
    for row in row_names:
        records = [per_seed[s][row] for s in per_seed]
        cells = {k: mean_std([r["metrics"][k] for r in records]) for k in keys}
        gaps = {k: abs(cells[k][0] - reference[k]) for k in keys}
        seed_gaps = {k: [abs(per_seed[s][row]["metrics"][k] - per_seed[s]["retrain"]["metrics"][k])
                         for s in per_seed] for k in keys}
        per_seed_ag = [sum(seed_gaps[k][i] for k in METRIC_KEYS) / len(METRIC_KEYS)
                       for i in range(len(per_seed))]
        table[row] = {
            "cells": cells, "gaps": gaps,
            "gaps_per_seed": {k: mean_std(v) for k, v in seed_gaps.items()},
            "AG": sum(gaps[k] for k in METRIC_KEYS) / len(METRIC_KEYS),
            "AG_per_seed": mean_std(per_seed_ag), "AG_seeds": per_seed_ag,
            "MIA_sd": mean_std([r["metrics"].get("MIA_sd", float("nan")) for r in records]),
            "time_s": mean_std([r.get("time_s", float("nan")) for r in records]),
            "peak_mib": mean_std([r.get("peak_mib", float("nan")) for r in records]),
            "peak_increase_mib": mean_std([r.get("peak_increase_mib", float("nan"))
                                           for r in records]),
        }
    return table


def verdict(table: dict[str, dict], n_seeds: int) -> tuple[str, dict]:
    """Whether this configuration can tell the methods apart: a difference in per-seed AG counts
    only if it exceeds the larger of the two rows' seed-to-seed standard deviations."""
    methods = [r for r in table if r not in ("retrain", "original")]
    if not methods:
        return "No unlearning method was run.", {}
    best = min(methods, key=lambda r: table[r]["AG_per_seed"][0])
    if n_seeds < 2:
        text = ("One seed: no spread to compare differences with, so this table cannot tell "
                f"the methods apart (lowest AG: {method_label(best)}).")
        return text, {"best": best}

    def tied(a, b):
        spread = max(table[a]["AG_per_seed"][1], table[b]["AG_per_seed"][1])
        return abs(table[a]["AG_per_seed"][0] - table[b]["AG_per_seed"][0]) <= spread

    ties = [r for r in methods if r != best and tied(best, r)]
    original_tied = tied(best, "original")
    better = [r for r in methods if not tied(r, "original")
              and table[r]["AG_per_seed"][0] < table["original"]["AG_per_seed"][0]]
    summary = {"best": best, "tied_with_best": ties, "original_tied_with_best": original_tied,
               "better_than_original": better}
    label = method_label(best)
    if original_tied:
        text = (f"Too small to tell the methods apart: the lowest AG ({label}, "
                f"{table[best]['AG_per_seed'][0]:.2f}) is within the seed-to-seed spread of "
                f"doing nothing (original, {table['original']['AG_per_seed'][0]:.2f}).")
    elif len(ties) >= len(methods) // 2:
        text = (f"Too small to tell most methods apart: {len(ties)} of {len(methods) - 1} "
                f"others are within the seed spread of the best ({label}).")
    else:
        text = (f"{label} has the lowest AG; within the seed spread of it: "
                f"{', '.join(method_label(r) for r in ties) or 'none'}.")
    if better:
        text += (" Clearly better than no unlearning: "
                 f"{', '.join(method_label(r) for r in better)}.")
    else:
        text += " No method is clearly better than no unlearning."
    return text, summary


def method_label(row: str) -> str:
    if row == "original":
        return "No unlearning (original)"
    return UNLEARNING_METHODS[row].label


def fmt(cell: tuple[float, float]) -> str:
    return f"{cell[0]:.2f} ± {cell[1]:.2f}"


def markdown(config: BenchConfig, table: dict, per_seed: dict, summary: dict, command: str,
             wall_s: float, device: str) -> str:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    originals = [per_seed[s]["original_record"] for s in seeds]
    train_acc = mean_std([r["train_accuracy"] for r in originals])
    test_acc = mean_std([r["test_accuracy"] for r in originals])
    n_forget, n_retain, n_test = first["sizes"]
    memory_kind = ("peak CUDA max_memory_allocated" if device.startswith("cuda")
                   else "peak process RSS, sampled every 20 ms")
    subset = f" (subset: {json.dumps(config.dataset_options)})" if config.dataset_options else ""
    lines = [
        (f"## {config.name}: {config.dataset} {config.model}, {config.quantizer.upper()} "
         f"W{config.weight_bits}A{config.act_bits}, {config.forget_label()}"),
        "",
        (f"- Data: {n_forget} forget / {n_retain} retain / {n_test} test samples{subset}; "
         f"seeds {seeds}; epochs: original {config.original_epochs}, retrain "
         f"{config.retrain_epochs or config.original_epochs}, unlearning "
         f"{config.unlearn_epochs or 'method defaults'}; device {device}."),
        (f"- Original model: train accuracy {fmt(train_acc)} %, test accuracy {fmt(test_acc)} % "
         f"(train - test = {train_acc[0] - test_acc[0]:.1f} points)."),
        (f"- Retrain reference: FA {fmt(table['retrain']['cells']['FA'])}, TA "
         f"{fmt(table['retrain']['cells']['TA'])}."),
        "",
        ("| Method | FA | RA | TA | MIA | AG ↓ | AG/seed | MIA sd/draw | MIA-AUC | MIA-AUC-cal | Time (s) "
         f"| Memory (MiB, {memory_kind}) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, entry in table.items():
        cells = [f"{fmt(entry['cells'][k])} ({entry['gaps'][k]:.2f})"
                 for k in METRIC_KEYS + EXTRA_KEYS]
        cost = ["-", "-"] if row == "original" else [
            fmt(entry["time_s"]), f"{entry['peak_mib'][0]:.0f}"]
        lines.append(" | ".join(["", method_label(row), *cells[:4], f"{entry['AG']:.2f}",
                                 fmt(entry["AG_per_seed"]), f"{entry['MIA_sd'][0]:.2f}", *cells[4:], *cost,
                                 ""]).strip())
    lines += ["", f"**Verdict.** {summary['text']}", ""]
    if "qmul" in table:
        ratio = table["qmul"]["time_s"][0] / table["retrain"]["time_s"][0]
        lines.append(f"- Q-MUL time / Retrain time: {table['qmul']['time_s'][0]:.1f} s / "
                     f"{table['retrain']['time_s'][0]:.1f} s = {ratio:.3f}.")
    lines += [
        ("- Cells: mean ± std over seeds (gap to Retrain's mean). AG: mean of the four gaps "
         "(FA, RA, TA, MIA); AG/seed: AG against each seed's own reference. MIA: mean over "
         f"{config.mia_draws} attackers, each on its own class-balanced member draw; MIA sd/draw: the "
         "spread between those draws (mean over seeds). MIA-AUC(-cal): threshold-free membership "
         "tests, not in AG (docs/engine.md, Metrics)."),
        (f"- Compute recorded by the stages (originals, references, methods; evaluations not "
         f"included): {stage_seconds(per_seed) / 60:.1f} min. Wall time of this invocation: "
         f"{wall_s / 60:.1f} min (stages found in the cache cost nothing)."),
        f"- Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def ulira_markdown(runs: dict, populations: str) -> str:
    """The U-LiRA-style stage's table: per row, AUC and TPR at 1% FPR, mean ± std over runs (one per
    seed, or one over all seeds); populations says where the K models come from."""
    first = next(iter(runs.values()))
    rows = list(first["results"])
    k_models, n_samples = first["results"][rows[0]]["models"], first["results"][rows[0]]["samples"]
    lines = ["", f"### Per-example test (U-LiRA-style, K = {k_models} models per population: {populations}; "
             f"{n_samples} forget samples)", "",
             "| Models | AUC (%) | TPR at 1% FPR (%) |", "|---|---|---|"]
    for row in rows:
        auc = mean_std([run_["results"][row]["AUC"] for run_ in runs.values()])
        tpr = mean_std([run_["results"][row]["TPR@FPR"] for run_ in runs.values()])
        show = fmt if len(runs) > 1 else (lambda cell: f"{cell[0]:.2f}")  # one run: no spread to show
        lines.append(f"| {method_label(row)} | {show(auc)} | {show(tpr)} |")
    pair = mean_std([run_["reference_pair_difference"]["p95"] for run_ in runs.values()])
    lines += ["", ("- Telling each row's models from retrained ones by a per-sample Gaussian likelihood "
                   "ratio on the logit-scaled confidence, leave one out (docs/engine.md). 50: "
                   "indistinguishable from retraining."),
              (f"- Two references (different training seeds) differ on a forget sample's logit-scaled "
               f"confidence by more than {fmt(pair)} on 5% of the samples (the 95th percentile).")]
    return "\n".join(lines) + "\n"


def stage_seconds(per_seed: dict) -> float:
    """Training and unlearning time recorded by every stage of the run, cached or not."""
    total = 0.0
    for rows in per_seed.values():
        total += rows["original_record"]["time_s"]
        total += sum(record.get("time_s", 0.0) for name, record in rows.items()
                     if name not in ("original", "original_record", "sizes"))
    return total


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r != "retrain"]
    keys = list(METRIC_KEYS) + ["AG"]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows)), 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        cells = [table[r]["AG_per_seed"] if key == "AG" else table[r]["gaps_per_seed"][key]
                 for r in rows]
        values = [mean for mean, _ in cells]
        # Gaps are non-negative: the lower whisker stops at zero.
        errors = [[min(std, mean) for mean, std in cells], [std for _, std in cells]]
        positions = np.arange(len(rows)) + (i - (len(keys) - 1) / 2) * width
        ax.bar(positions, values, width, yerr=errors, capsize=2, label=key)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels([method_label(r).replace(" (original)", "\n(original)") for r in rows],
                       rotation=30, ha="right")
    ax.set_ylabel("|gap to Retrain| (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=len(keys), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Entry points


def run(config: BenchConfig, out: Path, progress: bool = True, command: str = "") -> dict:
    """Run (or resume) the benchmark; write table.md, results.json and gaps.png; return the
    results."""
    for method in config.methods:
        method_info(method)  # unknown names fail before any training
    device = config.resolved_device()
    if config.threads:
        torch.set_num_threads(config.threads)
    config.name = config.name or config.preset or stage_key("custom", config=config)
    cache, run_dir = out / "cache", out / config.name
    started = time.perf_counter()
    per_seed, ulira_runs, scored_models = {}, {}, {}
    row_names = ["retrain", "original"] + [m for m in config.methods if m != "retrain"]
    for seed in tqdm(config.seeds, desc="seeds", disable=not progress):
        context = prepare_seed(config, seed, cache, device, progress)
        rows = run_seed(config, context, cache, device, progress)
        per_seed[seed] = {**rows, "original_record": context.original_record,
                          "sizes": (len(context.forget), len(context.retain), len(context.test))}
        scored_models[seed] = {"data": context.keys["data"], "forget_indices": context.forget_index,
                               "models": {row: {"path": rows[row]["model"], "config": rows[row].get("config")}
                                          for row in row_names},
                               "spec": config.spec(seed, config.original_epochs).to_dict()}
        if config.ulira:
            ulira_runs[seed] = ulira_seed(config, context, cache, device, progress)
        del context
    write_json(run_dir / "models.json", {"config": config, "seeds": scored_models})
    seeds_rows = {s: {r: per_seed[s][r] for r in row_names} for s in per_seed}
    table = aggregate(seeds_rows, row_names)
    text, summary = verdict(table, len(config.seeds))
    summary["text"] = text
    wall = time.perf_counter() - started
    report = markdown(config, table, per_seed, summary, command, wall, device)
    if ulira_runs:
        report += ulira_markdown(ulira_runs, f"references and originals trained per seed, seeds {config.seeds}")
        write_json(run_dir / "ulira.json", {"config": config, "device": device, "seeds": ulira_runs})
    elif config.data_seed is not None and len(config.seeds) >= 3:
        ulira_runs = {"seeds": ulira_across_seeds(seeds_rows, row_names)}
        report += ulira_markdown(ulira_runs, f"the models of seeds {config.seeds}, one forget set")
    plot(table, run_dir / "gaps.png",
         f"{config.name}: |gap to each seed's Retrain|, mean ± std over seeds {config.seeds}")
    results = {
        "config": config, "device": device, "wall_time_s": wall, "verdict": summary,
        "table": table, "command": command,
        "ulira": {seed: {"results": {name: {k: v for k, v in result.items() if k != "sample_auc"}
                                     for name, result in seed_run["results"].items()},
                         "reference_pair_difference": seed_run["reference_pair_difference"]}
                  for seed, seed_run in ulira_runs.items()},
        "per_seed": {s: {r: {k: v for k, v in rec.items() if k != "history"}
                         for r, rec in per_seed[s].items() if isinstance(rec, dict)}
                     for s in per_seed},
    }
    write_json(run_dir / "results.json", results)
    (run_dir / "table.md").write_text(report)
    return results


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> dict:
    overrides: dict = {}
    for item in items:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        if not (method and key and _):
            raise SystemExit(f"--set wants method.key=value, got {item!r}")
        overrides.setdefault(method, {})[key] = parse_value(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers.benchmarks.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"default: all of {ALL_METHODS} that run on the model (LetheViT needs a ViT; "
                        "Retrain always runs)")
    parser.add_argument("--dataset")
    parser.add_argument("--train-per-class", type=int, help="subset size per class (train)")
    parser.add_argument("--test-per-class", type=int, help="subset size per class (test)")
    parser.add_argument("--model")
    parser.add_argument("--quantizer")
    parser.add_argument("--weight-bits", type=int)
    parser.add_argument("--act-bits", type=int)
    forget = parser.add_mutually_exclusive_group()
    forget.add_argument("--forget-ratio", type=float, help="random forgetting of this fraction")
    forget.add_argument("--forget-class", type=int, help="class-wise forgetting of this class")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--data-seed", type=int,
                        help="one data split and forget set for every seed (seeds then vary the training only; "
                             "with 3 or more seeds the U-LiRA-style test runs on the seeds' models)")
    parser.add_argument("--original-epochs", type=int)
    parser.add_argument("--retrain-epochs", type=int)
    parser.add_argument("--unlearn-epochs", type=int,
                        help="epochs of every iterative method but GA (default: their own)")
    parser.add_argument("--lr", type=float, help="learning rate of original and retrain")
    parser.add_argument("--batch-size", type=int, help="batch size of original and retrain")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer of original and retrain (default sgd)")
    parser.add_argument("--weight-decay", type=float, help="weight decay of original and retrain (default 5e-4)")
    parser.add_argument("--unlearn-batch-size", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="override one method's config value (JSON or a string); repeatable")
    parser.add_argument("--mia-draws", type=int,
                        help=f"membership attackers MIA is averaged over (default {MIA_DRAWS})")
    parser.add_argument("--ulira", action="store_true",
                        help="add the per-example U-LiRA-style test (K references and K unlearned models per method)")
    parser.add_argument("--ulira-models", type=int, help="K for --ulira (default 4, at least 3)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for training and the methods that support it (quantizers float32)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--name", help="run name (default: the preset's, else a config hash)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = dict(copy.deepcopy(PRESETS[args.preset])) if args.preset else {}
    values["preset"] = args.preset
    options = dict(values.get("dataset_options", {}))
    if args.train_per_class is not None:
        options["train_per_class"] = args.train_per_class
    if args.test_per_class is not None:
        options["test_per_class"] = args.test_per_class
    values["dataset_options"] = options
    simple = ["methods", "dataset", "model", "quantizer", "weight_bits", "act_bits", "seeds", "data_seed",
              "original_epochs", "retrain_epochs", "unlearn_epochs", "lr", "batch_size", "optimizer",
              "weight_decay", "unlearn_batch_size", "mia_draws", "ulira_models", "device", "threads", "name"]
    for name in simple:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.ulira:
        values["ulira"] = True
    if args.bf16:
        values["bf16"] = True
    if args.forget_class is not None:
        values["forget_class"], values["forget_ratio"] = args.forget_class, None
    elif args.forget_ratio is not None:
        values["forget_ratio"], values["forget_class"] = args.forget_ratio, None
    overrides = copy.deepcopy(values.get("method_overrides", {}))
    for method, changes in parse_sets(args.set).items():
        method_info(method)
        overrides.setdefault(method, {}).update(changes)
    values["method_overrides"] = overrides
    return BenchConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    command = "python -m workers.benchmarks.bench " + " ".join(argv)
    results = run(config, Path(args.out), progress=not args.no_progress, command=command)
    run_dir = Path(args.out) / config.name
    print((run_dir / "table.md").read_text())
    print(f"wrote {run_dir / 'table.md'}, {run_dir / 'results.json'}, {run_dir / 'gaps.png'}")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
