"""Quantization-aware training: fake quantizers (LSQ+, PACT, DSQ) and the layers that use them.

A fake quantizer maps a float tensor onto a uniform grid of 2^b values and back, so the network
trains with the rounding error it will have when deployed with integer arithmetic. Every
quantizer here, once trained, is an affine integer quantizer:

    x_int = clamp(round((x - offset) / scale), q_min, q_max)      x_hat = x_int * scale + offset

which is what `workers.engine.export` stores (x_int packed into b bits, scale and offset as
floats). The three quantizers differ in how the grid is parameterised and learned.

"lsq+": LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020)
- Weights: signed grid [-2^(b-1), 2^(b-1) - 1], no offset, one learnable step size s per tensor
  or per output channel. Initial s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1).
- Activations: unsigned grid [0, 2^b - 1] shifted by a learnable offset beta, per tensor.
  Initial s = (max - min) / (2^b - 1) and beta = min of the first batch. With the offset, one
  quantizer serves both post-ReLU inputs (beta ~ 0) and signed inputs such as the normalised image.
- Rounding uses the straight-through estimator (STE); clamping comes before it, so autograd gives
  the LSQ gradients: d x_hat/dx = 1 inside the range and 0 outside, d x_hat/ds = round(v) - v
  inside and q_min or q_max outside, d x_hat/d beta = 0 inside and 1 outside.
- The gradients of s and beta are multiplied by g = 1 / sqrt(N * q_max), N the number of elements
  one step size covers: all weights (per tensor), the weights of one output channel (per channel),
  or the features of one sample for activations (the batch size must not change the step size's
  learning rate).

"pact": PACT activations (Choi et al. 2018) with DoReFa weights (Zhou et al. 2016), the pairing
of the PACT paper
- Activations: y = clamp(x, 0, alpha), y_q = round(y / s) * s with s = alpha / (2^b - 1); alpha is
  learned with PACT's gradient: d y_q/dx = 1 for 0 <= x < alpha (STE), d y_q/d alpha = 1 for
  x >= alpha and 0 inside (the in-range rounding error is not propagated to alpha). No gradient
  scale: weight decay on alpha is the paper's L2 penalty on it.
  Two departures, both for inputs the paper did not quantize: an input whose first batch has
  negative values (the normalised image; MobileNetV2's linear bottlenecks) is clipped to
  [-alpha, alpha] on the symmetric grid [-(2^(b-1) - 1), 2^(b-1) - 1] (zero stays exact; at 2 bits
  the grid is ternary), with d y_q/d alpha = -1 below -alpha; and alpha starts from the first
  batch (mean + 3 std of x, or of |x| when signed) instead of the paper's constant 10, so a low-bit
  layer does not start with nearly every value in its lowest bin.
- Weights (DoReFa): t = tanh(w), rho = max|t| (per tensor or per output channel),
  w_q = rho * (2 * round_k(t / (2 rho) + 1/2) - 1), round_k rounding onto 2^b - 1 equal steps of
  [0, 1], STE backward. The factor rho (detached) is ours: plain DoReFa weights lie in [-1, 1],
  20 to 50 times the float weights, which BatchNorm absorbs but a layer without BatchNorm after it
  (the classifier) does not. The grid is codes 0..2^b - 1 with scale 2 rho / (2^b - 1) and offset
  -rho: symmetric, without an exact zero.

"dsq": Differentiable Soft Quantization (Gong et al. 2019)
- A clipping range [l, u] (learned; per output channel for per-channel weights) is split into
  2^b - 1 steps of width delta. The forward pass is hard uniform quantization; the backward pass
  differentiates the soft staircase phi instead of using the STE: inside step i, with
  m = v - i - 1/2 (v = (x - l) / delta), soft(v) = i + (k_s * tanh(k * m) + 1) / 2, where
  k = 2 atanh(1 - alpha) and k_s = 1 / (1 - alpha), so soft is continuous and equals the grid at the
  step edges. alpha in (0, 1) (learned, clamped to [0.01, 0.5], initial 0.2) sets how close soft
  is to the hard staircase. d x_hat/dx = soft'(v) inside the range, 0 outside; l, u and alpha get
  gradients through soft.
- Initial range: weights [-c, c] with c = max(|mu - 3 sigma|, |mu + 3 sigma|); activations the
  first batch's [min, max]. The gradients of l and u are multiplied by LSQ's g (not in the paper:
  without it the range of a large layer moves far faster than its weights).

Bits and full precision: each quantizer takes 2 to 16 bits (2, 3, 4 and 8 are tested);
bits None or 32 means no quantizer at all (`nn.Identity`), e.g. full-precision activations with
2-bit weights (the paper's MobileNetV2 setting).

First and last layer policy (`quantize_model`): the first and the last Conv2d/Linear (in
registration order, which for the models here is execution order) get `first_last_bits` (default
8) for their weights and input activation, or the body's bits when those are more precise (a
full-precision body keeps full-precision first and last layers). The first layer sees the raw
image and has few weights, the last produces the logits directly: both are the most sensitive to
quantization noise and the cheapest to keep precise (LSQ's convention). first_last_bits=None (or
32) leaves them float, as PACT and DoReFa did.

Initialisation happens on the first forward and is recorded in the `initialized` buffer, which is
part of the state dict: a loaded model keeps its learned parameters.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

FULL_PRECISION = 32


def is_full_precision(bits: int | None) -> bool:
    """True for None or 32 (no quantizer); ValueError for anything outside 2..16 otherwise."""
    if bits is None or bits == FULL_PRECISION:
        return True
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], or None/32 for full precision; "
                         f"got {bits!r}")
    return False


def straight_through(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """The value of `forward` with the gradient of `backward`. Written as forward + (b - b), not
    b + (forward - b), so that the value is exactly `forward`: export relies on it."""
    return forward.detach() + (backward - backward.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return straight_through(x.round(), x)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Leave the value of x unchanged (exactly) and multiply its gradient by factor."""
    return straight_through(x, x * factor)


