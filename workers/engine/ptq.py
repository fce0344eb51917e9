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
    rare outliers that would otherwise stretch a coarse grid);
  a two-region quantizer (TSPTQ below) fits its two grids to a sample of the values it saw.

`post_training_quantize(model_kwargs, float_model, batches, method, **options)` goes from a
trained float model to a calibrated quantized one with one of METHODS:

- "minmax", "percentile": the float weights loaded as they are, then `calibrate` with that observer.
- "tsptq" (after TSPTQ-ViT, Tai et al. 2023: two scaling factors where one grid fits badly):
  - value-aware: the post-softmax operand of attention-times-values and the post-GELU input of
    the second MLP layer get a `TwoRegionQuantizer` (quantization.py): one bit picks a fine or a
    coarse grid, the coarse step a power of two times the fine one, the ratio the one with the
    least squared error on the calibration values. Those values are dense near zero with a
    long tail, which one uniform grid covers either coarsely or clipped.
  - outlier-aware: a LayerNorm output channel whose range (max - min) exceeds
    `outlier_threshold` (default 2) times the median channel range is divided by 2^k and the
    following linear layer's input column multiplied by 2^k, both folded into the weights (the
    LayerNorm's affine parameters and the linear weight), k the smallest power that brings every
    outlier within the widest normal channel's range. One k per LayerNorm: two scales, the
    normal channels' and the outliers'. Powers of two keep the float function exact and are a
    shift in an integer kernel. The per-tensor input grid then spans the normal channels.
  - the other quantizers: `calibrate` with `observer` (default "minmax").
- "mptq" (after MPTQ-ViT, Tai et al. 2024):
  - SmoothQuant with a bias on each LayerNorm -> linear pair: the input channel j is shifted by
    its calibration midpoint z_j and divided by s_j = max|X_j - z_j|^alpha / max|W_:,j|^(1-alpha);
    folded as LayerNorm gamma / s, (beta - z) / s, linear W * s, b + W z, so the float function is
    unchanged and the quantizer sees centred, balanced channels. alpha is searched per layer
    among `alphas` (default 0.2 to 0.8) and "no smoothing", by the error of the layer's output
    with its input and weight min-max quantized at the layer's bits, on the calibration batches.
  - `calibrate` with `observer` (default "minmax").
  - with `size_budget` (bytes, `model_size_bytes`): greedy per-layer weight bits. Each layer's
    sensitivity is the logit error (relative MSE to the float model on the calibration batches)
    with only that layer raised by one step on the ladder (bits + 2, ..., 8), measured once;
    then, while an upgrade fits the budget, the one with the largest error drop per added byte
    is tried, and kept only if the whole model's error drops (one layer's gains need not add up
    with another's; a rejected layer is not tried again). Activations keep their bits.
  On a CNN only the generic parts apply (no LayerNorm, softmax or GELU): "tsptq" is "minmax" and
  "mptq" is "minmax" with mixed precision.

Structure beyond what build_model rebuilds (two-region quantizers, per-layer weight bits) is
`ptq_layout(model)`: save_artifact stores it in the spec and load_artifact applies it
(`apply_layout`) before loading the state dict. Folded scales and shifts are plain weights.

Calibration sees only the batches given: a caller that must not read personal data passes
synthetic ones.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.engine.models import Attention, TransformerBlock, VisionTransformer, build_model
from workers.engine.quantization import (
    FakeQuantizer,
    LsqPlusQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    TwoRegionQuantizer,
)

OBSERVERS = ("minmax", "percentile")
# torch.quantile refuses tensors over 2**24 values; a random subset this large estimates a
# percentile of a batch well enough.
PERCENTILE_SAMPLE = 1 << 20
# Values per batch a two-region quantizer keeps to fit its grids on.
TWO_REGION_SAMPLE = 1 << 16
METHODS = ("minmax", "percentile", "tsptq", "mptq")
METHOD_OPTIONS = {
    "minmax": set(),
    "percentile": {"percentile"},
    "tsptq": {"observer", "percentile", "outlier_threshold"},
    "mptq": {"observer", "percentile", "alphas", "size_budget"},
}
DEFAULT_ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8)
TOP_BITS = 8  # mixed precision raises weights up to this width


