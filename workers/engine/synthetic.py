"""Data-free calibration: synthetic calibration images made from a full-precision classifier, and
activation corrections that pull a quantized model's intermediate outputs back to the float
model's. Nothing here reads a training sample: only the float model's weights (and, for the
optional pixel clamp, the normalisation the model was trained with).

`synthesize(float_model, method, count, image_shape, num_classes, ...)` returns `count` images in
the model's input (normalised) space, to pass to `ptq.calibrate` in place of real batches:

- "noise": standard Gaussian pixels (the lower bound: what calibration gets with no information).
- "zeroq": Gaussian pixels optimised with Adam so that, at every BatchNorm layer, the batch's
  statistics match the running statistics stored in the model (ZeroQ, Cai et al. 2020), the
  GDFQ convention: the BN *input*, per channel over the batch and the pixels, biased variance,
  mean squared error to running_mean / running_var, averaged over the layers; plus ZeroQ's term
  on the image itself (per-channel mean 0, variance 1, which is what normalised data has).
  Option label_weight > 0 adds GDFQ's cross-entropy to random target classes (default 0).
- "qimera": the same loss with the class term on by default (label_weight 1), where a fraction
  (mix_fraction, default 0.5) of the samples are boundary-supporting samples (Qimera, Choi et al.
  2021): their soft target puts weights softmax(randn(2)) on two different classes. Qimera trains a
  generator whose class embeddings it superposes; here the pixels are optimised directly (as
  ZeroQ does), so the mixture lives in the target alone. No disentanglement layer.
- "dfq-vit": for transformers (no BatchNorm: LayerNorm normalises each token by its own
  statistics and stores none, so there is nothing to match). DFQ-ViT (Tong et al. 2025) synthesises
  samples in order of increasing difficulty; its equations were not available to us
  (shared/research/quantization-anchors.md 5.3), so the realisation is ours: the samples are split
  into `stages` groups, made in order, group g asking the float model for confidence c_g in its
  target class, c_g going linearly from easy_confidence (0.95) to hard_confidence (0.5), the rest of
  the target's mass on one other class (a hard sample sits near a boundary). Loss: KL from that
  soft target, plus PSAQ-ViT's patch-similarity prior (Li et al. 2022: real images give the patch
  tokens of a block diverse cosine similarities, noise gives uniform ones; the entropy of their
  kernel density estimate, maximised, weight patch_weight, default 0.1), plus ZeroQ's image term.
  The output keeps the schedule's order: easy samples first.

pixel_range (low, high), each a number or one value per channel: after every step the pixels are
clamped into it, the range real images occupy once normalised (a data set's splits carry it:
`Split.pixel_range`, from the normalisation alone). Without it the BN-matching images drift far outside
(an earlier attempt saw [-10, 9] for standardised CIFAR) and stretch the calibrated grids.

Activation correction (DFQ-ViT's "activation correction matrix", parameterised by us): for chosen
layers, by default every transformer block, an affine map y = W x + b over the feature axis of the
layer's output, fitted by least squares with a ridge towards the identity (W = I, b = 0) from the
quantized model's outputs to the float model's on the calibration batches, one layer after another
(each fit sees the earlier layers already corrected). No gradient steps: a closed form per layer.
A correction is a child module "activation_correction" of its layer, applied by a forward hook,
so it lives in the state dict ("blocks.0.activation_correction.weight") and runs at inference;
`insert_activation_corrections(model, names)` rebuilds the modules on a fresh model before a state
dict is loaded. The maps stay in float: a deployment must run them as float d x d products.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

SYNTHESIZERS = ("noise", "zeroq", "qimera", "dfq-vit")
OPTIONS = {
    "noise": {},
    "zeroq": {"lr": 0.1, "label_weight": 0.0, "input_weight": 1.0},
    "qimera": {"lr": 0.1, "label_weight": 1.0, "input_weight": 1.0, "mix_fraction": 0.5},
    "dfq-vit": {"lr": 0.1, "input_weight": 1.0, "patch_weight": 0.1, "stages": 4,
                "easy_confidence": 0.95, "hard_confidence": 0.5},
}


# Pixel range ----------------------------------------------------------------------------------------


def clamp_bounds(pixel_range, channels: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """pixel_range as two (1, C, 1, 1) tensors, or None for no clamp."""
    if pixel_range is None:
        return None
    low, high = (torch.as_tensor(bound, dtype=torch.float32, device=device).flatten() for bound in pixel_range)
    low, high = (b.expand(channels) if b.numel() == 1 else b for b in (low, high))
    if low.numel() != channels or high.numel() != channels or bool((low >= high).any()):
        raise ValueError(f"pixel_range must be (low, high) with low < high, one value or {channels} per channel")
    return low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)


# Losses -------------------------------------------------------------------------------------------


class BatchNormStatistics:
    """Forward hooks on every BatchNorm of a model collecting, per layer, the squared distance of the
    batch's input statistics (per channel, biased variance) to the layer's running statistics."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None]
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self.keep) for layer in self.layers]

    def keep(self, layer, inputs, output):
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        self.terms.append(F.mse_loss(mean, layer.running_mean) + F.mse_loss(var, layer.running_var))

    def loss(self) -> torch.Tensor:
        """Mean over the layers of the terms of the last forward pass (and forget them)."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def input_statistics_loss(x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's term on the image: per-channel mean 0 and variance 1, what normalised data has."""
    dims = [0, 2, 3]
    return x.mean(dim=dims).pow(2).mean() + (x.var(dim=dims, unbiased=False) - 1).pow(2).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class PatchSimilarity:
    """PSAQ-ViT's prior, re-derived: in each transformer block's output, the cosine similarities
    between a sample's patch tokens; their density (Gaussian kernels on a grid over [-1, 1]) has a
    high entropy for real images and a low one for noise. loss() is minus the mean entropy."""

    GRID = torch.linspace(-1, 1, 41)
    BANDWIDTH = 0.05

    def __init__(self, model: nn.Module):
        blocks = [m for m in model.modules() if type(m).__name__ == "TransformerBlock"]
        self.entropies: list[torch.Tensor] = []
        self.handles = [block.register_forward_hook(self.keep) for block in blocks]

    def keep(self, block, inputs, output):
        patches = F.normalize(output[:, 1:], dim=-1)  # token 0 is the CLS token
        similarity = patches @ patches.transpose(1, 2)
        upper = torch.triu_indices(similarity.shape[1], similarity.shape[1], offset=1, device=similarity.device)
        values = similarity[:, upper[0], upper[1]]  # (batch, pairs)
        grid = self.GRID.to(values.device)
        density = torch.exp(-0.5 * ((values[..., None] - grid) / self.BANDWIDTH) ** 2).mean(dim=1)
        density = density / density.sum(dim=1, keepdim=True)
        self.entropies.append(-(density * (density + 1e-12).log()).sum(dim=1).mean())

    def loss(self) -> torch.Tensor:
        entropies, self.entropies = self.entropies, []
        return -torch.stack(entropies).mean() if entropies else torch.zeros(())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# Synthesis ----------------------------------------------------------------------------------------


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
               for m in model.modules())


