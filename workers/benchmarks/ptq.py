"""Post-training quantization of a trained float model: plain min-max and percentile calibration
against TSPTQ and MPTQ (workers/engine/ptq.py), at 8, 6 and 4 bits, on the same model.

    python -m workers.benchmarks.ptq --preset digits --draws 3 --out /tmp/ptq-bench
    python -m workers.benchmarks.ptq --preset cpu-cifar10-vit --epochs 4 --draws 1 --calibration 256 \\
        --out /tmp/ptq-bench

The float model (build_model with weight_bits/act_bits None) is trained once and cached under
<out>/cache/, keyed by the preset's training settings. For each draw, --calibration training
images are drawn at random (seed = draw) and every method quantizes the same float model with
them; rows: each method at each bit width (weights and activations; first and last layer at 8),
and "mptq+mp", MPTQ with greedy mixed precision under a size budget of (1 + --size-slack) times
the uniform model's size (not at 8 bits: the ladder ends there).

Writes <out>/<preset>/ptq.md (the table), ptq.json and ptq.png (test accuracy against model size).
"""

import argparse
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from workers.engine import TrainConfig, load_dataset, train_model  # noqa: E402
from workers.engine.models import build_model  # noqa: E402
from workers.engine.ptq import METHODS, TOP_BITS, calibration_images, model_size_bytes, post_training_quantize  # noqa: E402
from workers.engine.training import accuracy  # noqa: E402

BITS = (8, 6, 4)
MIXED = "mptq+mp"


@dataclass
class Preset:
    architecture: str
    dataset: str
    train: TrainConfig
    data_options: dict = field(default_factory=dict)
    calibration: int = 128


PRESETS = {
    # The AdamW recipe of docs/bench/digits-vit.md, in full precision.
    "digits": Preset("digits-vit", "digits", TrainConfig(epochs=40, lr=3e-3, optimizer="adamw", weight_decay=0.05)),
    # vit-mini on a 10k-image CIFAR-10 subset (1000 per class) and 2000 test images: a CPU-sized run.
    "cpu-cifar10-vit": Preset("vit-mini", "cifar10", TrainConfig(epochs=4, lr=1e-3, optimizer="adamw",
                                                                 weight_decay=0.05, batch_size=128),
                              {"train_per_class": 1000, "test_per_class": 200}, calibration=256),
}


def float_model(preset: Preset, data, cache: Path, progress: bool) -> tuple[torch.nn.Module, float]:
    """The trained float model (from the cache when there), and its training time (s)."""
    kwargs = {"architecture": preset.architecture, "num_classes": data.num_classes,
              "in_channels": data.in_channels, "weight_bits": None, "act_bits": None}
    key = hashlib.sha256(json.dumps({"model": kwargs, "train": asdict(preset.train), "data": preset.dataset,
                                     "options": preset.data_options}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"float-{preset.architecture}-{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.train.seed)
        model = build_model(**kwargs)
    if path.exists():
        stored = torch.load(path, weights_only=True)
        model.load_state_dict(stored["state_dict"])
        return model.eval(), stored["seconds"]
    started = time.perf_counter()
    model = train_model(model, data.train, preset.train, progress=progress, desc="float")
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "seconds": seconds}, path)
    return model.eval(), seconds


def calibration_batches(train, count: int, draw: int, batch_size: int = 64) -> list[torch.Tensor]:
    return list(calibration_images(train.x, count, draw).split(batch_size))


def summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def run(args) -> dict:
    preset = PRESETS[args.preset]
    if args.epochs is not None:
        preset.train.epochs = args.epochs
    calibration = args.calibration or preset.calibration
    torch.set_num_threads(args.threads)
    data = load_dataset(preset.dataset, 0, **preset.data_options)
    model, train_seconds = float_model(preset, data, Path(args.out) / "cache", not args.no_progress)
    result = {"preset": args.preset, "architecture": preset.architecture, "dataset": preset.dataset,
              "train": asdict(preset.train), "data_options": preset.data_options, "calibration": calibration,
              "draws": args.draws, "size_slack": args.size_slack, "threads": args.threads,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "train_samples": len(data.train), "test_samples": len(data.test),
              "float": {"accuracy": accuracy(model, data.test), "size_bytes": model_size_bytes(model),
                        "train_seconds": train_seconds},
              "rows": []}
    jobs = [(bits, method) for bits in BITS for method in (*METHODS, MIXED) if method != MIXED or bits < TOP_BITS]
    bar = tqdm(total=len(jobs) * args.draws, disable=args.no_progress, desc="ptq")
    for bits, method in jobs:
        kwargs = {"architecture": preset.architecture, "num_classes": data.num_classes,
                  "in_channels": data.in_channels, "weight_bits": bits, "act_bits": bits}
        accuracies, seconds, sizes = [], [], []
        for draw in range(args.draws):
            batches = calibration_batches(data.train, calibration, draw)
            options = {}
            if method == MIXED:
                uniform = post_training_quantize(kwargs, model, batches[:1], "minmax")
                options["size_budget"] = int(model_size_bytes(uniform) * (1 + args.size_slack))
            started = time.perf_counter()
            quantized = post_training_quantize(kwargs, model, batches, "mptq" if method == MIXED else method, **options)
            seconds.append(time.perf_counter() - started)
            accuracies.append(accuracy(quantized, data.test))
            sizes.append(model_size_bytes(quantized))
            bar.update()
        result["rows"].append({"method": method, "bits": bits, "accuracy": summary(accuracies),
                               "size_bytes": max(sizes), "calibration_seconds": summary(seconds),
                               **({"size_budget": options["size_budget"]} if method == MIXED else {})})
    bar.close()
    return result


def markdown(result: dict) -> str:
    draws = result["draws"]
    lines = [f"| method | bits (W/A) | test accuracy (%), mean{' [min, max]' if draws > 1 else ''} | "
             f"size (KiB) | calibration time (s) |", "|---|---|---|---|---|"]
    fp = result["float"]
    lines.append(f"| float | 32 | {fp['accuracy']:.2f} | {fp['size_bytes'] / 1024:.1f} | - |")
    for row in result["rows"]:
        acc = row["accuracy"]
        spread = f" [{acc['min']:.2f}, {acc['max']:.2f}]" if draws > 1 else ""
        lines.append(f"| {row['method']} | {row['bits']} | {acc['mean']:.2f}{spread} | "
                     f"{row['size_bytes'] / 1024:.1f} | {row['calibration_seconds']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for method in (*METHODS, MIXED):
        rows = [row for row in result["rows"] if row["method"] == method]
        if not rows:
            continue
        sizes = [row["size_bytes"] / 1024 for row in rows]
        means = [row["accuracy"]["mean"] for row in rows]
        errors = [[m - row["accuracy"]["min"] for m, row in zip(means, rows)],
                  [row["accuracy"]["max"] - m for m, row in zip(means, rows)]]
        axes.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, label=method)
    axes.axhline(result["float"]["accuracy"], color="gray", linestyle="--",
                 label=f"float ({result['float']['size_bytes'] / 1024:.0f} KiB)")
    axes.set_xlabel("model size (KiB): weights at their bits, other tensors in fp32")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"PTQ of {result['architecture']} on {result['dataset']} (4, 6, 8 bits; "
                   f"{result['draws']} calibration draw{'s' if result['draws'] > 1 else ''})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--epochs", type=int, help="float training epochs (default: the preset's)")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws (seeds 0..draws-1)")
    parser.add_argument("--calibration", type=int, help="calibration images per draw (default: the preset's)")
    parser.add_argument("--size-slack", type=float, default=0.1,
                        help="mptq+mp's size budget: this fraction above the uniform model's size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - started
    directory = Path(args.out) / args.preset
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ptq.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (directory / "ptq.md").write_text(table)
    plot(result, directory / "ptq.png")
    print(table)
    print(f"wall time {result['wall_seconds']:.0f} s; written to {directory}")


if __name__ == "__main__":
    main()
