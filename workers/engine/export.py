"""Integer export: a fake-quantized model as packed low-bit weights, and back for inference.

Every quantizer in `quantization` is, once trained, affine: x_hat = x_int * scale + offset with
x_int in [q_min, q_max]. `export_integer` stores, for each quantized Conv2d/Linear layer:

- "weight": the codes x_int - q_min (unsigned, b bits each) packed into a bitstream, least
  significant bit first (two 4-bit codes per byte, four 2-bit codes, eight 3-bit codes per three
  bytes, one 8-bit code per byte), plus q_min, the float scale and offset (one value, or one per
  output channel) and the shape; a full-precision weight is stored as it is.
- "input": the input activation's grid (bits, scale, offset, q_min, q_max), or None when the
  activation stays in full precision.
- everything else the model holds (biases, BatchNorm parameters and running statistics, layers
  left float) in "float_state", under its state-dict name.

and for each product of two activations (a transformer's QuantMatMul), in "matmuls", the grids of
its two operands ("a", "b"; None where an operand stays float). Exports of architectures without
such products have no "matmuls" and read as before.

`integer_model` rebuilds an inference model from that: each quantized layer becomes a plain
Conv2d/Linear whose weight is codes * scale + offset and whose input passes through a fixed
affine quantizer; each product's operands pass through fixed affine quantizers likewise. The arithmetic is the same as the fake-quantized forward's, operation for
operation: weights, codes and quantized inputs are identical, and each layer's output agrees to
float rounding. Other kernels (another CPU, ATEN_CPU_CAPABILITY) add in another order, so a value
that sits on a rounding tie of a later quantizer may land on the neighbouring code and move the
logits of that sample; tests/engine/test_export.py holds each of these guarantees. The weights of
a b-bit export take b/32 of their fp32 size, plus a few bytes of padding and the scales.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifacts import read_verified, write_content_addressed
from .models import MODELS
from .quantization import FakeQuantizer, MatMul, QuantConv2d, QuantLinear, QuantMatMul

FORMAT = "qforget-integer/1"
PACK_CHUNK = 1 << 20  # codes per chunk: bounds the memory of the bit planes


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2^bits as a little-endian bitstream of ceil(n * bits / 8) bytes."""
    values = np.asarray(values).ravel()
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values must be in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    planes = [
        ((chunk.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8).ravel()
        for chunk in np.split(values, range(PACK_CHUNK, values.size, PACK_CHUNK))
    ]
    return np.packbits(np.concatenate(planes) if planes else np.zeros(0, np.uint8),
                       bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: the first count values, as int64."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits,
                           bitorder="little").reshape(count, bits)
    return planes.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def export_layer(module: QuantConv2d | QuantLinear) -> dict:
    weight = module.weight.detach()
    entry = {"type": "conv2d" if isinstance(module, QuantConv2d) else "linear",
             "shape": list(weight.shape)}
    quantizer = module.weight_quantizer
    if isinstance(quantizer, FakeQuantizer):
        codes, scale, offset = quantizer.weight_codes(weight)
        entry["weight"] = {
            "bits": quantizer.bits,
            "q_min": int(quantizer.q_min),
            "packed": torch.from_numpy(
                pack_bits((codes - quantizer.q_min).flatten().cpu().numpy(), quantizer.bits)
            ),
            "scale": scale.detach().float().cpu().clone(),
            "offset": offset.detach().float().cpu().clone(),
        }
    else:
        entry["weight"] = {"bits": None, "float": weight.cpu().clone()}
    entry["input"] = export_activation(module.input_quantizer)
    return entry


def export_activation(quantizer: nn.Module) -> dict | None:
    """An activation quantizer's grid (bits, q_min, q_max, scale, offset); None when full precision."""
    if not isinstance(quantizer, FakeQuantizer):
        return None
    grid = quantizer.activation_grid()
    return {
        "bits": quantizer.bits, "q_min": int(grid["q_min"]), "q_max": int(grid["q_max"]),
        "scale": grid["scale"].detach().float().cpu().clone(),
        "offset": grid["offset"].detach().float().cpu().clone(),
    }


@torch.no_grad()
def export_integer(model: nn.Module) -> dict:
    """{"format", "layers": {name: layer entry}, "float_state": {state-dict name: tensor}}, and
    "matmuls": {name: {"a", "b"}} where the model has quantized products (module docstring).
    Every activation quantizer must have run (trained or calibrated)."""
    layers, matmuls, covered = {}, {}, set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            layers[name] = export_layer(module)
            for key in module.state_dict():
                if key == "weight" or key.startswith(("weight_quantizer.", "input_quantizer.")):
                    covered.add(f"{name}.{key}")
        elif isinstance(module, QuantMatMul):
            matmuls[name] = {"a": export_activation(module.a_quantizer),
                             "b": export_activation(module.b_quantizer)}
            covered.update(f"{name}.{key}" for key in module.state_dict())
    if not layers:
        raise ValueError("model has no quantized layer to export")
    float_state = {key: value.detach().cpu().clone()
                   for key, value in model.state_dict().items() if key not in covered}
    exported = {"format": FORMAT, "layers": layers, "float_state": float_state}
    if matmuls:
        exported["matmuls"] = matmuls
    return exported


def export_weight_bytes(exported: dict) -> tuple[int, int]:
    """(bytes of the packed quantized weights, bytes the same weights take in fp32)."""
    packed = fp32 = 0
    for entry in exported["layers"].values():
        if entry["weight"]["bits"] is not None:
            packed += entry["weight"]["packed"].numel()
            fp32 += 4 * math.prod(entry["shape"])
    return packed, fp32


class AffineQuantizer(nn.Module):
    """A fixed (exported) activation grid: clamp(round((x - offset) / scale)) * scale + offset."""

    def __init__(self, grid: dict):
        super().__init__()
        self.bits, self.q_min, self.q_max = grid["bits"], grid["q_min"], grid["q_max"]
        self.register_buffer("scale", grid["scale"].clone())
        self.register_buffer("offset", grid["offset"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int = torch.clamp((x - self.offset) / self.scale, self.q_min, self.q_max).round()
        return x_int * self.scale + self.offset

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{self.q_min}, {self.q_max}]"


def dequantized_weight(entry: dict) -> torch.Tensor:
    weight = entry["weight"]
    if weight["bits"] is None:
        return weight["float"].clone()
    count = math.prod(entry["shape"])
    codes = unpack_bits(weight["packed"].numpy(), weight["bits"], count) + weight["q_min"]
    codes = torch.from_numpy(codes).float().view(entry["shape"])
    view = [-1] + [1] * (len(entry["shape"]) - 1)
    scale, offset = weight["scale"], weight["offset"]
    scale = scale.view(view) if scale.numel() > 1 else scale
    offset = offset.view(view) if offset.numel() > 1 else offset
    return codes * scale + offset


class IntegerMatMul(MatMul):
    """Inference product of two activations, each through its fixed (exported) quantizer."""

    def __init__(self, entry: dict):
        super().__init__()
        self.a_quantizer = AffineQuantizer(entry["a"]) if entry["a"] else nn.Identity()
        self.b_quantizer = AffineQuantizer(entry["b"]) if entry["b"] else nn.Identity()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


class IntegerConv2d(nn.Conv2d):
    """Inference Conv2d with dequantized integer weights and a fixed input quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight, self.bias)


class IntegerLinear(nn.Linear):
    """Inference Linear with dequantized integer weights and a fixed input quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_quantizer(x), self.weight, self.bias)


def integer_layer(float_layer: nn.Module, entry: dict, name: str) -> nn.Module:
    expected = "conv2d" if isinstance(float_layer, nn.Conv2d) else "linear"
    if entry["type"] != expected or list(float_layer.weight.shape) != entry["shape"]:
        raise ValueError(f"layer {name}: export has a {entry['type']} of shape {entry['shape']}, "
                         f"the architecture a {expected} of {list(float_layer.weight.shape)}")
    if expected == "conv2d":
        layer = IntegerConv2d(
            float_layer.in_channels, float_layer.out_channels, float_layer.kernel_size,
            float_layer.stride, float_layer.padding, float_layer.dilation, float_layer.groups,
            float_layer.bias is not None, float_layer.padding_mode,
        )
    else:
        layer = IntegerLinear(float_layer.in_features, float_layer.out_features,
                              float_layer.bias is not None)
    layer.weight = nn.Parameter(dequantized_weight(entry), requires_grad=False)
    layer.input_quantizer = AffineQuantizer(entry["input"]) if entry["input"] else nn.Identity()
    return layer


def integer_model(exported: dict, architecture: str, num_classes: int, in_channels: int,
                  **_build_kwargs) -> nn.Module:
    """The inference model (eval mode, no gradients) an export describes. Accepts a whole
    build_model kwargs dict: only the architecture and its input/output sizes matter."""
    if exported.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} export: format {exported.get('format')!r}")
    if architecture not in MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(MODELS)}")
    model = MODELS[architecture](num_classes=num_classes, in_channels=in_channels)
    for name, entry in exported["layers"].items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, integer_layer(getattr(parent, child_name), entry, name))
    for name, entry in exported.get("matmuls", {}).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if type(getattr(parent, child_name, None)) is not MatMul:
            raise ValueError(f"export has a product {name} that {architecture} does not have")
        setattr(parent, child_name, IntegerMatMul(entry))
    # The rebuilt layers' weights and fixed quantizers come from the export, not from float_state.
    own = {f"{name}.weight" for name in exported["layers"]} | {
        key for key in model.state_dict() if "_quantizer." in key
    }
    result = model.load_state_dict(exported["float_state"], strict=False)
    missing = set(result.missing_keys) - own
    if missing or result.unexpected_keys:
        raise ValueError(f"export does not fit {architecture}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.requires_grad_(False)
    return model.eval()


def save_integer_artifact(model: nn.Module, spec: dict, directory: Path) -> tuple[Path, str]:
    """Export model and write {"spec", "integer"} content-addressed as <sha256>.int.pt; spec needs
    "model" (the build_model kwargs), as for save_artifact. Returns (path, sha256)."""
    if "model" not in spec:
        raise ValueError('spec needs a "model" entry with the build_model arguments')
    buffer = io.BytesIO()
    torch.save({"spec": spec, "integer": export_integer(model)}, buffer)
    return write_content_addressed(buffer.getvalue(), directory, suffix=".int.pt")


def load_integer_model(
    path: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Verify (as load_artifact does) and rebuild an integer artifact: (inference model, spec)."""
    payload = read_verified(path, expected_sha256)
    if "integer" not in payload:
        raise ValueError(f"{path} is not an integer export (a state-dict artifact? see "
                         "workers.engine.artifacts.load_artifact)")
    spec = payload["spec"]
    return integer_model(payload["integer"], **spec["model"]).to(device), spec