def check_fits(model: nn.Module, method: str) -> None:
    if method in ("zeroq", "qimera") and not has_batch_norm(model):
        raise ValueError(f"{method!r} matches BatchNorm statistics, and this model has no BatchNorm with running "
                         f"statistics (a transformer? use 'dfq-vit')")
    if method == "dfq-vit" and not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise ValueError("'dfq-vit' is for transformers (LayerNorm, no BatchNorm); for a CNN use 'zeroq' or 'qimera'")


def random_targets(count: int, num_classes: int, generator: torch.Generator, mix_fraction: float = 0.0,
                   confidence: torch.Tensor | None = None) -> torch.Tensor:
    """Soft targets (count x num_classes): a class each, in turn over the classes (balanced) then
    shuffled; a mix_fraction of them (Qimera) split between their class and another one with
    weights softmax(randn(2)); or, given confidence (one per sample), confidence on the class and
    the rest on another one."""
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    targets = F.one_hot(labels, num_classes).float()
    others = (labels + torch.randint(1, num_classes, (count,), generator=generator)) % num_classes
    if confidence is not None:
        weights = torch.stack([confidence, 1 - confidence], dim=1)
    else:
        weights = torch.softmax(torch.randn(count, 2, generator=generator), dim=1)
        mixed = torch.rand(count, generator=generator) < mix_fraction
        weights[~mixed] = torch.tensor([1.0, 0.0])
    targets = weights[:, :1] * targets
    return targets.scatter_add(1, others[:, None], weights[:, 1:])