def calibration_images(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """count of images (N x C x H x W) drawn at random without replacement, the same for the same
    seed: real calibration inputs, as they are (no augmentation)."""
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]


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

    def __init__(self, observer: str, percentile: float, keep_sample: bool = False):
        self.observer, self.percentile = observer, percentile
        self.lows: list[float] = []
        self.highs: list[float] = []
        self.kept: list[torch.Tensor] | None = [] if keep_sample else None

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().flatten()
        if self.kept is not None:
            generator = torch.Generator(device=flat.device).manual_seed(len(self.kept))
            count = min(flat.numel(), TWO_REGION_SAMPLE)
            self.kept.append(flat[torch.randperm(flat.numel(), device=flat.device, generator=generator)[:count]])
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
    activations = {q: RangeObserver(observer, percentile, keep_sample=isinstance(q, TwoRegionQuantizer))
                   for q in quantizers if q.kind == "activation"}
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
        if isinstance(quantizer, TwoRegionQuantizer):
            quantizer.fit(torch.cat(range_observer.kept), *range_observer.range())
        else:
            set_activation_grid(quantizer, *range_observer.range())
    for quantizer in quantizers:
        quantizer.initialized.fill_(True)
        quantizer._ready = False
    return model


# Sizes ---------------------------------------------------------------------------------------


def quantized_weight_bits(model: nn.Module) -> dict[str, int]:
    """{state-dict name of a weight: its bits} for every layer whose weight is quantized."""
    return {f"{name}.weight": module.weight_quantizer.bits for name, module in model.named_modules()
            if isinstance(module, (QuantConv2d, QuantLinear)) and isinstance(module.weight_quantizer, FakeQuantizer)}


def model_size_bytes(model: nn.Module) -> int:
    """What the model takes deployed: quantized weights at their bit widths (ceil(n b / 8) bytes
    per layer), every other floating-point tensor of the state dict (float weights, biases,
    norms, embeddings, the quantizers' steps and offsets) at its own width. Integer bookkeeping
    (initialised flags, counters, two-region ratios) is not counted."""
    bits = quantized_weight_bits(model)
    total = 0
    for key, tensor in model.state_dict().items():
        if key in bits:
            total += math.ceil(tensor.numel() * bits[key] / 8)
        elif tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
    return total


# Layout: what a plain build_model does not rebuild -------------------------------------------


def set_weight_bits(layer: QuantConv2d | QuantLinear, bits: int) -> None:
    """Give layer a fresh LSQ+ weight quantizer at bits, its grid spanning max|w| (as calibrate
    sets it). Marked, so that ptq_layout records the width."""
    old = layer.weight_quantizer
    quantizer = LsqPlusQuantizer(bits, "weight", old.channels).to(layer.weight.device)
    with torch.no_grad():
        set_weight_grid(quantizer, layer.weight)
    quantizer.initialized.fill_(True)
    quantizer.per_layer_bits = True
    layer.weight_quantizer = quantizer


def ptq_layout(model: nn.Module) -> dict:
    """{"two_region": [quantizer names], "weight_bits": {layer name: bits}}, only the entries that
    are not empty; {} for a model build_model rebuilds as it is."""
    two_region = sorted(name for name, module in model.named_modules() if isinstance(module, TwoRegionQuantizer))
    weight_bits = {name: module.weight_quantizer.bits for name, module in model.named_modules()
                   if getattr(getattr(module, "weight_quantizer", None), "per_layer_bits", False)}
    layout = {}
    if two_region:
        layout["two_region"] = two_region
    if weight_bits:
        layout["weight_bits"] = weight_bits
    return layout


def apply_layout(model: nn.Module, layout: dict) -> nn.Module:
    """Give model (as build_model made it) the structure layout describes, in place, so that the
    state dict of the model layout was taken from loads into it."""
    unknown = set(layout) - {"two_region", "weight_bits"}
    if unknown:
        raise ValueError(f"unknown post-training layout entries {sorted(unknown)}")
    for name in layout.get("two_region", []):
        old = model.get_submodule(name)
        if not (isinstance(old, LsqPlusQuantizer) and old.kind == "activation"):
            raise ValueError(f"{name} is not an LSQ+ activation quantizer: cannot make it two-region")
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, TwoRegionQuantizer(old.bits).to(old.scale.device))
    for name, bits in layout.get("weight_bits", {}).items():
        layer = model.get_submodule(name)
        if not isinstance(getattr(layer, "weight_quantizer", None), LsqPlusQuantizer):
            raise ValueError(f"{name} has no LSQ+ weight quantizer: cannot set its bits")
        set_weight_bits(layer, bits)
    return model


