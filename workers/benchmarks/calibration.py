"""Post-training calibration without personal data: real images against synthetic ones.

    python -m workers.benchmarks.calibration --dataset cifar10 --out /work/bench-dfq
    python -m workers.benchmarks.calibration --dataset digits --out /work/bench-dfq

For each model of the preset (cifar10: cifar-cnn and vit-mini; digits: digits-cnn and digits-vit) it
trains the float model (or loads it from <out>/models/), then for each calibration source x bit
width (W = A, first and last layers included) x observer: copies the float weights into a
quantized model, calibrates it (ptq.calibrate) on --count images of the source, and measures
test accuracy. Sources: "real" (training images: the upper bound), "noise" (Gaussian: the lower
bound), and each synthetic method that fits the model (synthetic.py): zeroq and qimera for the
CNNs, dfq-vit for the transformers, plus "zeroq, no clamp" on the CNNs (the pixel clamp's
ablation). For the transformers every source is run again with activation corrections fitted on
its own calibration images ("+ corr"). The time of a row is synthesis + calibration (+ fitting).

With --recalibrate the "+ corr" rows calibrate once more after fitting the corrections, so that
the grids after each corrected layer see corrected activations (DFQ-ViT applies its correction
during calibration too).

Writes <out>/<dataset>[-<models>][-recalibrate]/calibration.md (the table), calibration.json and calibration.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from workers.engine.data import load_dataset
from workers.engine.models import VISION_TRANSFORMERS, build_model
from workers.engine.ptq import calibrate, calibration_images
from workers.engine.synthetic import fit_activation_corrections, synthesize
from workers.engine.training import TrainConfig, accuracy, train_model

# Sized for a shared 2-core CPU (cifar-cnn: about 40 s per epoch of 10k images there; vit-mini:
# about 80 s per epoch of 5k): small float models, a 1,000-image test subset.
PRESETS = {
    "cifar10": {
        "models": {
            "cifar-cnn": TrainConfig(epochs=5, lr=0.05, batch_size=128),
            "vit-mini": TrainConfig(epochs=4, lr=2e-3, weight_decay=0.05, batch_size=64, optimizer="adamw"),
        },
        "train_images": {"vit-mini": 5000},  # a random subset: the ViT costs 8 times the CNN per image
        "data": {"train_per_class": 1000, "test_per_class": 100},
    },
    "digits": {
        "models": {
            "digits-cnn": TrainConfig(epochs=10, lr=0.05),
            "digits-vit": TrainConfig(epochs=20, lr=1e-3, weight_decay=0.05, batch_size=32, optimizer="adamw"),
        },
        "data": {},
    },
}


def float_model(architecture: str, config: TrainConfig, data, dataset: str, data_options: dict, out: Path,
                progress: bool) -> tuple[torch.nn.Module, float]:
    """The trained float model, from <out>/models/ when a run with the same recipe stored it."""
    limit = PRESETS[dataset].get("train_images", {}).get(architecture)
    train = data.train
    if limit is not None and limit < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:limit])
    key = hashlib.sha256(json.dumps([architecture, dataset, data_options, limit, asdict(config)], sort_keys=True)
                         .encode()).hexdigest()[:12]
    path = out / "models" / f"{dataset}-{architecture}-{key}.pt"
    torch.manual_seed(config.seed)
    model = build_model(architecture, data.num_classes, data.in_channels, None, None)
    started = time.perf_counter()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        train_model(model, train, config, progress=progress, desc=f"train {architecture}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), time.perf_counter() - started


def sources_for(architecture: str) -> list[str]:
    if architecture in VISION_TRANSFORMERS:
        return ["real", "noise", "dfq-vit"]
    return ["real", "noise", "zeroq", "zeroq, no clamp", "qimera"]


def source_images(source: str, model, data, args, pixel_range) -> torch.Tensor:
    if source == "real":
        return calibration_images(data.train.x, args.count, args.seed)
    method, _, ablation = source.partition(", ")
    return synthesize(model, method, args.count, tuple(data.train.x.shape[1:]), data.num_classes, seed=args.seed,
                      steps=args.steps, batch_size=args.batch_size,
                      pixel_range=None if ablation == "no clamp" else pixel_range, progress=args.progress)


def run_model(architecture: str, config: TrainConfig, data, args, out: Path, pixel_range) -> list[dict]:
    model, train_s = float_model(architecture, config, data, args.dataset, PRESETS[args.dataset]["data"], out,
                                 args.progress)
    test = data.test
    rows = [{"model": architecture, "source": "float", "bits": None, "observer": None, "corrected": False,
             "accuracy": accuracy(model, test), "seconds": 0.0, "train_seconds": train_s}]
    with_corrections = [False, True] if architecture in VISION_TRANSFORMERS and not args.no_corrections else [False]
    sources = sources_for(architecture)
    bar = tqdm(total=len(sources) * len(args.bits) * len(args.observers) * len(with_corrections),
               desc=architecture, disable=not args.progress)
    for source in sources:
        started = time.perf_counter()
        images = source_images(source, model, data, args, pixel_range)
        synthesis_s = time.perf_counter() - started if source != "real" else 0.0
        batches = images.split(args.batch_size)
        for bits in args.bits:
            for observer in args.observers:
                for corrected in with_corrections:
                    quantized = build_model(architecture, data.num_classes, data.in_channels, bits, bits,
                                            first_last_bits=bits)
                    quantized.load_state_dict(model.state_dict(), strict=False)
                    started = time.perf_counter()
                    calibrate(quantized, batches, observer=observer)
                    if corrected:
                        fit_activation_corrections(quantized, model, batches, ridge=args.ridge)
                        if args.recalibrate:  # the grids then see the corrected activations
                            calibrate(quantized, batches, observer=observer)
                    calibration_s = time.perf_counter() - started
                    rows.append({"model": architecture, "source": source, "bits": bits, "observer": observer,
                                 "corrected": corrected, "accuracy": accuracy(quantized, test),
                                 "seconds": synthesis_s + calibration_s, "synthesis_seconds": synthesis_s,
                                 "calibration_seconds": calibration_s,
                                 "pixel_min": float(images.min()), "pixel_max": float(images.max())})
                    bar.update()
    bar.close()
    return rows


def row_name(row: dict) -> str:
    return row["source"] + (" + corr" if row["corrected"] else "")


def markdown(rows: list[dict], args) -> str:
    lines = []
    for architecture in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == architecture]
        fp = next(r for r in mine if r["source"] == "float")
        lines += [f"### {architecture}: float {fp['accuracy']:.1f}% (trained in {fp['train_seconds']:.0f} s)", ""]
        columns = [(bits, observer) for bits in args.bits for observer in args.observers]
        header = " | ".join(f"W{b}A{b} {o}" for b, o in columns)
        lines += [f"| source | {header} | time s | pixel range |", "|---" * (len(columns) + 3) + "|"]
        for name in dict.fromkeys(row_name(r) for r in mine if r["source"] != "float"):
            cells = {(r["bits"], r["observer"]): r for r in mine if row_name(r) == name}
            accuracies = " | ".join(f"{cells[c]['accuracy']:.1f}" for c in columns)
            seconds = [cells[c]["seconds"] for c in columns]
            first = cells[columns[0]]
            lines.append(f"| {name} | {accuracies} | {min(seconds):.2f}-{max(seconds):.2f} | "
                         f"[{first['pixel_min']:.1f}, {first['pixel_max']:.1f}] |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    observer = args.observers[0]
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axis, architecture in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == architecture]
        fp = next(r for r in mine if r["source"] == "float")
        axis.axhline(fp["accuracy"], color="black", linestyle=":", label="float")
        for name in dict.fromkeys(row_name(r) for r in mine if r["source"] != "float"):
            points = sorted((r["bits"], r["accuracy"]) for r in mine if row_name(r) == name
                            and r["observer"] == observer)
            axis.plot(*zip(*points), marker="o", label=name)
        axis.set(title=f"{architecture} ({observer})", xlabel="bits (W = A)", ylabel="test accuracy %",
                 xticks=args.bits)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m workers.benchmarks.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="cifar10")
    parser.add_argument("--models", nargs="+", help="a subset of the preset's models")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--observers", nargs="+", choices=["percentile", "minmax"], default=["percentile", "minmax"])
    parser.add_argument("--count", type=int, default=128, help="calibration images")
    parser.add_argument("--steps", type=int, default=200, help="synthesis steps per batch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ridge", type=float, default=1.0, help="activation corrections' ridge")
    parser.add_argument("--no-corrections", action="store_true", help="skip the '+ corr' rows")
    parser.add_argument("--recalibrate", action="store_true",
                        help="calibrate again once the corrections are in (DFQ-ViT uses them during calibration)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.dataset]
    models = {name: config for name, config in preset["models"].items() if not args.models or name in args.models}
    out = Path(args.out)
    data = load_dataset(args.dataset, seed=args.seed, **preset["data"])
    pixel_range = data.train.pixel_range
    started = time.perf_counter()
    rows = [row for name, config in models.items()
            for row in run_model(name, config, data, args, out, pixel_range)]
    run_dir = out / "-".join([args.dataset, *(args.models or []), *(["recalibrate"] if args.recalibrate else [])])
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m workers.benchmarks.calibration " + " ".join(argv)
    table = markdown(rows, args)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    header = (f"{command}\n\n{machine}; {len(data.test)} test images, {args.count} calibration images, "
              f"{args.steps} synthesis steps; total {time.perf_counter() - started:.0f} s\n\n")
    (run_dir / "calibration.md").write_text(header + table)
    (run_dir / "calibration.json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                          "rows": rows}, indent=1))
    plot(rows, args, run_dir / "calibration.png")
    print(header + table)
    print(f"wrote {run_dir / 'calibration.md'}, {run_dir / 'calibration.json'}, {run_dir / 'calibration.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
