"""What every worker task shares: its id, torch's settings, the data sets loaded once per
process, and what an artifact records of its model."""

import json
import os
import socket

import torch

from service.core.settings import Settings
from workers import engine as qf

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def configure_torch(settings: Settings) -> None:
    """Apply QFORGET_TORCH_THREADS (0 leaves torch's choice). On a small shared CPU one thread is
    often faster: idle OpenMP threads spin while another process holds the other core."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


_loaded_data: dict[tuple, qf.DatasetSplits] = {}


def load_data(spec: qf.ModelSpec, erased: list[int]) -> qf.DatasetSplits:
    """The spec's data set (with its seed and options), loaded once per worker process, with the
    training samples at the `erased` indices (service.requests.holdings.erased_indices) blanked in
    memory and in the decoded-image cache: a tombstone holds even where a copy was decoded again."""
    key = (spec.dataset, spec.data_seed, json.dumps(spec.data_options, sort_keys=True))
    if key not in _loaded_data:
        _loaded_data[key] = spec.load_data()
    data = _loaded_data[key]
    data.train.erase(erased)
    return data


def artifact_spec(spec: qf.ModelSpec) -> dict:
    """What an artifact records so that it can be rebuilt without the database."""
    return {"model": spec.model_kwargs(), "dataset": spec.dataset}


def readable_indices(indices: list[int], train_size: int) -> tuple[list[int], int]:
    """The indices the data set has, and how many it does not. A sample registered beyond the data
    set must not stop every run of a model that retains it: runs go on without it, and say how many."""
    readable = [i for i in indices if 0 <= i < train_size]
    return readable, len(indices) - len(readable)
