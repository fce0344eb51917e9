"""Shared, package-scoped digits fixtures for the engine tests (small subsets so the folder stays
fast on two CPU cores)."""

import pytest
import torch

from workers.engine import ModelSpec, TrainConfig, load_dataset, train_model


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast, and far faster than two on a busy 2-core box
    (OpenMP workers spin while waiting for a core). Restored after this folder's tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="package")
def small_train(digits):
    """400 random training samples (keeping the train-time augmentation)."""
    index = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(0))[:400]
    return digits.train.subset(index)


@pytest.fixture(scope="package")
def small_spec():
    return ModelSpec(train=TrainConfig(epochs=8))


@pytest.fixture(scope="package")
def small_model(small_spec, small_train):
    """A 4-bit digits CNN trained on the 400 samples; tests must not modify it."""
    return train_model(small_spec.build(), small_train, small_spec.train, progress=False)
