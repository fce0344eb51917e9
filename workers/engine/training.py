"""Quantization-aware training and inference helpers."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split


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


def compiled_forward(model: nn.Module) -> nn.Module:
    """The model's forward pass through torch.compile, sharing the model's parameters and mode.

    The model itself is left as it is: it is what gets returned, copied and saved (a compiled
    wrapper's state dict names every tensor "_orig_mod.*"). The first steps compile (tens of
    seconds on a small CPU, less from the inductor's on-disk cache), later ones run fused kernels.
    An option of the engine and its benchmark (epoch_floor --compile), not of the worker: on the
    CPU the compiling costs more than a run saves (docs/performance.md); on a GPU, to be measured.
    Needs a C++ compiler (CPU) or Triton with a C compiler (CUDA) where it runs."""
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
) -> nn.Module:
    """SGD with momentum, cosine learning-rate decay and gradient clipping on cross-entropy, with
    the split's train-time augmentation; returns model. compile_model: through compiled_forward;
    bf16: under bf16_autocast."""
    model.to(device).train()
    forward = compiled_forward(model) if compile_model else model
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = -(-len(data) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        for index in shuffled_batches(len(data), config.batch_size, generator):
            x, y = data.training_batch(index, generator, device)
            with bf16_autocast(device, bf16):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


@torch.no_grad()
def predict_probs(
    model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 512
) -> torch.Tensor:
    """Softmax outputs in eval mode, on the CPU; the model's train/eval mode is restored."""
    was_training = model.training
    model.to(device).eval()
    probs = [F.softmax(model(chunk.to(device)), dim=1).cpu() for chunk in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(probs) if probs else torch.empty(0)


def accuracy(model: nn.Module, split: Split, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent."""
    if len(split) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    probs = predict_probs(model, split.x, device)
    return 100.0 * (probs.argmax(dim=1) == split.y).float().mean().item()
