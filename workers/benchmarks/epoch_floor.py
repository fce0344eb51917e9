"""Where an unlearning run's time goes: Q-MUL against Retrain, and each epoch against the data floor.

For each configuration: the data-loading floor (an epoch of reading the same tensors, with the
same augmentation, onto the same device, and no model), a Retrain (the recipe from scratch on the
retain set), then Q-MUL from the model that Retrain produced (run time does not depend on which
trained model it starts from), once with the gradient norms of Adaptive Gradient Reweighting
estimated over the whole sets every epoch and once over a sample of mini-batches. With --profile,
torch.profiler's top operators over one Q-MUL epoch follow the table.

    python -m workers.benchmarks.epoch_floor [--configs digits cifar-subset] [--profile]
    python -m workers.benchmarks.epoch_floor --configs resnet18-cifar10 --device cuda   # on a GPU

Times are wall-clock seconds (CUDA synchronised); one torch thread by default, as on the shared CPU.
"""

import argparse
import json
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from workers.engine.data import Split, load_dataset, random_forget_split
from workers.engine.recipes import ModelSpec
from workers.engine.training import TrainConfig, accuracy, shuffled_batches, train_model
from workers.engine.unlearning import QMulConfig, qmul_unlearn


@dataclass(frozen=True)
class Setup:
    dataset: str
    data_options: dict
    architecture: str
    retrain: TrainConfig
    qmul: QMulConfig
    agr_sample_batches: int  # the mini-batches the sampled gradient-norm estimate uses


