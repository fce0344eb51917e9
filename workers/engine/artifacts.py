"""Model versions as immutable, content-addressed files: `<sha256 of the bytes>.pt`.

An artifact holds {"spec": spec, "state_dict": ...}. spec is plain data (dicts, lists, strings,
numbers) and must contain "model": the keyword arguments of `build_model`, so the artifact can be
rebuilt without any other record. The quantizers' `initialized` flags travel in the state dict, so
a loaded model keeps its learned step sizes and offsets. A post-training quantized model whose
structure build_model does not rebuild (two-region quantizers, per-layer weight bits) gets
spec["ptq_layout"] (`ptq.ptq_layout`), added by save_artifact and applied by load_artifact.

Integer exports (`workers.engine.export`) use the same writer and checks, named `<sha256>.int.pt`.
"""

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .models import build_model
from .ptq import apply_layout, ptq_layout

SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def write_content_addressed(data: bytes, directory: Path, suffix: str = ".pt") -> tuple[Path, str]:
    """Write data atomically (temp file, fsync, rename) as <sha256><suffix>; return
    (path, sha256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        path = directory / f"{digest}{suffix}"
        os.replace(temp_name, path)  # same content, same name: replacing is harmless
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return path, digest


def read_verified(path: Path, expected_sha256: str | None = None) -> dict:
    """The torch payload of a content-addressed file, after checking its sha256 against
    expected_sha256 when given, else against the file name when that starts with a sha256."""
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    stem = path.name.split(".", 1)[0]
    expected = expected_sha256 or (stem if SHA256_NAME.fullmatch(stem) else None)
    if expected is not None and digest != expected.lower():
        raise ValueError(f"artifact {path} has sha256 {digest}, expected {expected}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save_artifact(model: nn.Module, spec: dict, directory: Path) -> tuple[Path, str]:
    """Write the artifact atomically (temp file, fsync, rename); return (path, sha256)."""
    if "model" not in spec:
        raise ValueError('spec needs a "model" entry with the build_model arguments')
    layout = ptq_layout(model)
    if layout:  # structure build_model does not rebuild (post-training quantization): load_artifact applies it
        spec = {**spec, "ptq_layout": layout}
    # Standard strides, so the same weights give the same bytes (and sha256) whatever memory layout
    # the model ran in. (Not contiguous(): a channels-last tensor with one input channel is already
    # "contiguous" but keeps strides that torch.save writes.)
    state_dict = {name: tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
                  for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"spec": spec, "state_dict": state_dict}, buffer)
    return write_content_addressed(buffer.getvalue(), directory)


def load_artifact(
    path: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Verify and rebuild an artifact; return (model in eval mode, spec).

    The bytes must hash to expected_sha256 when given, and to the file name when it is a sha256
    (as save_artifact names it); otherwise ValueError.
    """
    payload = read_verified(path, expected_sha256)
    if "state_dict" not in payload:
        raise ValueError(f"{path} is not a state-dict artifact (an integer export? see "
                         "workers.engine.export.load_integer_model)")
    spec = payload["spec"]
    model = build_model(**spec["model"])
    if "ptq_layout" in spec:
        apply_layout(model, spec["ptq_layout"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), spec
