"""Time and memory of one QAT training step (forward and backward), per architecture.

The memory a training step needs beyond the model is what autograd saves for the backward pass:
with fake quantizers on every layer's input and weights, their saved tensors are a large part of
it, which is why a quantizer is one autograd node (quantization.AffineFakeQuantize). Figures:
docs/performance.md.

    python -m workers.benchmarks.train_step [--architectures cifar-cnn resnet18] [--batch 64]
                                            [--bits 4] [--device cpu] [--steps 3] [--bf16]

"saved MiB" counts the distinct storages autograd keeps from the forward to the backward pass,
the parameters excepted (exact, and the same on any device); on CUDA the step's peak allocation
(torch.cuda.max_memory_allocated, less what was allocated before) is reported too. The time is
the mean over `--steps` steps after a first one that warms up the allocator and the kernels.
"""

import argparse
import json
import time

import torch
from torch import nn
from tqdm import tqdm

from workers.engine.models import build_model
from workers.engine.training import bf16_autocast


def loss_of(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with bf16_autocast(x.device, bf16):
        logits = model(x)
    return logits.float().logsumexp(dim=1).mean()


def step(model: nn.Module, x: torch.Tensor, bf16: bool) -> None:
    loss_of(model, x, bf16).backward()
    model.zero_grad(set_to_none=True)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd saves during a forward pass, parameters excepted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, x, bf16)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def measure(architecture: str, batch: int, bits: int, device: torch.device, steps: int, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    model = build_model(architecture, num_classes=10, in_channels=3, weight_bits=bits, act_bits=bits).to(device)
    model.train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    row = {"architecture": architecture, "batch": batch, "bits": bits, "device": str(device), "bf16": bf16,
           "saved_mib": saved_activation_bytes(model, x, bf16) / 2**20}  # (also initialises the quantizers)
    step(model, x, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(model, x, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    row["step_ms"] = 1000 * (time.perf_counter() - started) / steps
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", default=["cifar-cnn", "resnet18"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4, help="weights and activations (default 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, the quantizers in float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    rows = [measure(name, args.batch, args.bits, device, args.steps, args.bf16)
            for name in tqdm(args.architectures, desc="architectures")]
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'architecture':14}{'batch':>7}{'bits':>6}{'bf16':>6}{'step ms':>10}{'saved MiB':>11}"
          f"{'CUDA peak MiB':>15}")
    for row in rows:
        cuda_peak = f"{row['cuda_peak_mib']:.0f}" if "cuda_peak_mib" in row else "-"
        print(f"{row['architecture']:14}{row['batch']:>7}{row['bits']:>6}{'yes' if row['bf16'] else 'no':>6}"
              f"{row['step_ms']:>10.0f}"
              f"{row['saved_mib']:>11.1f}{cuda_peak:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
