"""Recipes: how the original model and the retrain reference are made from a ModelSpec.

Both use the same recipe (QAT from scratch, same seed): the original on the whole train split,
the retrain reference on the retain set only. The reference is what a perfect unlearning would
give, so the gaps to it measure an unlearning method.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import DatasetSplits, Split, dataset_info, load_dataset
from .models import build_model
from .spm import train_spm
from .training import TrainConfig, train_model


@dataclass
class ModelSpec:
    """What a model is and how it is trained; plain data, stored by the service (to_dict).

    Fields added after the first release have defaults that reproduce the earlier behaviour, so
    older stored dicts load unchanged. weight_bits / act_bits None (or 32) mean full precision.
    """

    architecture: str = "digits-cnn"
    dataset: str = "digits"
    weight_bits: int | None = 4
    act_bits: int | None = 4
    quantizer: str = "lsq+"
    train: TrainConfig = field(default_factory=TrainConfig)
    per_channel: bool = False  # one weight scale per output channel
    first_last_bits: int | None = 8  # None: first and last layer stay float
    data_seed: int = 0  # seed of the validation split and per-class subsets
    data_options: dict = field(default_factory=dict)  # load_dataset options (root, subsets...)
    # A semi-parametric model (spm.SPMOptions as a dict): the architecture is its encoder; None: a
    # plain classifier.
    spm: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        return cls(**{**data, "train": TrainConfig(**data.get("train", {}))})

    def model_kwargs(self) -> dict:
        """The build_model arguments (an artifact's spec["model"])."""
        info = dataset_info(self.dataset)
        # Only an SPM names it: artifacts of plain models keep the arguments they always had.
        spm = {"spm": self.spm} if self.spm is not None else {}
        return {**spm,
            "architecture": self.architecture,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "quantizer": self.quantizer,
            "per_channel": self.per_channel,
            "first_last_bits": self.first_last_bits,
        }

    def load_data(self) -> DatasetSplits:
        """The spec's data set, with its seed and options."""
        return load_dataset(self.dataset, self.data_seed, **self.data_options)

    def build(self) -> nn.Module:
        """A fresh model whose initial weights depend only on the seed (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train.seed)
            return build_model(**self.model_kwargs())


def train_original(
    spec: ModelSpec, data: DatasetSplits, device: str | torch.device = "cpu", progress: bool = True
) -> nn.Module:
    """QAT from scratch on the whole train split (an SPM: its episodes, and its datastore of
    every training sample)."""
    if spec.spm is not None:
        return train_spm(spec.build(), data.train, range(len(data.train)), spec.train, device, progress)
    return train_model(spec.build(), data.train, spec.train, device, progress, desc="original")


def retrain_reference(
    spec: ModelSpec, retain: Split, device: str | torch.device = "cpu", progress: bool = True,
    checkpoint: Path | None = None, checkpoint_every_s: float = 60.0, indices=None,
) -> nn.Module:
    """The same recipe from scratch on the retain set only: the gold standard of unlearning.
    checkpoint: as train_model's (a cut run resumes from it). indices: the retain samples' dataset
    indices, which an SPM's datastore records (an SPM run is not checkpointed)."""
    if spec.spm is not None:
        if indices is None:
            raise ValueError("an SPM's retrain reference needs the retain samples' dataset indices")
        return train_spm(spec.build(), retain, indices, spec.train, device, progress, desc="retrain")
    return train_model(spec.build(), retain, spec.train, device, progress, desc="retrain",
                       checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s)
