"""Model versions as immutable, content-addressed files: `<sha256 of the bytes>.pt`.

An artifact holds {"spec": spec, "state_dict": ...}. spec is plain data (dicts, lists, strings,
numbers) and must contain "model": the keyword arguments of `build_model`, so the artifact can be
rebuilt without any other record. The quantizers' `initialized` flags travel in the state dict, so
a loaded model keeps its learned step sizes and offsets.
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

SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def save_artifact(model: nn.Module, spec: dict, directory: Path) -> tuple[Path, str]:
    """Write the artifact atomically (temp file, fsync, rename); return (path, sha256)."""
    if "model" not in spec:
        raise ValueError('spec needs a "model" entry with the build_model arguments')
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"spec": spec, "state_dict": state_dict}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()

    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        path = directory / f"{digest}.pt"
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


def load_artifact(
    path: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Verify and rebuild an artifact; return (model in eval mode, spec).

    The bytes must hash to expected_sha256 when given, and to the file name when it is a sha256
    (as save_artifact names it); otherwise ValueError.
    """
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = expected_sha256 or (path.stem if SHA256_NAME.fullmatch(path.stem) else None)
    if expected is not None and digest != expected.lower():
        raise ValueError(f"artifact {path} has sha256 {digest}, expected {expected}")
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    spec = payload["spec"]
    model = build_model(**spec["model"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), spec