def per_channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (or a one-element tensor) to broadcast over dim 0 of x."""
    return t.view(-1, *([1] * (x.dim() - 1))) if t.numel() > 1 else t


def weight_bound(flat: torch.Tensor) -> torch.Tensor:
    """max(|mu - 3 sigma|, |mu + 3 sigma|) per row: the LSQ+ weight initialisation's range."""
    mean, std = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
    return torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())


class FakeQuantizer(nn.Module):
    """What every quantizer shares: bit width, kind, per-channel layout, lazy initialisation.

    Subclasses set q_min/q_max and implement `initialize(x)`, `forward(x)` (which must call
    `self.ensure_initialized(x)`), and for export `weight_codes(w)` (kind "weight") or
    `activation_grid()` (kind "activation"), both in the affine form of the module docstring.
    """

    def __init__(self, bits: int, kind: str, channels: int | None = None):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        if channels is not None and kind != "weight":
            raise ValueError("per-channel parameters are supported for weights only")
        if is_full_precision(bits):
            raise ValueError("a quantizer needs 2 to 16 bits; use nn.Identity for full precision")
        self.bits, self.kind, self.channels = bits, kind, channels
        self.register_buffer("initialized", torch.tensor(False))
        # A Python copy of the state the forward pass branches on, so that it does not read a
        # buffer (a device-to-host sync under CUDA) on every call; reset when a state dict loads.
        self._ready = False

    def ensure_initialized(self, x: torch.Tensor) -> None:
        if self._ready:
            return
        if not self.initialized:
            with torch.no_grad():
                self.initialize(x.detach())
            self.initialized.fill_(True)
        self.read_flags()
        self._ready = True

    def read_flags(self) -> None:
        """Copy buffers the forward pass branches on into Python attributes."""

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    def initialize(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1 / sqrt(N * q_max) (see the module docstring for N)."""
        if self.kind == "weight":
            per_step = x.numel() // (self.channels or 1)
        else:
            per_step = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(per_step * self.q_max)

    def weight_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer codes in [q_min, q_max], scale, offset) with forward(w) == codes*scale+offset;
        scale and offset have one value per output channel, or one value."""
        raise NotImplementedError

    def activation_grid(self) -> dict:
        """{"scale", "offset", "q_min", "q_max"} of the affine quantizer forward() equals."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        per = "per-channel" if self.channels else "per-tensor"
        return f"bits={self.bits}, kind={self.kind}, {per}, range=[{self.q_min}, {self.q_max}]"


class AffineFakeQuantize(torch.autograd.Function):
    """clamp(round((x - offset) / scale), q_min, q_max) * scale + offset with LSQ's gradients
    (the module docstring), as one autograd node.

    The same as `round_ste(torch.clamp((x - offset) / scale, q_min, q_max)) * scale + offset`, value
    for value, but that expression records eight element-wise steps over the whole tensor, each
    saving its inputs for the backward pass; this one saves only v = (x - offset) / scale and
    derives every gradient from it in one pass.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, q_min: int, q_max: int):
        v = (x - offset) / scale
        ctx.save_for_backward(v, scale, offset)
        ctx.q_min, ctx.q_max = q_min, q_max
        return v.clamp(q_min, q_max).round_().mul_(scale).add_(offset)

    @staticmethod
    def backward(ctx, grad):
        v, scale, offset = ctx.saved_tensors
        # Strictly inside, as torch.clamp's own gradient (0 at the bounds themselves).
        inside = (v > ctx.q_min) & (v < ctx.q_max)
        grad_x = grad_scale = grad_offset = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * inside
        if ctx.needs_input_grad[1]:
            # round(v) - v inside the range; q_min or q_max (clamp(v)) outside.
            d_scale = torch.where(inside, v.round() - v, v.clamp(ctx.q_min, ctx.q_max))
            grad_scale = (grad * d_scale).sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:
            grad_offset = (grad * ~inside).sum_to_size(offset.shape)
        return grad_x, grad_scale, grad_offset, None, None


