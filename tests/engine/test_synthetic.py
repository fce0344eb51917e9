"""Data-free calibration (synthetic.py): synthetic images, their targets and the activation
corrections, on float digits models trained for a few epochs (module-scoped: a few seconds)."""

import pytest
import torch

from workers.engine import TrainConfig, load_dataset, train_model
from workers.engine.models import build_model
from workers.engine.ptq import calibrate
from workers.engine.synthetic import (
    BatchNormStatistics,
    correction_error,
    fit_activation_corrections,
    insert_activation_corrections,
    synthesize,
    synthesize_with_targets,
)

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def float_cnn(small_train):
    torch.manual_seed(0)
    model = build_model("digits-cnn", 10, 1, None, None)
    return train_model(model, small_train, TrainConfig(epochs=3), progress=False).eval()


@pytest.fixture(scope="module")
def float_vit(small_train):
    torch.manual_seed(0)
    model = build_model("digits-vit", 10, 1, None, None)
    config = TrainConfig(epochs=6, lr=2e-3, weight_decay=0.05, optimizer="adamw")
    model = train_model(model, small_train, config, progress=False).eval()
    # A ViT trained this briefly barely separates the digits (logits within +-1 whatever the input);
    # a sharper head lets the synthesis reach the confidences asked for in a few steps. What is
    # under test is the schedule and the corrections, not the model.
    with torch.no_grad():
        model.head.weight.mul_(10)
        model.head.bias.mul_(10)
    return model


def quantized_copy(float_model, architecture, bits=4):
    quantized = build_model(architecture, 10, 1, bits, bits, first_last_bits=bits)
    quantized.load_state_dict(float_model.state_dict(), strict=False)
    return quantized


def bn_loss(model, x):
    hooks = BatchNormStatistics(model)
    with torch.no_grad():
        model(x)
    loss = float(hooks.loss())
    hooks.remove()
    return loss


def test_shapes_and_determinism_by_seed(float_cnn):
    a = synthesize(float_cnn, "zeroq", 10, SHAPE, 10, seed=3, steps=5, batch_size=4)
    b = synthesize(float_cnn, "zeroq", 10, SHAPE, 10, seed=3, steps=5, batch_size=4)
    c = synthesize(float_cnn, "zeroq", 10, SHAPE, 10, seed=4, steps=5, batch_size=4)
    assert a.shape == (10, *SHAPE)
    assert torch.allclose(a, b)
    assert not torch.allclose(a, c)
    assert synthesize(float_cnn, "noise", 7, SHAPE, 10).shape == (7, *SHAPE)
    assert all(p.requires_grad for p in float_cnn.parameters())  # synthesis froze them only meanwhile


def test_zeroq_matches_batchnorm_statistics_better_than_noise(float_cnn):
    noise = synthesize(float_cnn, "noise", 32, SHAPE, 10, seed=0)
    zeroq = synthesize(float_cnn, "zeroq", 32, SHAPE, 10, seed=0, steps=60, batch_size=32)
    assert bn_loss(float_cnn, zeroq) < bn_loss(float_cnn, noise) / 2


def test_qimera_makes_boundary_samples_with_mixed_targets(float_cnn):
    images, targets = synthesize_with_targets(float_cnn, "qimera", 40, SHAPE, 10, seed=0, steps=30, batch_size=20,
                                              mix_fraction=0.5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(40))
    classes_per_target = (targets > 0).sum(dim=1)
    assert set(classes_per_target.tolist()) == {1, 2}
    assert 10 <= int((classes_per_target == 2).sum()) <= 30
    # The float model's outputs follow the targets: mixed samples are less confident than pure ones.
    with torch.no_grad():
        confidence = torch.softmax(float_cnn(images), dim=1).max(dim=1).values
    assert confidence[classes_per_target == 2].mean() < confidence[classes_per_target == 1].mean()


def test_dfq_vit_goes_from_easy_to_hard(float_vit):
    images, targets = synthesize_with_targets(float_vit, "dfq-vit", 24, SHAPE, 10, seed=0, steps=60, batch_size=8,
                                              stages=3, easy_confidence=0.95, hard_confidence=0.5)
    asked = targets.max(dim=1).values.view(3, 8)
    assert torch.allclose(asked, torch.tensor([0.95, 0.725, 0.5])[:, None].expand(3, 8))
    with torch.no_grad():
        probs = torch.softmax(float_vit(images), dim=1)
    confidence = probs.max(dim=1).values.view(3, 8).mean(dim=1)  # the float model's, per stage in order
    assert (confidence[1:] < confidence[:-1]).all(), confidence
    assert confidence[0] > 0.6 and confidence[-1] < 0.6, confidence