def two_region_targets(model: nn.Module) -> list[str]:
    """The quantizers of the post-softmax and post-GELU values in a ViT: the attention operand of
    attention-times-values and the input of each MLP's second linear layer (3 bits or more)."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and isinstance(module.mix, QuantMatMul):
            targets.append((f"{name}.mix.a_quantizer", module.mix.a_quantizer))
        elif isinstance(module, TransformerBlock) and isinstance(module.mlp[2], QuantLinear):
            targets.append((f"{name}.mlp.2.input_quantizer", module.mlp[2].input_quantizer))
    return [name for name, quantizer in targets
            if isinstance(quantizer, LsqPlusQuantizer) and quantizer.kind == "activation" and quantizer.bits >= 3]


# Channel-wise folds between a LayerNorm and the linear layer it feeds --------------------------


def layernorm_linear_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(linear name, LayerNorm, Linear) where the LayerNorm's output feeds only that linear layer:
    each block's norm1 -> qkv and norm2 -> first MLP layer, and the final norm -> head (which
    reads its CLS row). A channel-wise scale and shift of the LayerNorm can move into the linear."""
    pairs = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, TransformerBlock):
            pairs.append((f"{prefix}attention.qkv", module.norm1, module.attention.qkv))
            pairs.append((f"{prefix}mlp.0", module.norm2, module.mlp[0]))
        elif isinstance(module, VisionTransformer):
            pairs.append((f"{prefix}head", module.norm, module.head))
    return [pair for pair in pairs if pair[1].elementwise_affine and pair[1].bias is not None]


@torch.no_grad()
def fold_channel_transform(norm: nn.LayerNorm, linear: nn.Linear, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Make the LayerNorm output (y - shift) / scale and the linear layer compensate, so that
    linear(norm(x)) is unchanged: W' = W * scale (per input column), b' = b + W shift."""
    if linear.bias is None and bool(shift.any()):
        raise ValueError("a shift needs the linear layer's bias to fold into")
    if linear.bias is not None:
        linear.bias.add_(linear.weight @ shift)
    linear.weight.mul_(scale)
    norm.weight.div_(scale)
    norm.bias.sub_(shift).div_(scale)


@torch.no_grad()
def linear_inputs(model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What each layer receives over the batches, as (rows, input features)."""
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.register_forward_hook(lambda module, inputs, output, index=index: seen[index].append(
        inputs[0].detach().flatten(0, -2).float())) for index, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(rows) for rows in seen]


@torch.no_grad()
def fold_layernorm_outliers(float_model: nn.Module, batches: Sequence[torch.Tensor], threshold: float = 2.0) -> dict:
    """TSPTQ's outlier-aware scaling (module docstring), in place; {linear name: k} for the
    LayerNorms that had outlier channels."""
    pairs = layernorm_linear_pairs(float_model)
    folded = {}
    for (name, norm, linear), x in zip(pairs, linear_inputs(float_model, [p[2] for p in pairs], batches)):
        channel_range = x.amax(0) - x.amin(0)
        outlier = channel_range > threshold * channel_range.median()
        if not outlier.any() or outlier.all():
            continue
        power = math.ceil(math.log2(float(channel_range.max() / channel_range[~outlier].max())))
        power = min(max(power, 1), 8)
        scale = torch.where(outlier, 2.0**power, 1.0).to(x)
        fold_channel_transform(norm, linear, torch.zeros_like(scale), scale)
        folded[name] = power
    return folded


def minmax_weight(weight: torch.Tensor, bits: int | None, per_channel: bool) -> torch.Tensor:
    """weight on the symmetric grid calibrate gives it (None: left float)."""
    if bits is None:
        return weight
    q_max = 2 ** (bits - 1) - 1
    bound = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    step = (bound / q_max).clamp(min=1e-8)
    return (weight / step).round().clamp(-q_max - 1, q_max) * step


