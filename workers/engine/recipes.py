"""Recipes: how the original model and the retrain reference are made from a ModelSpec.

Both use the same recipe (same seed): the original on the whole train split, the retrain
reference on the retain set only. The reference is what a perfect unlearning would give, so the
gaps to it measure an unlearning method. The recipe is quantization-aware training from scratch,
or (ModelSpec.ptq) training in full precision followed by post-training quantization.
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .data import DatasetSplits, Split, dataset_info, load_dataset
from .models import build_model
from .ptq import METHODS as PTQ_METHODS
from .ptq import calibration_images, post_training_quantize
from .spm import train_spm
from .synthetic import SYNTHESIZERS, synthesize
from .training import TrainConfig, train_model

CALIBRATION_SOURCES = ("real", "synthetic")


@dataclass(frozen=True)
class PTQRecipe:
    """Post-training quantization of a model trained in full precision (ModelSpec.ptq as a dict)."""

    method: str = "percentile"  # ptq.METHODS
    # "real": samples drawn from the training split; "synthetic": inputs made from the
    # full-precision model alone (synthetic.SYNTHESIZERS), so quantizing reads no sample at all.
    calibration: str = "real"
    synthesizer: str = "noise"
    samples: int = 256
    batch_size: int = 64
    seed: int = 0
    options: dict = field(default_factory=dict)  # the method's options (post_training_quantize)

    def __post_init__(self):
        if self.method not in PTQ_METHODS:
            raise ValueError(f"ptq.method must be one of {PTQ_METHODS}, got {self.method!r}")
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"ptq.calibration must be one of {CALIBRATION_SOURCES}, got {self.calibration!r}")
        if self.synthesizer not in SYNTHESIZERS:
            raise ValueError(f"ptq.synthesizer must be one of {SYNTHESIZERS}, got {self.synthesizer!r}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("ptq.samples and ptq.batch_size must be at least 1")


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
    # Train in full precision, then quantize after training (PTQRecipe as a dict); None: QAT.
    ptq: dict | None = None

    def __post_init__(self):
        if self.ptq is not None:
            if self.spm is not None:
                raise ValueError("post-training quantization of a semi-parametric model is not supported")
            # Checked here, not after the training; stored whole, so that the record names every choice.
            self.ptq = asdict(PTQRecipe(**self.ptq))

    def to_dict(self) -> dict:
        spec = asdict(self)
        if spec["ptq"] is None:  # absent, so that the dicts (and stage keys) made before it stay the same
            del spec["ptq"]
        return spec

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

    def full_precision(self) -> "ModelSpec":
        """The same model with no quantizer: what a post-training-quantized model is trained as."""
        return replace(self, weight_bits=None, act_bits=None, first_last_bits=None, ptq=None)


def quantize_trained(spec: ModelSpec, float_model: nn.Module, train: Split,
                     device: str | torch.device = "cpu", progress: bool = True) -> nn.Module:
    """spec's quantized model from its full-precision twin, trained, by spec.ptq's recipe. Synthetic
    calibration reads no sample of `train`, only the shape of its images and their valid range."""
    recipe = PTQRecipe(**spec.ptq)
    float_model = float_model.to(device).eval()
    if recipe.calibration == "real":
        images = calibration_images(train.x, recipe.samples, recipe.seed)
    else:
        images = synthesize(float_model, recipe.synthesizer, recipe.samples, tuple(train.x.shape[1:]),
                            dataset_info(spec.dataset).num_classes, seed=recipe.seed,
                            pixel_range=train.pixel_range, progress=progress)
    batches = [batch.to(device) for batch in images.split(recipe.batch_size)]
    return post_training_quantize(spec.model_kwargs(), float_model, batches, method=recipe.method,
                                  **recipe.options).to(device)


def train_network(spec: ModelSpec, train: Split, device: str | torch.device = "cpu", progress: bool = True,
                  desc: str = "train", **train_options) -> nn.Module:
    """spec's recipe on `train`: QAT from scratch, or full precision then post-training quantization.
    train_options go to train_model (checkpointing)."""
    if spec.ptq is None:
        return train_model(spec.build(), train, spec.train, device, progress, desc=desc, **train_options)
    float_model = train_model(spec.full_precision().build(), train, spec.train, device, progress,
                              desc=f"{desc} (full precision)", **train_options)
    return quantize_trained(spec, float_model, train, device, progress)


def train_original(
    spec: ModelSpec, data: DatasetSplits, device: str | torch.device = "cpu", progress: bool = True
) -> nn.Module:
    """spec's recipe on the whole train split (an SPM: its episodes, and its datastore of every
    training sample)."""
    if spec.spm is not None:
        return train_spm(spec.build(), data.train, range(len(data.train)), spec.train, device, progress)
    return train_network(spec, data.train, device, progress, desc="original")


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
    return train_network(spec, retain, device, progress, desc="retrain",
                         checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s)