class LsqPlusQuantizer(FakeQuantizer):
    """LSQ+ fake quantizer for a weight tensor (kind="weight") or an activation (kind="activation").

    channels: number of output channels for per-channel weight scales (dim 0 of the weight);
    None means one scale for the whole tensor.
    """

    def __init__(self, bits: int, kind: str, channels: int | None = None):
        super().__init__(bits, kind, channels)
        if kind == "weight":
            self.q_min, self.q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.q_min, self.q_max = 0, 2**bits - 1
        self.scale = nn.Parameter(torch.ones(channels or 1))
        # Weights are symmetric around zero: their offset is a fixed zero, not a parameter.
        if kind == "activation":
            self.offset = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer("offset", torch.zeros(1))

    def initialize(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            flat = x.flatten(1) if self.channels else x.flatten()[None]
            self.scale.copy_(weight_bound(flat) / 2 ** (self.bits - 1))
        else:
            low, high = float(x.min()), float(x.max())
            self.scale.fill_((high - low) / self.q_max)
            self.offset.fill_(low)  # q_min = 0: the grid starts at the smallest value seen
        self.scale.clamp_(min=1e-8)  # a constant input would give a zero step

    def effective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, offset) forward uses, with the gradient scale applied."""
        g = self.grad_scale(x)
        # abs keeps the step positive if SGD pushes it through zero.
        scale = scale_grad(self.scale, g).abs().clamp(min=1e-8)
        offset = scale_grad(self.offset, g) if self.kind == "activation" else self.offset
        return per_channel_view(scale, x), offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        scale, offset = self.effective(x)
        return AffineFakeQuantize.apply(x, scale, offset, self.q_min, self.q_max)

    @torch.no_grad()
    def weight_codes(self, w):
        self.ensure_initialized(w)
        scale, offset = self.effective(w)
        codes = torch.clamp((w - offset) / scale, self.q_min, self.q_max).round()
        return codes.long(), scale.flatten(), offset.flatten()

    @torch.no_grad()
    def activation_grid(self):
        if not self.initialized:
            raise RuntimeError("activation quantizer was never run: its range is unknown")
        scale, offset = self.effective(torch.zeros(1, 1))
        return {"scale": scale.flatten(), "offset": offset.flatten(),
                "q_min": self.q_min, "q_max": self.q_max}


class TwoRegionQuantizer(LsqPlusQuantizer):
    """An activation quantizer with two grids (TSPTQ-ViT's value-aware two scaling factors), for
    values that are dense near their minimum with a long tail (post-softmax, post-GELU).

    Of the b bits, one picks the region and b - 1 code the value within it. Both grids start at
    the offset: the fine one with step `scale`, the coarse one with step scale * 2^coarse_log2,
    (2^(b-1) - 1) steps each. A value the fine grid can hold (up to half a step past its top) is
    rounded on it, any other on the coarse grid. The ratio is a power of two so that an integer
    kernel rescales the coarse codes with a shift. `scale` and `offset` stay LSQ+ parameters, with
    LSQ+'s gradients through whichever grid a value took, so the quantizer trains like LSQ+'s
    (the ratio is fixed: a buffer set by calibration).

    The grid is not affine, so the integer export (`workers.engine.export`) refuses it.
    """

    MAX_COARSE_LOG2 = 8

    def __init__(self, bits: int, kind: str = "activation", channels: int | None = None):
        if kind != "activation":
            raise ValueError("the two-region grid is for activations")
        if bits < 3:
            raise ValueError("a two-region grid needs at least 3 bits (1 for the region)")
        super().__init__(bits, kind, channels)
        self.region_q_max = 2 ** (bits - 1) - 1
        self.register_buffer("coarse_log2", torch.tensor(1))

    def initialize(self, x: torch.Tensor) -> None:
        self.fit(x.flatten(), float(x.min()), float(x.max()))

    def read_flags(self) -> None:
        self._ratio = float(2 ** int(self.coarse_log2))

    @torch.no_grad()
    def fit(self, values: torch.Tensor, low: float, high: float) -> None:
        """Set the grid from sample values spanning [low, high]: the coarse grid ends at high, the
        ratio is the power of two (1 to MAX_COARSE_LOG2) with the least squared error on values."""
        low, high = min(low, 0.0), max(high, 0.0)
        coarse_step = max((high - low) / self.region_q_max, 1e-8)
        values = values.float()
        offset = torch.tensor(low, device=values.device)
        best = None
        for log2 in range(1, self.MAX_COARSE_LOG2 + 1):
            fine_step = coarse_step / 2**log2
            grid = self.two_grids(values, torch.tensor(fine_step, device=values.device), offset, 2.0**log2)
            error = float((grid - values).pow(2).mean())
            if best is None or error < best[0]:
                best = (error, log2, fine_step)
        _, log2, fine_step = best
        self.coarse_log2.fill_(log2)
        self.scale.fill_(fine_step)
        self.offset.fill_(low)
        self._ready = False

    def two_grids(self, x, fine_step, offset, ratio: float) -> torch.Tensor:
        fine = AffineFakeQuantize.apply(x, fine_step, offset, 0, self.region_q_max)
        coarse = AffineFakeQuantize.apply(x, fine_step * ratio, offset, 0, self.region_q_max)
        return torch.where(x - offset <= fine_step * (self.region_q_max + 0.5), fine, coarse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        scale, offset = self.effective(x)
        return self.two_grids(x, scale, offset, self._ratio)

    def activation_grid(self):
        raise ValueError("cannot export a two-region activation grid (TSPTQ post-training quantization): the "
                         "integer format holds one affine grid per activation; quantize with another method to export")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", two regions, coarse step = fine step * 2^{int(self.coarse_log2)}"


class PactQuantizer(FakeQuantizer):
    """PACT activation quantizer: learnable clipping level alpha (kind="activation" only)."""

    def __init__(self, bits: int, kind: str = "activation", channels: int | None = None):
        if kind != "activation":
            raise ValueError("PACT quantizes activations; weights use DoReFaWeightQuantizer")
        super().__init__(bits, kind, channels)
        self.alpha = nn.Parameter(torch.ones(1))
        # Decided on the first batch: inputs with negative values get the symmetric grid.
        self.register_buffer("signed", torch.tensor(False))

    @property
    def q_min(self) -> int:
        return -self.levels if self.signed else 0

    @property
    def q_max(self) -> int:
        return self.levels

    @property
    def levels(self) -> int:
        """Grid steps between 0 and alpha."""
        return self.levels_for(bool(self.signed))

    def levels_for(self, signed: bool) -> int:
        return 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1

    def initialize(self, x: torch.Tensor) -> None:
        self.signed.fill_(bool(x.min() < 0))
        values = x.abs() if self.signed else x
        self.alpha.fill_(float(values.mean() + 3 * values.std()))
        self.alpha.clamp_(min=1e-4)

    def read_flags(self) -> None:
        self._signed = bool(self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        alpha = self.alpha.abs().clamp(min=1e-8)
        # torch.where sends d/d alpha = 1 (-1) exactly where x is clipped at alpha (-alpha).
        clipped = torch.where(x >= alpha, alpha, x)
        if self._signed:
            clipped = torch.where(x <= -alpha, -alpha, clipped)
        else:
            clipped = clipped.clamp(min=0)
        scale = alpha / self.levels_for(self._signed)
        hard = (clipped / scale).round() * scale
        return straight_through(hard, clipped)  # STE: the rounding passes no gradient

    @torch.no_grad()
    def activation_grid(self):
        if not self.initialized:
            raise RuntimeError("activation quantizer was never run: its range is unknown")
        alpha = self.alpha.abs().clamp(min=1e-8)
        return {"scale": (alpha / self.levels).flatten(), "offset": torch.zeros(1),
                "q_min": self.q_min, "q_max": self.q_max}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", signed={bool(self.signed)}"


class DoReFaWeightQuantizer(FakeQuantizer):
    """DoReFa weight quantizer as paired with PACT, magnitude-preserving (see module docstring)."""

    def __init__(self, bits: int, kind: str = "weight", channels: int | None = None):
        if kind != "weight":
            raise ValueError("DoReFa quantizes weights; activations use PactQuantizer")
        super().__init__(bits, kind, channels)
        self.q_min, self.q_max = 0, 2**bits - 1
        self.initialized.fill_(True)  # nothing is learned or initialised from data

    def initialize(self, x: torch.Tensor) -> None:
        pass

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v in [0, q_max] before rounding, scale, offset) for the weight w."""
        t = torch.tanh(w)
        flat = t.flatten(1) if self.channels else t.flatten()[None]
        rho = per_channel_view(flat.detach().abs().amax(dim=1).clamp(min=1e-8), w)
        v = (t / (2 * rho) + 0.5) * self.q_max
        return v, 2 * rho / self.q_max, -rho

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v, scale, offset = self.grid(w)
        return round_ste(v) * scale + offset

    @torch.no_grad()
    def weight_codes(self, w):
        v, scale, offset = self.grid(w)
        return v.round().long(), scale.flatten(), offset.flatten()


class DsqQuantizer(FakeQuantizer):
    """DSQ fake quantizer: learnable range [lower, upper] and soft-staircase sharpness alpha."""

    ALPHA_RANGE = (0.01, 0.5)

    def __init__(self, bits: int, kind: str, channels: int | None = None, alpha: float = 0.2):
        super().__init__(bits, kind, channels)
        self.q_min, self.q_max = 0, 2**bits - 1
        self.lower = nn.Parameter(torch.full((channels or 1,), -1.0))
        self.upper = nn.Parameter(torch.full((channels or 1,), 1.0))
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def initialize(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            flat = x.flatten(1) if self.channels else x.flatten()[None]
            bound = weight_bound(flat).clamp(min=1e-8)
            self.lower.copy_(-bound)
            self.upper.copy_(bound)
        else:
            low, high = float(x.min()), float(x.max())
            self.lower.fill_(low)
            self.upper.fill_(max(high, low + 1e-6))

    def effective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, step) as forward uses them, with the gradient scale applied."""
        g = self.grad_scale(x)
        lower, upper = scale_grad(self.lower, g), scale_grad(self.upper, g)
        step = ((upper - lower) / self.q_max).abs().clamp(min=1e-8)
        return per_channel_view(lower, x), per_channel_view(step, x)

    def soft(self, v: torch.Tensor) -> torch.Tensor:
        """DSQ's soft staircase of v in [0, q_max]; equals the grid at integer v."""
        alpha = self.alpha.clamp(*self.ALPHA_RANGE)
        k = 2 * torch.atanh(1 - alpha)
        step_index = v.detach().floor().clamp(max=self.q_max - 1)
        return step_index + (torch.tanh(k * (v - step_index - 0.5)) / (1 - alpha) + 1) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        lower, step = self.effective(x)
        upper = lower + step * self.q_max
        clipped = torch.where(x < lower, lower, torch.where(x > upper, upper, x))
        v = (clipped - lower) / step
        soft = self.soft(v)
        # Hard in the forward pass (exactly the grid), soft's derivative in the backward pass.
        v_q = straight_through(v.round().clamp(self.q_min, self.q_max), soft)
        return v_q * step + lower

    @torch.no_grad()
    def weight_codes(self, w):
        self.ensure_initialized(w)
        lower, step = self.effective(w)
        codes = torch.clamp((w - lower) / step, self.q_min, self.q_max).round()
        return codes.long(), step.flatten(), lower.flatten()

    @torch.no_grad()
    def activation_grid(self):
        if not self.initialized:
            raise RuntimeError("activation quantizer was never run: its range is unknown")
        lower, step = self.effective(torch.zeros(1, 1))
        return {"scale": step.flatten(), "offset": lower.flatten(),
                "q_min": self.q_min, "q_max": self.q_max}


def quantizer_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of the parameters the fake quantizers learn: LSQ+'s
    step sizes and offsets, PACT's clipping level, DSQ's range and sharpness. They set the grid, not
    the function the grid carries, so penalties meant for the weights (an L1 norm) leave them out."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, FakeQuantizer)
            for name, _ in module.named_parameters(recurse=False)}


