"""Quantization-aware training and inference helpers."""

import getpass
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split
from .quantization import QuantConv2d, QuantLinear


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    # From-scratch 4-bit QAT at this lr can overshoot an LSQ step size early on, round a whole
    # layer's weights to zero and never recover; clipping the global gradient norm prevents it.
    grad_clip: float | None = 1.0
    # "sgd" (with momentum) or "adamw" (momentum is then unused; Adam's default betas). SGD suits
    # the CNNs; the transformers barely learn with it from scratch on small data (digits-vit:
    # train accuracy 25% after 15 epochs at lr 0.05, full precision or 4-bit), as is known for
    # ViTs, which are trained with AdamW (DeiT: lr 5e-4 per 512 images, weight decay 0.05).
    optimizer: str = "sgd"


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: {OPTIMIZERS}")


def compiled_forward(model: nn.Module) -> nn.Module:
    """The model's forward pass through torch.compile, sharing the model's parameters and mode.

    The model itself is left as it is: it is what gets returned, copied and saved (a compiled
    wrapper's state dict names every tensor "_orig_mod.*"). The first steps compile (tens of
    seconds on a small CPU, less from the inductor's on-disk cache), later ones run fused kernels.
    An option of the engine and its benchmark (epoch_floor --compile), not of the worker: on the
    CPU the compiling costs more than a run saves (docs/performance.md); on a GPU, to be measured.
    Needs a C++ compiler (CPU) or Triton with a C compiler (CUDA) where it runs."""
    # The inductor's on-disk cache is not keyed by the CPU capability: code compiled for AVX-512 and
    # reused where ATEN_CPU_CAPABILITY asks for AVX2 gives NaN. One cache subfolder per capability.
    capability = torch.backends.cpu.get_cpu_capability().lower()
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                 or Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
    if cache.name != capability:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / capability)
    return torch.compile(model)


def bf16_autocast(device: str | torch.device, enabled: bool):
    """bfloat16 autocast for the layers' convolutions and matrix products; the fake quantizers
    keep computing in float32 (quantization.quantized_operands), the loss is taken in float32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of one shuffled pass over n samples."""
    return torch.randperm(n, generator=generator).split(batch_size)


def train_model(
    model: nn.Module,
    data: Split,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
    compile_model: bool = False,
    bf16: bool = False,
    checkpoint: Path | None = None,
    checkpoint_every_s: float = 60.0,
    teacher: nn.Module | None = None,
    clc_weight: float = 1.0,
) -> nn.Module:
    """SGD with momentum (or AdamW: config.optimizer), cosine learning-rate decay and gradient clipping on cross-entropy, with
    the split's train-time augmentation; returns model. compile_model: through compiled_forward;
    bf16: under bf16_autocast.

    checkpoint: a file the run saves its whole state to after an epoch, at most every
    checkpoint_every_s seconds, and resumes from when it exists: a run cut short (a machine that
    gives each command ten minutes, a worker that dies) continues to the same result as an uncut
    one. Removed once the run is done; checkpoint_seconds() tells how long the saved part took.

    teacher: a full-precision model of the same architecture (a float checkpoint, or a quantized
    model run under quantization.quantization_off by the caller): the loss adds
    clc_weight * LayerCorrection's loss against it (Cascaded Layer Correction). None: off."""
    model.to(device).train()
    correction = None
    if teacher is not None and clc_weight > 0:
        correction = LayerCorrection(model, teacher.to(device).eval())
    forward = compiled_forward(model) if compile_model else model
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = -(-len(data) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    first_epoch, seconds_before = 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first_epoch, seconds_before = state["epoch"], state["seconds"]
    started = last_saved = time.perf_counter()
    bar = tqdm(range(first_epoch, config.epochs), desc=desc, disable=not progress, leave=False,
               initial=first_epoch, total=config.epochs)
    for epoch in bar:
        for index in shuffled_batches(len(data), config.batch_size, generator):
            x, y = data.training_batch(index, generator, device)
            with bf16_autocast(device, bf16):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
            if correction is not None:
                loss = loss + clc_weight * correction.loss(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        now = time.perf_counter()
        if checkpoint is not None and epoch + 1 < config.epochs and now - last_saved >= checkpoint_every_s:
            save_atomically({"epoch": epoch + 1, "seconds": seconds_before + now - started,
                              "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "schedule": schedule.state_dict(), "generator": generator.get_state()},
                             Path(checkpoint))
            last_saved = now
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    if correction is not None:
        correction.remove()
    return model


class LayerCorrection:
    """Cascaded Layer Correction (after QuaRC, arXiv 2507.17768; the loss is ours, its exact form
    was not available): the outputs of the student's quantized layers (QuantConv2d, QuantLinear,
    in module order) are captured during its forward pass; loss(x) runs the teacher on the same
    batch and returns

        mean over layers l of  ||o_l^student - o_l^teacher||^2 / ||o_l^teacher||^2

    Cascaded: each student output is taken on the student's own path through the earlier layers,
    so the term at layer l corrects the error accumulated up to l, not that layer's alone. The
    normalisation makes layers of any scale weigh alike. The teacher's layers are found by the
    same module names (a float model's Conv2d/Linear where the student has Quant* layers)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        self.names = [n for n, m in student.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        if not self.names:
            raise ValueError("the student has no quantized layer to correct")
        self.teacher = teacher
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            self.handles.append(student.get_submodule(name).register_forward_hook(self._keep(self.student_out, name)))
            self.handles.append(teacher.get_submodule(name).register_forward_hook(self._keep(self.teacher_out, name)))

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(module, inputs, output):
            store[name] = output
        return hook

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The correction loss of the batch the student has just run forward on."""
        with torch.no_grad():
            self.teacher(x)
        terms = [(self.student_out[n].float() - self.teacher_out[n].float()).pow(2).sum()
                 / self.teacher_out[n].float().pow(2).sum().clamp_min(1e-12) for n in self.names]
        self.student_out.clear()
        self.teacher_out.clear()
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def checkpoint_seconds(checkpoint: Path) -> float:
    """Training seconds the run saved in `checkpoint` had taken (0 without one): what a resumed
    run adds to its own time."""
    if not Path(checkpoint).exists():
        return 0.0
    return float(torch.load(checkpoint, map_location="cpu", weights_only=True)["seconds"])


def save_atomically(state, path: Path) -> None:
    """torch.save through a temporary file and a rename: a process killed while saving leaves the
    previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, temp)
    os.replace(temp, path)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 512
) -> torch.Tensor:
    """Logits in eval mode, on the CPU; the model's train/eval mode is restored."""
    was_training = model.training
    model.to(device).eval()
    logits = [model(chunk.to(device)).cpu() for chunk in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(logits) if logits else torch.empty(0)


def predict_probs(
    model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 512
) -> torch.Tensor:
    """Softmax outputs in eval mode, on the CPU; the model's train/eval mode is restored."""
    return F.softmax(predict_logits(model, x, device, batch_size), dim=1)


def accuracy(model: nn.Module, split: Split, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent."""
    if len(split) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    probs = predict_probs(model, split.x, device)
    return 100.0 * (probs.argmax(dim=1) == split.y).float().mean().item()