def test_pixel_clamp_is_honoured(float_cnn):
    low, high = torch.tensor([-0.6]), torch.tensor([1.4])
    for method in ("noise", "zeroq"):
        free = synthesize(float_cnn, method, 16, SHAPE, 10, steps=30, batch_size=16)
        clamped = synthesize(float_cnn, method, 16, SHAPE, 10, steps=30, batch_size=16, pixel_range=(low, high))
        assert free.min() < -0.6 or free.max() > 1.4  # the clamp had something to do
        assert clamped.min() >= -0.6 - 1e-6 and clamped.max() <= 1.4 + 1e-6


def test_a_split_knows_the_range_of_valid_pixels():
    """From the normalisation: the digits hold blank (0) and full (16) pixels, so the range is the
    normalised images' own extremes."""
    train = load_dataset("digits").train
    low, high = train.pixel_range
    assert torch.allclose(low, train.x.amin(), atol=1e-5) and torch.allclose(high, train.x.amax(), atol=1e-5)
    assert train.subset([0, 1]).pixel_range is train.pixel_range


def test_corrections_reduce_the_activation_error_on_held_out_batches(float_vit):
    quantized = quantized_copy(float_vit, "digits-vit", bits=3)  # an error large enough to correct
    calibration = synthesize(float_vit, "noise", 64, SHAPE, 10, seed=0).split(16)
    held_out = synthesize(float_vit, "noise", 64, SHAPE, 10, seed=1).split(16)
    calibrate(quantized, calibration)
    layers = [f"blocks.{i}" for i in range(4)]
    before = correction_error(quantized, float_vit, held_out, layers)
    assert fit_activation_corrections(quantized, float_vit, calibration) == layers
    after = correction_error(quantized, float_vit, held_out, layers)
    assert after < 0.8 * before, (before, after)
    assert "blocks.0.activation_correction.weight" in quantized.state_dict()


def test_insert_and_load_state_dict_reproduce_the_corrected_model(float_vit):
    quantized = quantized_copy(float_vit, "digits-vit", bits=4)
    calibration = synthesize(float_vit, "noise", 32, SHAPE, 10).split(16)
    calibrate(quantized, calibration)
    names = fit_activation_corrections(quantized, float_vit, calibration)
    fresh = build_model("digits-vit", 10, 1, 4, 4, first_last_bits=4)
    with pytest.raises(RuntimeError, match="activation_correction"):
        fresh.load_state_dict(quantized.state_dict())  # without the structure, refused
    insert_activation_corrections(fresh, names)
    fresh.load_state_dict(quantized.state_dict())
    fresh.eval()
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(fresh(x), quantized(x), atol=1e-5)
        # The corrections act: switching one to the identity changes the outputs.
        fresh.blocks[0].activation_correction.weight.copy_(torch.eye(64))
        assert not torch.allclose(fresh(x), quantized(x), atol=1e-3)


def test_corrections_on_chosen_convolution_layers(float_cnn):
    quantized = quantized_copy(float_cnn, "digits-cnn", bits=4)
    calibration = synthesize(float_cnn, "noise", 32, SHAPE, 10).split(16)
    calibrate(quantized, calibration)
    names = fit_activation_corrections(quantized, float_cnn, calibration, layers=["features.0"])
    assert quantized.features[0].activation_correction.weight.shape == (32, 32)
    assert quantized(torch.randn(2, *SHAPE)).shape == (2, 10) and names == ["features.0"]


def test_mismatched_methods_and_options_are_refused(float_cnn, float_vit):
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(float_vit, "zeroq", 4, SHAPE, 10, steps=1)
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(float_vit, "qimera", 4, SHAPE, 10, steps=1)
    with pytest.raises(ValueError, match="transformers"):
        synthesize(float_cnn, "dfq-vit", 4, SHAPE, 10, steps=1)
    with pytest.raises(ValueError, match="unknown synthesizer"):
        synthesize(float_cnn, "gan", 4, SHAPE, 10)
    with pytest.raises(ValueError, match="no option"):
        synthesize(float_cnn, "zeroq", 4, SHAPE, 10, stages=2)
    with pytest.raises(ValueError, match="pixel_range"):
        synthesize(float_cnn, "noise", 4, SHAPE, 10, pixel_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="transformer block"):
        fit_activation_corrections(quantized_copy(float_cnn, "digits-cnn"), float_cnn, [torch.randn(2, *SHAPE)])