def pact_quantizer(bits: int, kind: str, channels: int | None = None) -> FakeQuantizer:
    """PACT for activations, DoReFa for weights (the PACT paper's pairing)."""
    if kind == "weight":
        return DoReFaWeightQuantizer(bits, kind, channels)
    return PactQuantizer(bits, kind, channels)


# name -> callable(bits, kind, channels) returning a FakeQuantizer.
QUANTIZERS = {"lsq+": LsqPlusQuantizer, "pact": pact_quantizer, "dsq": DsqQuantizer}


def make_quantizer(
    name: str, bits: int | None, kind: str, channels: int | None = None
) -> nn.Module:
    """The named quantizer, or nn.Identity for full precision (bits None or 32)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; known: {sorted(QUANTIZERS)}")
    if is_full_precision(bits):
        return nn.Identity()
    return QUANTIZERS[name](bits, kind, channels)


def quantized_operands(layer: "QuantConv2d | QuantLinear", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's input and weight on their grids, computed in float32 even under autocast:
    rounding onto a grid needs float32's precision (bfloat16 keeps 8 significant bits, an 8-bit
    grid needs all of them for the codes alone). The convolution or product that follows them is
    what autocast may run in bfloat16."""
    if not layer.quantize:
        return x, layer.weight
    with torch.autocast(x.device.type, enabled=False):
        return layer.input_quantizer(x.float()), layer.weight_quantizer(layer.weight)