def minmax_activation(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """x on the min-max grid calibrate gives an activation (None: left float)."""
    if bits is None:
        return x
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = max((high - low) / (2**bits - 1), 1e-8)
    return ((x - low) / step).round().clamp(0, 2**bits - 1) * step + low


def bits_of(quantizer: nn.Module) -> int | None:
    return quantizer.bits if isinstance(quantizer, FakeQuantizer) else None


@torch.no_grad()
def smoothing_for(x: torch.Tensor, linear: nn.Linear, quantized: QuantLinear,
                  alphas: Sequence[float]) -> tuple[float | None, torch.Tensor, torch.Tensor]:
    """(alpha, shift, scale) of SmoothQuant with a bias for one layer: the candidate whose output,
    input and weight min-max quantized at the quantized layer's bits, is closest to the float
    output on x; alpha None is no smoothing (shift 0, scale 1)."""
    weight_bits, act_bits = bits_of(quantized.weight_quantizer), bits_of(quantized.input_quantizer)
    per_channel = bool(getattr(quantized.weight_quantizer, "channels", None))
    weight, bias = linear.weight.float(), linear.bias
    reference = F.linear(x, weight, bias)
    low, high = x.amin(0), x.amax(0)
    midpoint = (low + high) / 2 if bias is not None else torch.zeros_like(low)
    act_range = (high - midpoint).abs().maximum((low - midpoint).abs()).clamp(min=1e-5)
    weight_range = weight.abs().amax(0).clamp(min=1e-5)
    candidates = [(None, torch.zeros_like(low), torch.ones_like(low))]
    candidates += [(alpha, midpoint, (act_range**alpha / weight_range ** (1 - alpha)).clamp(1e-4, 1e4))
                   for alpha in alphas]
    best = None
    for alpha, shift, scale in candidates:
        folded_bias = bias + weight @ shift if bias is not None else None
        output = F.linear(minmax_activation((x - shift) / scale, act_bits),
                          minmax_weight(weight * scale, weight_bits, per_channel), folded_bias)
        error = float((output - reference).pow(2).mean())
        if best is None or error < best[0]:
            best = (error, alpha, shift, scale)
    return best[1:]


@torch.no_grad()
def smooth_with_bias(float_model: nn.Module, quantized: nn.Module, batches: Sequence[torch.Tensor],
                     alphas: Sequence[float] = DEFAULT_ALPHAS) -> dict:
    """MPTQ's SmoothQuant with a bias (module docstring) on float_model, in place, searched for the
    bits of quantized (the same architecture); {linear name: alpha chosen, None for none}."""
    pairs = [(name, norm, linear) for name, norm, linear in layernorm_linear_pairs(float_model)
             if isinstance(quantized.get_submodule(name), QuantLinear)]
    chosen = {}
    for (name, norm, linear), x in zip(pairs, linear_inputs(float_model, [p[2] for p in pairs], batches)):
        alpha, shift, scale = smoothing_for(x, linear, quantized.get_submodule(name), alphas)
        chosen[name] = alpha
        if alpha is not None:
            fold_channel_transform(norm, linear, shift.to(linear.weight), scale.to(linear.weight))
    return chosen


# Mixed precision -----------------------------------------------------------------------------


@torch.no_grad()
def logits_error(model: nn.Module, batches: Sequence[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean squared difference of model's logits to the reference's, relative to their power."""
    device = next(model.parameters()).device
    error = power = 0.0
    for batch, expected in zip(batches, reference):
        error += float((model(batch.to(device)) - expected).pow(2).sum())
        power += float(expected.pow(2).sum())
    return error / max(power, 1e-12)


def bits_ladder(bits: int) -> list[int]:
    """The widths a layer at bits can be raised to, in order: bits + 2, bits + 4, ..., TOP_BITS."""
    return sorted(set(range(bits + 2, TOP_BITS, 2)) | {TOP_BITS}) if bits < TOP_BITS else []


@torch.no_grad()
def assign_mixed_precision(model: nn.Module, float_model: nn.Module, batches: Sequence[torch.Tensor],
                           size_budget: int) -> dict[str, int]:
    """Greedy per-layer weight bits under size_budget bytes (module docstring), in place on a
    calibrated model; {layer name: bits} for every layer it considered."""
    size = model_size_bytes(model)
    if size > size_budget:
        raise ValueError(f"size_budget {size_budget} B is below the model's size at its own bits ({size} B)")
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (QuantConv2d, QuantLinear)) and isinstance(module.weight_quantizer, LsqPlusQuantizer)}
    device = next(model.parameters()).device
    reference = [float_model(batch.to(device)) for batch in batches]
    base_error = logits_error(model, batches, reference)
    errors = {}  # (name, bits) -> logit error with only that layer at bits
    for name, layer in layers.items():
        original = layer.weight_quantizer
        errors[name, original.bits] = base_error
        for bits in bits_ladder(original.bits):
            set_weight_bits(layer, bits)
            errors[name, bits] = logits_error(model, batches, reference)
        layer.weight_quantizer = original

    def weight_bytes(name: str, bits: int) -> int:
        return math.ceil(layers[name].weight.numel() * bits / 8)

    assigned = {name: layer.weight_quantizer.bits for name, layer in layers.items()}
    for name, bits in assigned.items():
        set_weight_bits(layers[name], bits)  # marks every considered layer for ptq_layout
    error, settled = base_error, set()
    while True:
        upgrades = []
        for name, bits in assigned.items():
            ladder = bits_ladder(bits)
            if name in settled or not ladder:
                continue
            cost = weight_bytes(name, ladder[0]) - weight_bytes(name, bits)
            gain = errors[name, bits] - errors[name, ladder[0]]
            if size + cost <= size_budget and gain > 0:
                upgrades.append((gain / cost, name, ladder[0], cost))
        if not upgrades:
            break
        _, name, bits, cost = max(upgrades)
        previous = layers[name].weight_quantizer
        set_weight_bits(layers[name], bits)
        # Gains measured one layer at a time need not add up (errors of several layers can
        # cancel): an upgrade stays only if the whole model's error drops.
        new_error = logits_error(model, batches, reference)
        if new_error < error:
            assigned[name], size, error = bits, size + cost, new_error
        else:
            layers[name].weight_quantizer = previous
            settled.add(name)
    return assigned


# From a float model to a calibrated quantized one ----------------------------------------------


def load_float_weights(quantized: nn.Module, float_model: nn.Module) -> None:
    missing, unexpected = quantized.load_state_dict(float_model.state_dict(), strict=False)
    foreign = [key for key in missing if "quantizer" not in key]
    if unexpected or foreign:
        raise ValueError(f"the float model does not fit the quantized architecture: unexpected {unexpected[:5]}, "
                         f"missing {foreign[:5]}")


def post_training_quantize(model_kwargs: dict, float_model: nn.Module, batches: Iterable[torch.Tensor],
                           method: str = "minmax", **options) -> nn.Module:
    """The model build_model(**model_kwargs) makes, with float_model's trained weights (the same
    architecture built float), quantized by method (METHODS, module docstring) from the
    calibration batches (inputs only); in eval mode, on float_model's device. float_model is not
    changed. Options: percentile ("percentile", and the others' observer "percentile"),
    observer and outlier_threshold ("tsptq"), observer, alphas and size_budget ("mptq")."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = set(options) - METHOD_OPTIONS[method]
    if unknown:
        raise ValueError(f"method {method!r} takes the options {sorted(METHOD_OPTIONS[method])}, got {sorted(unknown)}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    device = next(float_model.parameters()).device
    source = copy.deepcopy(float_model).eval()  # the folds below change weights: never the caller's
    quantized = build_model(**model_kwargs).to(device)
    if method == "tsptq":
        fold_layernorm_outliers(source, batches, options.get("outlier_threshold", 2.0))
    elif method == "mptq":
        smooth_with_bias(source, quantized, batches, options.get("alphas", DEFAULT_ALPHAS))
    load_float_weights(quantized, source)
    if method == "tsptq":
        apply_layout(quantized, {"two_region": two_region_targets(quantized)})
    observer = method if method in OBSERVERS else options.get("observer", "minmax")
    calibrate(quantized, batches, observer, options.get("percentile", 99.99))
    if method == "mptq" and options.get("size_budget") is not None:
        assign_mixed_precision(quantized, source, batches, options["size_budget"])
    return quantized.eval()
