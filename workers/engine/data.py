"""Data sets as in-memory tensors with stable sample indices.

Index i of `DatasetSplits.train` is the stable id the service registers for that sample: a loader
must return the same order for the same seed on every call, on every machine.
"""

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Split:
    x: torch.Tensor  # N x C x H x W, float32
    y: torch.Tensor  # N, int64 class labels
    augment: Augment | None = None  # train-time augmentation; evaluation always sees x as is

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> "Split":
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.x[index], self.y[index], self.augment)

    def training_batch(
        self, index: torch.Tensor, generator: torch.Generator, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at index, augmented (if the split has an augmentation), on device."""
        x = self.x[index]
        if self.augment is not None:
            x = self.augment(x, generator)
        return x.to(device), self.y[index].to(device)


@dataclass
class DatasetSplits:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels in each direction (a random crop of the
    padded image). Edges are replicated: zero padding would draw a grey frame on standardised
    inputs. Flips are left out on purpose: a mirrored digit is not the same digit."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # n, c, dy, dx, h, w: every crop, as a view
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return windows[torch.arange(n), :, dy, dx]


def load_digits_splits(seed: int) -> tuple[Split, Split]:
    """scikit-learn's 1797 8x8 digits (bundled, no download); stratified 80/20 train/test split;
    training batches are shifted by up to one pixel.

    Pixels (0..16) are scaled to [0, 1], then standardised with the train split's mean and std,
    so no test statistic leaks into the inputs.
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    mean, std = train_x.mean(), train_x.std()

    def to_split(x, y, augment=None):
        x = torch.from_numpy((x - mean) / std).unsqueeze(1)
        return Split(x, torch.from_numpy(y).long(), augment)

    return to_split(train_x, train_y, random_shift), to_split(test_x, test_y)


@dataclass(frozen=True)
class DatasetInfo:
    load: Callable[[int], tuple[Split, Split]]
    num_classes: int
    in_channels: int


DATASETS = {"digits": DatasetInfo(load_digits_splits, num_classes=10, in_channels=1)}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, seed: int = 0) -> DatasetSplits:
    info = dataset_info(name)
    train, test = info.load(seed)
    return DatasetSplits(name, train, test, info.num_classes, info.in_channels)