@contextmanager
def quantization_off(model: nn.Module):
    """Within the block, every quantized layer of model computes with its latent float weight and
    its unquantized input: the full-precision view of a quantized model (its "FP model" where no
    float checkpoint exists). BatchNorm keeps the statistics it learned under quantization, so
    this view is close to, not the same as, a float model trained alike."""
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for layer in layers:
        layer.quantize = False
    try:
        yield model
    finally:
        for layer in layers:
            del layer.quantize  # back to the class attribute


class QuantConv2d(nn.Conv2d):
    """Conv2d that fake-quantizes its weight and its input activation (bias stays float)."""

    quantize = True  # quantization_off turns it off for one block

    @classmethod
    def from_float(cls, conv: nn.Conv2d, quantizer, weight_bits, act_bits, per_channel):
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
        )
        layer.load_state_dict(conv.state_dict())
        channels = conv.out_channels if per_channel else None
        layer.weight_quantizer = make_quantizer(quantizer, weight_bits, "weight", channels)
        layer.input_quantizer = make_quantizer(quantizer, act_bits, "activation")
        return layer.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(*quantized_operands(self, x), self.bias)


class QuantLinear(nn.Linear):
    """Linear layer that fake-quantizes its weight and its input activation (bias stays float)."""

    quantize = True  # quantization_off turns it off for one block

    @classmethod
    def from_float(cls, linear: nn.Linear, quantizer, weight_bits, act_bits, per_channel):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state_dict(linear.state_dict())
        channels = linear.out_features if per_channel else None
        layer.weight_quantizer = make_quantizer(quantizer, weight_bits, "weight", channels)
        layer.input_quantizer = make_quantizer(quantizer, act_bits, "activation")
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*quantized_operands(self, x), self.bias)