SETUPS = {
    # The embedded default: the service's digits model and its recipe, Q-MUL as the worker runs it.
    "digits": Setup("digits", {}, "digits-cnn", TrainConfig(), QMulConfig(epochs=10), 8),
    # The cpu-cifar10 benchmark preset (workers/benchmarks/bench.py): 250 images per class, small CNN.
    "cifar-subset": Setup("cifar10", {"train_per_class": 250, "test_per_class": 100}, "cifar-cnn",
                          TrainConfig(epochs=15, lr=0.05), QMulConfig(epochs=5), 8),
    # The GPU target: ResNet-18, LSQ+ W4A4, full CIFAR-10, retrain 160 epochs, Q-MUL 10,
    # batch 256 (the gpu-paper preset). Hours on a CPU: use --device cuda.
    "resnet18-cifar10": Setup("cifar10", {}, "resnet18", TrainConfig(epochs=160, lr=0.1, batch_size=256),
                              QMulConfig(epochs=10, batch_size=256), 20),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_epoch_seconds(split: Split, batch_size: int, device: str, epochs: int = 3) -> float:
    """Seconds per epoch of only reading the split's mini-batches (augmented) onto the device."""
    generator = torch.Generator().manual_seed(0)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(epochs):
        for index in shuffled_batches(len(split), batch_size, generator):
            split.training_batch(index, generator, device)
    synchronize(device)
    return (time.perf_counter() - started) / epochs


def timed(device: str, work) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


@dataclass(frozen=True)
class Levers:
    """The speed levers a run can switch, each against the engine's default."""

    contiguous: bool = False  # the standard NCHW layout instead of the engine's channels-last
    compile_model: bool = False  # torch.compile (training.compiled_forward)
    bf16: bool = False  # bfloat16 autocast around the quantizers (training.bf16_autocast)

    def label(self) -> str:
        return "".join(f" {name}" for name, on in (("NCHW", self.contiguous), ("compiled", self.compile_model),
                                                    ("bf16", self.bf16)) if on)


def run_setup(name: str, setup: Setup, device: str, retrain_epochs: int | None, qmul_epochs: int | None,
              profile: bool, levers: Levers = Levers()) -> dict:
    spec = ModelSpec(architecture=setup.architecture, dataset=setup.dataset, data_options=setup.data_options,
                     train=replace(setup.retrain, epochs=retrain_epochs or setup.retrain.epochs))
    data = load_dataset(setup.dataset, 0, **setup.data_options)
    forget_index, retain_index = random_forget_split(len(data.train), 0.1, 0)
    # Images on the device, augmented there; labels stay on the CPU (as the benchmark does).
    train = Split(data.train.x.to(device), data.train.y, data.train.augment)
    forget, retain = train.subset(forget_index), train.subset(retain_index)
    qmul_config = replace(setup.qmul, epochs=qmul_epochs or setup.qmul.epochs)
    run_options = {"compile_model": levers.compile_model, "bf16": levers.bf16}

    floor_retain = floor_epoch_seconds(retain, spec.train.batch_size, device)
    floor_all = floor_epoch_seconds(train, qmul_config.batch_size, device)  # a Q-MUL epoch reads both sets
    fresh = spec.build()
    if levers.contiguous:  # build_model's channels-last back to NCHW; Q-MUL's copy of the model keeps it
        fresh = fresh.to(memory_format=torch.contiguous_format)
    # With compile_model, Retrain's time includes compiling the training graph, and the full-AGR
    # Q-MUL run's includes compiling Q-MUL's (eval-mode gradients, mixed batch sizes): the sampled
    # run after it is the warm figure.
    retrain_s, model = timed(device, lambda: train_model(fresh, retain, spec.train, device, progress=True,
                                                         desc=f"{name} retrain", **run_options))
    rows = {"config": name + levers.label(), "device": device, "forget": len(forget), "retain": len(retain),
            "floor_retain_epoch_s": floor_retain, "floor_train_epoch_s": floor_all,
            "retrain_epochs": spec.train.epochs, "retrain_s": retrain_s,
            "retrain_ta": accuracy(model, data.test, device), "qmul_epochs": qmul_config.epochs}
    for label, batches in (("qmul_agr_full", None), ("qmul_agr_sampled", setup.agr_sample_batches)):
        config = replace(qmul_config, grad_norm_batches=batches)
        rows[f"{label}_s"], result = timed(device, lambda config=config: qmul_unlearn(
            model, forget, retain, config, device, progress=True, **run_options))
    # The sampled run's model: what its accuracy costs (or not) against the same levers' Retrain.
    rows["qmul_ta"], rows["qmul_fa"] = accuracy(result.model, data.test, device), accuracy(result.model, forget, device)
    if profile:
        rows["profile"] = profile_qmul_epoch(model, forget, retain, replace(qmul_config, epochs=1), device)
    return rows


def profile_qmul_epoch(model, forget: Split, retain: Split, config: QMulConfig, device: str) -> str:
    """torch.profiler's operators by self time over one Q-MUL epoch (full gradient-norm estimate)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        qmul_unlearn(model, forget, retain, config, device, progress=False)
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=40)


def table(rows: list[dict]) -> str:
    header = (f"{'config':<22}{'forget/retain':>14}{'floor s/ep':>11}{'retrain s/ep':>13}{'retrain s':>10}"
              f"{'Q floor s/ep':>13}{'Q-MUL s/ep':>11}{'Q-MUL s':>9}{'sampled AGR':>12}{'  s/ep':>7}"
              f"{'Q-MUL/Retrain':>14}{'TA retrain':>11}{'TA Q-MUL':>9}")
    lines = [header]
    for row in rows:
        retrain_epoch = row["retrain_s"] / row["retrain_epochs"]
        qmul_epoch = row["qmul_agr_full_s"] / row["qmul_epochs"]
        sampled_epoch = row["qmul_agr_sampled_s"] / row["qmul_epochs"]
        lines.append(
            f"{row['config']:<22}{row['forget']:>7}/{row['retain']:<6}{row['floor_retain_epoch_s']:>11.3f}"
            f"{retrain_epoch:>13.3f}{row['retrain_s']:>10.1f}{row['floor_train_epoch_s']:>13.3f}{qmul_epoch:>11.3f}{row['qmul_agr_full_s']:>9.1f}"
            f"{row['qmul_agr_sampled_s']:>12.1f}{sampled_epoch:>7.3f}"
            f"{row['qmul_agr_sampled_s'] / row['retrain_s']:>14.3f}"
            f"{row['retrain_ta']:>11.2f}{row['qmul_ta']:>9.2f}")
    lines += [
        "floor s/ep: one epoch over the retain set of reading and augmenting its batches on the device, no model",
        "(Q floor: over forget + retain, what a Q-MUL epoch reads);",
        "retrain: the recipe's epochs from scratch on the retain set; Q-MUL: its epochs from the retrained model,",
        "AGR gradient norms over the whole sets each epoch, or over a sample of mini-batches ('sampled AGR', the",
        "benchmark presets' setting); Q-MUL/Retrain uses the sampled run. Q-MUL epochs read forget + retain.",
        "TA: test accuracy (%) of the Retrain model and of the sampled run's Q-MUL model.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=["digits", "cifar-subset"])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="override the recipe's (a shorter run)")
    parser.add_argument("--qmul-epochs", type=int, default=None, help="override the configuration's")
    parser.add_argument("--profile", action="store_true", help="also profile one Q-MUL epoch (torch.profiler)")
    parser.add_argument("--contiguous", action="store_true",
                        help="models in the standard NCHW layout, not the engine's channels-last (for comparison)")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile (the first run of each kind includes compiling)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for convolutions and products, the quantizers in float32")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    rows = []
    for name in tqdm(args.configs, desc="configs"):
        levers = Levers(contiguous=args.contiguous, compile_model=args.compile, bf16=args.bf16)
        rows.append(run_setup(name, SETUPS[name], args.device, args.retrain_epochs, args.qmul_epochs, args.profile,
                              levers))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
    print()
    print(table(rows))
    for row in rows:
        if "profile" in row:
            print(f"\nQ-MUL, one epoch, {row['config']} on {row['device']}: operators by self time\n{row['profile']}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
