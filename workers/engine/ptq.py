"""Post-training quantization: set a quantized model's grids from a few calibration batches,
without training.

`calibrate` takes a model made by `quantize_model` (LSQ+ quantizers, any bit widths) whose
weights are trained, typically in full precision, and fixes every quantizer's step and offset:

- weights: per tensor or per output channel, the grid spans [-max|w|, max|w|] (symmetric, as the
  LSQ+ weight quantizer is);
- activations (layer inputs and both operands of each quantized matmul): the grid spans the range
  the observer reports for the values that reach the quantizer on the calibration batches, seen
  in full precision (every quantizer passes its input through unchanged while observing, so no
  quantizer's error shifts another's range):
  - "minmax": the smallest and largest value seen;
  - "percentile": the mean over batches of the low and high percentiles of each batch (clips the
    rare outliers that would otherwise stretch a coarse grid).

Calibration sees only the batches given: a caller that must not read personal data passes
synthetic ones.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from workers.engine.quantization import LsqPlusQuantizer

OBSERVERS = ("minmax", "percentile")
# torch.quantile refuses tensors over 2**24 values; a random subset this large estimates a
# percentile of a batch well enough.
PERCENTILE_SAMPLE = 1 << 20


def calibrated_quantizers(model: nn.Module) -> list[LsqPlusQuantizer]:
    quantizers = [m for m in model.modules() if isinstance(m, LsqPlusQuantizer)]
    others = [type(m).__name__ for m in model.modules()
              if type(m).__name__.endswith("Quantizer") and not isinstance(m, LsqPlusQuantizer)]
    if others:
        raise ValueError(f"post-training calibration supports the lsq+ quantizer only, found {sorted(set(others))}")
    if not quantizers:
        raise ValueError("model has no quantizer to calibrate: quantize it first (quantize_model)")
    return quantizers


class RangeObserver:
    """The running range of the values one quantizer receives."""

    def __init__(self, observer: str, percentile: float):
        self.observer, self.percentile = observer, percentile
        self.lows: list[float] = []
        self.highs: list[float] = []

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().flatten()
        if self.observer == "minmax":
            self.lows.append(float(flat.min()))
            self.highs.append(float(flat.max()))
        else:
            if flat.numel() > PERCENTILE_SAMPLE:
                generator = torch.Generator(device=flat.device).manual_seed(len(self.lows))
                flat = flat[torch.randint(flat.numel(), (PERCENTILE_SAMPLE,), device=flat.device,
                                          generator=generator)]
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=flat.device)
            low, high = torch.quantile(flat, q).tolist()
            self.lows.append(low)
            self.highs.append(high)
        return x

    def range(self) -> tuple[float, float]:
        if not self.lows:
            raise RuntimeError("an activation quantizer saw no input during calibration")
        if self.observer == "minmax":
            return min(self.lows), max(self.highs)
        return sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)


def pass_through(x: torch.Tensor) -> torch.Tensor:
    return x


def set_activation_grid(quantizer: LsqPlusQuantizer, low: float, high: float) -> None:
    """Grid of quantizer (q_min = 0) from low to high; the range always holds zero, so that a
    zero (padding, a ReLU's output) stays exactly zero."""
    low, high = min(low, 0.0), max(high, 0.0)
    quantizer.scale.fill_(max((high - low) / quantizer.q_max, 1e-8))
    quantizer.offset.fill_(low)


def set_weight_grid(quantizer: LsqPlusQuantizer, weight: torch.Tensor) -> None:
    flat = weight.detach().flatten(1) if quantizer.channels else weight.detach().flatten()[None]
    quantizer.scale.copy_((flat.abs().amax(dim=1) / quantizer.q_max).clamp(min=1e-8))


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], observer: str = "minmax",
              percentile: float = 99.99) -> nn.Module:
    """Fix every quantizer grid of model (in place) from the calibration batches (inputs only, no
    labels); returns model in eval mode. See the module docstring for the observers."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    quantizers = calibrated_quantizers(model)
    model.eval()
    for module in model.modules():
        weight_quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(weight_quantizer, LsqPlusQuantizer):
            set_weight_grid(weight_quantizer, module.weight)
    activations = {q: RangeObserver(observer, percentile) for q in quantizers if q.kind == "activation"}
    # Every quantizer passes its input through while observing. A plain function, not a module: a
    # Module assigned as `forward` would be registered as a child and leave forward() in place.
    for quantizer in quantizers:
        quantizer.forward = activations[quantizer].observe if quantizer in activations else pass_through
    try:
        seen = 0
        device = next(model.parameters()).device
        for batch in batches:
            model(batch.to(device))
            seen += 1
        if not seen:
            raise ValueError("calibration needs at least one batch")
    finally:
        for quantizer in quantizers:
            del quantizer.forward
    for quantizer, range_observer in activations.items():
        set_activation_grid(quantizer, *range_observer.range())
    for quantizer in quantizers:
        quantizer.initialized.fill_(True)
        quantizer._ready = False
    return model