class MatMul(nn.Module):
    """a @ b as a module, for the products of two activations (a transformer's q k^T and
    attention-times-values): as a module it can be found and replaced by QuantMatMul, as
    quantize_model does for Conv2d and Linear."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class QuantMatMul(MatMul):
    """a @ b with both operands fake-quantized, each by its own activation quantizer (per tensor),
    the kind the model's layers use for their inputs."""

    @classmethod
    def from_float(cls, matmul: MatMul, quantizer, act_bits):
        layer = cls()
        layer.a_quantizer = make_quantizer(quantizer, act_bits, "activation")
        layer.b_quantizer = make_quantizer(quantizer, act_bits, "activation")
        return layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast, as quantized_operands (the grid needs the precision).
        with torch.autocast(a.device.type, enabled=False):
            a, b = self.a_quantizer(a.float()), self.b_quantizer(b.float())
        return a @ b


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def more_precise(a: int | None, b: int | None) -> int | None:
    """The bit width with more precision; None (full precision) beats any number."""
    if is_full_precision(a) or is_full_precision(b):
        return None
    return max(a, b)


def quantize_model(
    model: nn.Module,
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    first_last_bits: int | None = 8,
    quantizer: str = "lsq+",
    per_channel: bool = False,
) -> nn.Module:
    """Replace every Conv2d and Linear of model, in place, by its fake-quantized version, and
    every MatMul (a product of two activations) by a QuantMatMul at act_bits.

    The first and the last Conv2d/Linear layers get first_last_bits, or the body's bits where those
    are more precise; first_last_bits None (or 32) leaves them float (module docstring). A MatMul
    is never a first or last layer: its operands are activations inside the body.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; known: {sorted(QUANTIZERS)}")
    for bits in (weight_bits, act_bits, first_last_bits):
        is_full_precision(bits)  # validates
    targets = [name for name, module in model.named_modules() if type(module) in QUANT_LAYERS]
    if not targets:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    edge = (0, len(targets) - 1)
    for index, name in enumerate(targets):
        if index in edge and is_full_precision(first_last_bits):
            continue  # first/last layer kept float
        layer_bits = (weight_bits, act_bits)
        if index in edge:
            layer_bits = tuple(more_precise(first_last_bits, bits) for bits in layer_bits)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        quant_layer = QUANT_LAYERS[type(layer)].from_float(
            layer, quantizer, *layer_bits, per_channel
        )
        setattr(parent, child_name, quant_layer)
    if not is_full_precision(act_bits):
        for name in [name for name, module in model.named_modules() if type(module) is MatMul]:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child_name, QuantMatMul.from_float(getattr(parent, child_name), quantizer, act_bits))
    return model
