import numpy as np
import pytest
import torch

from workers.engine import (
    ModelSpec,
    Split,
    TrainConfig,
    accuracy,
    load_dataset,
    predict_probs,
    retrain_reference,
)
from workers.engine.data import random_shift
from workers.engine.training import checkpoint_seconds, train_model


def test_digits_shapes_and_stratified_80_20_split(digits):
    assert (digits.num_classes, digits.in_channels) == (10, 1)
    assert digits.train.x.shape == (1437, 1, 8, 8) and digits.test.x.shape == (360, 1, 8, 8)
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.int64
    train_share = np.bincount(digits.train.y) / np.bincount(np.r_[digits.train.y, digits.test.y])
    assert np.all(np.abs(train_share - 0.8) < 0.02)
    assert abs(digits.train.x.mean().item()) < 1e-4 and abs(digits.train.x.std().item() - 1) < 1e-3


def test_sample_indices_are_stable_for_a_seed(digits):
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.train.y, digits.train.y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.train.y, digits.train.y)


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")


def test_subset_keeps_order_and_augmentation(digits):
    part = digits.train.subset([5, 2, 9])
    assert len(part) == 3
    assert torch.equal(part.x[1], digits.train.x[2]) and part.y[2] == digits.train.y[9]
    assert part.augment is digits.train.augment and digits.test.augment is None


def test_random_shift_is_a_one_pixel_translation():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4).repeat(50, 1, 1, 1)
    shifted = random_shift(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    crops = torch.stack([padded[..., dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)])
    matches = (crops == shifted).flatten(2).all(dim=2)  # crop option x image
    assert matches.any(dim=0).all()  # every output is one of the nine crops
    assert len(set(matches.float().argmax(dim=0).tolist())) > 1  # and they vary


def test_training_batches_are_augmented_but_evaluation_is_not(digits):
    index = torch.arange(64)
    x, y = digits.train.training_batch(index, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(y, digits.train.y[:64]) and not torch.equal(x, digits.train.x[:64])
    x_test, _ = digits.test.training_batch(index, torch.Generator(), "cpu")
    assert torch.equal(x_test, digits.test.x[:64])


def test_small_qat_model_learns(small_model, digits):
    assert accuracy(small_model, digits.test) >= 85.0


def test_predict_probs_are_probabilities_and_restore_train_mode(small_model, digits):
    small_model.train()
    probs = predict_probs(small_model, digits.test.x[:50], batch_size=16)
    assert small_model.training
    assert probs.shape == (50, 10) and torch.allclose(probs.sum(dim=1), torch.ones(50))
    small_model.eval()


def test_model_spec_round_trip_and_seeded_build():
    spec = ModelSpec(weight_bits=3, train=TrainConfig(epochs=2, lr=0.1))
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.model_kwargs()["num_classes"] == 10
    state = torch.random.get_rng_state()
    a, b = spec.build(), spec.build()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_retrain_reference_is_reproducible(small_train):
    spec = ModelSpec(train=TrainConfig(epochs=1))
    retain = Split(small_train.x[:128], small_train.y[:128], small_train.augment)
    first = retrain_reference(spec, retain, progress=False).state_dict()
    second = retrain_reference(spec, retain, progress=False).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


class Cut(Exception):
    pass


def test_a_training_cut_short_resumes_from_its_checkpoint_to_the_same_model(small_train, small_spec, tmp_path):
    config = small_spec.train  # 8 epochs
    uncut = train_model(small_spec.build(), small_train, config, progress=False)

    checkpoint = tmp_path / "run.partial.pt"
    batches_per_epoch = -(-len(small_train) // config.batch_size)
    served = 0
    original_batch = type(small_train).training_batch

    def cut_in_epoch_six(self, index, generator, device):
        nonlocal served
        served += 1
        if served > 5 * batches_per_epoch + 2:  # the machine is taken away mid-epoch
            raise Cut
        return original_batch(self, index, generator, device)

    type(small_train).training_batch = cut_in_epoch_six
    try:
        with pytest.raises(Cut):
            train_model(small_spec.build(), small_train, config, progress=False, checkpoint=checkpoint,
                        checkpoint_every_s=0)
    finally:
        type(small_train).training_batch = original_batch
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 5 and saved["seconds"] > 0 and checkpoint_seconds(checkpoint) == saved["seconds"]

    resumed = train_model(small_spec.build(), small_train, config, progress=False, checkpoint=checkpoint)
    assert not checkpoint.exists()  # done: nothing left to resume
    for (name, a), b in zip(uncut.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_adamw_trains_the_digits_vit(small_train, digits):
    """The transformers' optimizer: ten epochs lift the 4-bit digits ViT well above chance (10%;
    SGD leaves it near 25% after fifteen); unknown optimizers are refused."""
    spec = ModelSpec(architecture="digits-vit",
                     train=TrainConfig(epochs=10, optimizer="adamw", lr=3e-3, weight_decay=0.05))
    model = train_model(spec.build(), digits.train, spec.train, progress=False)
    assert accuracy(model, digits.test) > 30
    with pytest.raises(ValueError, match="optimizer"):
        train_model(spec.build(), small_train, TrainConfig(epochs=1, optimizer="lamb"), progress=False)