def optimise_batch(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, method: str, options: dict,
                   steps: int, bounds) -> torch.Tensor:
    """Adam on the pixels of one batch for `steps` steps (cosine learning rate), clamped to bounds."""
    bn = BatchNormStatistics(model) if method in ("zeroq", "qimera") else None
    patches = PatchSimilarity(model) if method == "dfq-vit" and options["patch_weight"] else None
    x = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=options["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=options["lr"] / 100)
    try:
        for _ in range(steps):
            logits = model(x)
            loss = options["input_weight"] * input_statistics_loss(x)
            if bn is not None:
                loss = loss + bn.loss()
            if targets is not None and method != "dfq-vit" and options["label_weight"]:
                loss = loss + options["label_weight"] * soft_cross_entropy(logits, targets)
            if method == "dfq-vit":
                # KL(target || model): cross-entropy minus the target's own entropy, so that a soft
                # target is met (not overshot) at the confidence asked for.
                entropy = -(targets * (targets + 1e-12).log()).sum(dim=1).mean()
                loss = loss + soft_cross_entropy(logits, targets) - entropy
                if patches is not None:
                    loss = loss + options["patch_weight"] * patches.loss()
            # Gradients for the pixels only: the model's parameters accumulate nothing.
            (x.grad,) = torch.autograd.grad(loss, x)
            optimizer.step()
            schedule.step()
            if bounds is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
    finally:
        for hooks in (bn, patches):
            if hooks is not None:
                hooks.remove()
    return x.detach()


def synthesize_with_targets(float_model: nn.Module, method: str, count: int, image_shape: Sequence[int],
                            num_classes: int, seed: int = 0, steps: int = 200, batch_size: int = 64,
                            pixel_range=None, progress: bool = False,
                            **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """synthesize's images and the soft targets they were optimised for (count x num_classes; None
    for noise and for zeroq without label term). See the module docstring."""
    if method not in SYNTHESIZERS:
        raise ValueError(f"unknown synthesizer {method!r}; known: {SYNTHESIZERS}")
    unknown = set(options) - set(OPTIONS[method])
    if unknown:
        raise ValueError(f"{method!r} takes no option {sorted(unknown)}; it takes {sorted(OPTIONS[method])}")
    if count < 1 or steps < 0 or batch_size < 1:
        raise ValueError("count and batch_size must be positive, steps non-negative")
    check_fits(float_model, method)
    options = {**OPTIONS[method], **options}
    device = next(float_model.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same samples on every device
    image_shape = tuple(image_shape)
    bounds = clamp_bounds(pixel_range, image_shape[0], device)
    start = torch.randn(count, *image_shape, generator=generator)
    if method == "noise":
        images = start.to(device)
        if bounds is not None:
            images = torch.maximum(torch.minimum(images, bounds[1]), bounds[0])
        return images, None

    if method == "dfq-vit":
        stages = options["stages"]
        if not 1 <= stages <= count:
            raise ValueError(f"stages must be in [1, count], got {stages}")
        if not 0.5 <= options["hard_confidence"] <= options["easy_confidence"] <= 1:
            # Below 0.5 the "other" class would be the sample's class: no longer a harder sample.
            raise ValueError("need 0.5 <= hard_confidence <= easy_confidence <= 1")
        # Stage of each sample, in order; its confidence goes from easy to hard along the stages.
        stage = torch.arange(count) * stages // count
        levels = torch.linspace(options["easy_confidence"], options["hard_confidence"], stages)
        targets = random_targets(count, num_classes, generator, confidence=levels[stage])
        # Batches never straddle a stage, so that the stages are made one after another.
        chunks = [c for s in range(stages) for c in (stage == s).nonzero().flatten().split(batch_size)]
    else:
        mix = options.get("mix_fraction", 0.0)
        targets = random_targets(count, num_classes, generator, mix_fraction=mix) if options["label_weight"] else None
        chunks = list(torch.arange(count).split(batch_size))

    was_training = float_model.training
    float_model.eval()
    requires_grad = [p.requires_grad for p in float_model.parameters()]
    for parameter in float_model.parameters():
        parameter.requires_grad_(False)
    images = torch.empty(count, *image_shape, device=device)
    try:
        for chunk in tqdm(chunks, desc=f"synthesize {method}", disable=not progress):
            batch_targets = targets[chunk].to(device) if targets is not None else None
            images[chunk.to(device)] = optimise_batch(float_model, start[chunk].to(device), batch_targets, method,
                                                      options, steps, bounds)
    finally:
        for parameter, flag in zip(float_model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        float_model.train(was_training)
    return images, targets


def synthesize(float_model: nn.Module, method: str, count: int, image_shape: Sequence[int], num_classes: int,
               seed: int = 0, steps: int = 200, batch_size: int = 64, pixel_range=None, progress: bool = False,
               **options) -> torch.Tensor:
    """count synthetic calibration images [count, *image_shape] in the model's input space, made by
    method (SYNTHESIZERS) from float_model alone; the same for the same seed. Options per method in
    OPTIONS (module docstring)."""
    return synthesize_with_targets(float_model, method, count, image_shape, num_classes, seed, steps, batch_size,
                                   pixel_range, progress, **options)[0]


# Activation corrections ---------------------------------------------------------------------------


class ActivationCorrection(nn.Module):
    """y = W x + b over one axis of a layer's output (the last: tokens; 1: convolution maps);
    the identity until fitted."""

    def __init__(self, features: int, axis: int = -1):
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.eye(features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis in (-1, x.dim() - 1):
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.movedim(self.axis, -1), self.weight, self.bias).movedim(-1, self.axis)


def apply_correction(module: nn.Module, inputs, output):
    """Forward hook (a module-level function, so that copies and pickles of the model keep it)."""
    return module.activation_correction(output)


def output_features(module: nn.Module) -> tuple[int, int]:
    """(width, axis) of a layer's output, read from its last Conv2d or Linear (or its own LayerNorm)."""
    if type(module).__name__ == "TransformerBlock":
        return module.norm1.normalized_shape[0], -1
    last = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not last:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}: it has no Conv2d or Linear")
    if isinstance(last[-1], nn.Conv2d):
        return last[-1].out_channels, 1
    return last[-1].out_features, -1


def default_correction_layers(model: nn.Module) -> list[str]:
    names = [name for name, m in model.named_modules() if type(m).__name__ == "TransformerBlock"]
    if not names:
        raise ValueError("the model has no transformer block: name the layers to correct (layers=[...])")
    return names


def insert_activation_corrections(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Give each named layer an identity ActivationCorrection applied to its output (in place), so
    that a state dict of a corrected model loads into model. Returns model."""
    for name in names:
        layer = model.get_submodule(name)
        if hasattr(layer, "activation_correction"):
            raise ValueError(f"layer {name!r} already has an activation correction")
        features, axis = output_features(layer)
        device = next(layer.parameters()).device
        layer.activation_correction = ActivationCorrection(features, axis).to(device)
        layer.register_forward_hook(apply_correction)
    return model


def layer_outputs(model: nn.Module, name: str, batches: Sequence[torch.Tensor], axis: int) -> Iterable[torch.Tensor]:
    """The named layer's outputs on each batch, as rows (positions x features)."""
    kept = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, out: kept.append(out.detach()))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(batch.to(device))
            out = kept.pop()
            yield out.movedim(axis, -1).reshape(-1, out.shape[axis]).double()
    finally:
        handle.remove()


@torch.no_grad()
def fit_activation_corrections(quantized: nn.Module, float_model: nn.Module, batches: Iterable[torch.Tensor],
                               ridge: float = 1.0, layers: Sequence[str] | None = None) -> list[str]:
    """Fit and insert an ActivationCorrection on each layer (default: every transformer block), in
    forward order, mapping the quantized model's output of the layer to the float model's on
    batches (inputs). Least squares with ridge towards the identity: minimises
    sum ||W x + b - y||^2 + ridge ||W - I||^2 over the rows (tokens or pixels). quantized is
    modified in place and left in eval mode; returns the corrected layers' names (for
    insert_activation_corrections)."""
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}")
    names = list(layers) if layers is not None else default_correction_layers(quantized)
    batches = list(batches)
    if not batches:
        raise ValueError("fitting corrections needs at least one batch")
    quantized.eval()
    float_model.eval()
    for name in names:
        features, axis = output_features(quantized.get_submodule(name))
        # Normal equations of [x, 1] -> y, accumulated batch by batch (float64: sums of many rows).
        gram = torch.zeros(features + 1, features + 1, dtype=torch.float64)
        cross = torch.zeros(features + 1, features, dtype=torch.float64)
        for x, y in zip(layer_outputs(quantized, name, batches, axis), layer_outputs(float_model, name, batches, axis)):
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1).cpu()
            gram += x.T @ x
            cross += x.T @ y.cpu()
        prior = torch.eye(features + 1, features, dtype=torch.float64)  # W = I, b = 0
        penalty = ridge * torch.eye(features + 1, dtype=torch.float64)
        penalty[-1, -1] = 0.0  # the bias is not shrunk
        solution = torch.linalg.solve(gram + penalty, cross + penalty @ prior)
        insert_activation_corrections(quantized, [name])
        correction = quantized.get_submodule(name).activation_correction
        correction.weight.copy_(solution[:-1].T.float())
        correction.bias.copy_(solution[-1].float())
    return names


def correction_error(quantized: nn.Module, float_model: nn.Module, batches: Iterable[torch.Tensor],
                     layers: Sequence[str]) -> float:
    """Mean over layers of the relative squared error ||q - f||^2 / ||f||^2 of their outputs."""
    errors = []
    batches = list(batches)
    with torch.no_grad():
        for name in layers:
            _, axis = output_features(quantized.get_submodule(name))
            diff = norm = 0.0
            for q, f in zip(layer_outputs(quantized, name, batches, axis),
                            layer_outputs(float_model, name, batches, axis)):
                diff += float((q - f).pow(2).sum())
                norm += float(f.pow(2).sum())
            errors.append(diff / max(norm, 1e-12))
    return sum(errors) / len(errors) if errors else math.nan
