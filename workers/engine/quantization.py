"""Quantization-aware training: LSQ+ fake quantizers and the layers that use them.

A fake quantizer maps a float tensor onto a uniform integer grid and back, so the network trains
with the rounding error it will have when deployed with integer arithmetic:

    x_int = round(clamp((x - beta) / s, q_min, q_max))      x_hat = x_int * s + beta

LSQ (Esser et al. 2020) learns the step size s by backpropagation; LSQ+ (Bhalgat et al. 2020) adds a
learnable offset beta for activations and a better initialisation. Choices made here:

- Weights: signed grid [-2^(b-1), 2^(b-1) - 1], no offset (beta = 0), per tensor or per output
  channel. Initial s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1), mu and sigma of the weights.
- Activations: unsigned grid [0, 2^b - 1] shifted by the learnable offset beta, per tensor.
  Initial s = (max - min) / (2^b - 1) and beta = min of the first batch seen. With the offset, one
  quantizer serves both post-ReLU inputs (beta ~ 0) and signed inputs such as the normalised image.
- Initialisation happens on the first forward and is recorded in the `initialized` buffer, which
  is part of the state dict: a loaded model keeps its learned s and beta.
- Rounding uses the straight-through estimator; clamping comes before it, so autograd gives the LSQ
  gradients: d x_hat/dx = 1 inside the range and 0 outside, d x_hat/ds = round(v) - v inside and
  q_min or q_max outside, d x_hat/d beta = 0 inside and 1 outside.
- The gradients of s and beta are multiplied by g = 1 / sqrt(N * q_max), N the number of elements
  one step size covers: all weights (per tensor), the weights of one output channel (per channel),
  or the features of one sample for activations (the batch size must not change the step size's
  learning rate).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Leave the value of x unchanged and multiply its gradient by factor."""
    return (x - x * factor).detach() + x * factor


class LsqPlusQuantizer(nn.Module):
    """LSQ+ fake quantizer for a weight tensor (kind="weight") or an activation (kind="activation").

    channels: number of output channels for per-channel weight scales (dim 0 of the weight);
    None means one scale for the whole tensor.
    """

    def __init__(self, bits: int, kind: str, channels: int | None = None):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        if channels is not None and kind != "weight":
            raise ValueError("per-channel scales are supported for weights only")
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits, self.kind, self.channels = bits, kind, channels
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
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            flat = x.flatten(1) if self.channels else x.flatten()[None]
            mean, std = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
            bound = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())
            self.scale.copy_(bound / 2 ** (self.bits - 1))
        else:
            low, high = float(x.min()), float(x.max())
            self.scale.fill_((high - low) / self.q_max)
            self.offset.fill_(low)  # q_min = 0: the grid starts at the smallest value seen
        self.scale.clamp_(min=1e-8)  # a constant input would give a zero step
        self.initialized.fill_(True)

    def grad_scale(self, x: torch.Tensor) -> float:
        if self.kind == "weight":
            per_step = x.numel() // (self.channels or 1)
        else:
            per_step = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(per_step * self.q_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(x)
        g = self.grad_scale(x)
        # abs keeps the step positive if SGD pushes it through zero.
        scale = scale_grad(self.scale, g).abs().clamp(min=1e-8)
        offset = scale_grad(self.offset, g) if self.kind == "activation" else self.offset
        if self.channels:  # broadcast one scale per output channel (dim 0)
            scale = scale.view(-1, *([1] * (x.dim() - 1)))
        x_int = round_ste(torch.clamp((x - offset) / scale, self.q_min, self.q_max))
        return x_int * scale + offset

    def extra_repr(self) -> str:
        per = "per-channel" if self.channels else "per-tensor"
        return f"bits={self.bits}, kind={self.kind}, {per}, range=[{self.q_min}, {self.q_max}]"


QUANTIZERS = {"lsq+": LsqPlusQuantizer}


def make_quantizer(name: str, bits: int, kind: str, channels: int | None = None) -> nn.Module:
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; known: {sorted(QUANTIZERS)}")
    return QUANTIZERS[name](bits, kind, channels)


class QuantConv2d(nn.Conv2d):
    """Conv2d that fake-quantizes its weight and its input activation (bias stays float)."""

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
        return self._conv_forward(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias
        )


class QuantLinear(nn.Linear):
    """Linear layer that fake-quantizes its weight and its input activation (bias stays float)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, quantizer, weight_bits, act_bits, per_channel):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state_dict(linear.state_dict())
        channels = linear.out_features if per_channel else None
        layer.weight_quantizer = make_quantizer(quantizer, weight_bits, "weight", channels)
        layer.input_quantizer = make_quantizer(quantizer, act_bits, "activation")
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantize_model(
    model: nn.Module,
    weight_bits: int = 4,
    act_bits: int = 4,
    first_last_bits: int = 8,
    quantizer: str = "lsq+",
    per_channel: bool = False,
) -> nn.Module:
    """Replace every Conv2d and Linear of model, in place, by its fake-quantized version.

    The first and the last of these layers (in registration order, which for the models here is
    execution order) get first_last_bits for weights and input activations: the first layer sees
    the raw image and has few weights, the last produces the logits directly, so both are the most
    sensitive to quantization noise and the cheapest to keep precise. This is the LSQ paper's
    convention; the others get weight_bits / act_bits.
    """
    targets = [name for name, module in model.named_modules() if type(module) in QUANT_LAYERS]
    if not targets:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    for index, name in enumerate(targets):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        bits = first_last_bits if index in (0, len(targets) - 1) else None
        quant_layer = QUANT_LAYERS[type(layer)].from_float(
            layer, quantizer, bits or weight_bits, bits or act_bits, per_channel
        )
        setattr(parent, child_name, quant_layer)
    return model
