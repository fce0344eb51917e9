import copy
import math

import pytest
import torch

from workers.engine import TrainConfig, load_artifact, save_artifact, train_model
from workers.engine.export import export_integer
from workers.engine.models import build_model
from workers.engine.ptq import (
    METHODS,
    calibrate,
    fold_layernorm_outliers,
    linear_inputs,
    model_size_bytes,
    post_training_quantize,
    ptq_layout,
    quantized_weight_bits,
    set_activation_grid,
    smooth_with_bias,
    two_region_targets,
)
from workers.engine.quantization import LsqPlusQuantizer, TwoRegionQuantizer


def float_and_quantized(bits, architecture="digits-vit", quantizer="lsq+"):
    torch.manual_seed(0)
    float_model = build_model(architecture, 10, 1, None, None).eval()
    quantized = build_model(architecture, 10, 1, bits, bits, quantizer=quantizer, first_last_bits=bits)
    missing, unexpected = quantized.load_state_dict(float_model.state_dict(), strict=False)
    assert not unexpected and all("quantizer" in key for key in missing)
    return float_model, quantized


def batches(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("architecture", ["digits-vit", "digits-cnn"])
def test_error_shrinks_with_bits(architecture):
    inputs = batches(1, seed=2)[0]
    errors = {}
    for bits in (4, 8):
        float_model, quantized = float_and_quantized(bits, architecture)
        calibrate(quantized, batches())
        with torch.no_grad():
            errors[bits] = float((quantized(inputs) - float_model(inputs)).pow(2).mean()
                                 / float_model(inputs).pow(2).mean())
    assert errors[8] < 0.01
    assert errors[8] < errors[4] / 10


def test_activation_range_spans_what_was_seen_and_percentile_clips():
    ranges = {}
    for observer in ("minmax", "percentile"):
        _, quantized = float_and_quantized(8)
        calibrate(quantized, batches(), observer=observer, percentile=99.0)
        first = next(m for m in quantized.modules() if getattr(m, "kind", None) == "activation")
        low = float(first.offset.detach())
        ranges[observer] = (low, low + float(first.scale.detach()) * first.q_max)
    seen = torch.cat([b.flatten() for b in batches()])
    low, high = ranges["minmax"]
    assert low == pytest.approx(float(seen.min()), rel=1e-5) and high == pytest.approx(float(seen.max()), rel=1e-5)
    p_low, p_high = ranges["percentile"]
    assert low < p_low < 0 < p_high < high


def test_calibration_survives_a_forward_and_a_state_dict_round_trip():
    _, quantized = float_and_quantized(4)
    calibrate(quantized, batches())
    grids = {k: v.clone() for k, v in quantized.state_dict().items() if k.endswith(("scale", "offset"))}
    with torch.no_grad():
        quantized(torch.randn(3, 1, 8, 8) * 100)  # would move a lazily initialised grid
    _, copy = float_and_quantized(4)
    copy.load_state_dict(quantized.state_dict())
    for key, value in grids.items():
        assert torch.equal(quantized.state_dict()[key], value)
        assert torch.equal(copy.state_dict()[key], value)


@pytest.mark.parametrize("kwargs, message", [
    ({"observer": "mse"}, "observer"),
    ({"percentile": 10}, "percentile"),
])
def test_bad_options_are_refused(kwargs, message):
    _, quantized = float_and_quantized(8)
    with pytest.raises(ValueError, match=message):
        calibrate(quantized, batches(), **kwargs)


def test_refuses_no_batches_and_other_quantizers():
    _, quantized = float_and_quantized(8)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(quantized, [])
    _, pact = float_and_quantized(8, quantizer="pact")
    with pytest.raises(ValueError, match="lsq\\+"):
        calibrate(pact, batches())
    with pytest.raises(ValueError, match="no quantizer"):
        calibrate(build_model("digits-cnn", 10, 1, None, None, first_last_bits=None), batches())


def test_calibration_sees_the_float_model():
    """Weight grids span max|w| and activation ranges are the float model's: no quantizer
    quantizes while calibration observes (an nn.Identity set as `forward` did not bypass them)."""
    float_model, quantized = float_and_quantized(4)
    seen = {}

    def keep_range(name):
        def hook(module, inputs, output):
            low, high = seen.get(name, (float("inf"), float("-inf")))
            seen[name] = (min(low, float(inputs[0].min())), max(high, float(inputs[0].max())))
        return hook

    for name, module in float_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(keep_range(name))
    with torch.no_grad():
        for batch in batches():
            float_model(batch)
    calibrate(quantized, batches())
    for name, module in quantized.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight_step = module.weight.detach().abs().max() / module.weight_quantizer.q_max
            assert float(module.weight_quantizer.scale.detach()) == pytest.approx(float(weight_step), rel=1e-6)
            grid = module.input_quantizer
            low = float(grid.offset.detach())
            high = low + float(grid.scale.detach()) * grid.q_max
            assert low == pytest.approx(min(seen[name][0], 0.0), rel=1e-5, abs=1e-6)
            assert high == pytest.approx(max(seen[name][1], 0.0), rel=1e-5, abs=1e-6)


# post_training_quantize --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_vit(small_train):
    """A float digits ViT trained briefly on 400 samples: far from converged, but trained (its
    activations have the shapes a trained transformer's have, softmax peaks included)."""
    torch.manual_seed(0)
    model = build_model("digits-vit", 10, 1, None, None)
    config = TrainConfig(epochs=6, lr=3e-3, optimizer="adamw", weight_decay=0.05)
    return train_model(model, small_train, config, progress=False).eval()


@pytest.fixture(scope="module")
def calibration(small_train):
    return [small_train.x[:64], small_train.x[64:128]]


def vit_kwargs(bits):
    return {"architecture": "digits-vit", "num_classes": 10, "in_channels": 1, "weight_bits": bits, "act_bits": bits}


def relative_error(model, reference, x):
    with torch.no_grad():
        expected = reference(x)
        return float((model(x) - expected).pow(2).mean() / expected.pow(2).mean())


def agreement(model, reference, x):
    with torch.no_grad():
        return float((model(x).argmax(1) == reference(x).argmax(1)).float().mean())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_stays_close_to_the_float_model(method, float_vit, calibration, digits):
    test_x = digits.test.x
    errors = {}
    for bits in (8, 4):
        quantized = post_training_quantize(vit_kwargs(bits), float_vit, calibration, method)
        assert not quantized.training
        errors[bits] = relative_error(quantized, float_vit, test_x)
    assert errors[8] < 0.01
    assert agreement(post_training_quantize(vit_kwargs(8), float_vit, calibration, method), float_vit,
                     test_x) > 0.95
    assert errors[8] < errors[4]


def test_tsptq_and_mptq_change_what_they_say(float_vit, calibration):
    float_state = {k: v.clone() for k, v in float_vit.state_dict().items()}
    tsptq = post_training_quantize(vit_kwargs(4), float_vit, calibration, "tsptq")
    two_region = [m for m in tsptq.modules() if isinstance(m, TwoRegionQuantizer)]
    assert len(two_region) == 8  # 4 blocks: the post-softmax and the post-GELU quantizer of each
    assert ptq_layout(tsptq)["two_region"] == sorted(two_region_targets(tsptq))
    mptq = post_training_quantize(vit_kwargs(4), float_vit, calibration, "mptq")
    assert not any(isinstance(m, TwoRegionQuantizer) for m in mptq.modules()) and ptq_layout(mptq) == {}
    assert not torch.equal(mptq.blocks[0].norm1.weight, float_vit.blocks[0].norm1.weight)  # smoothed
    for key, value in float_vit.state_dict().items():  # the caller's model is left alone
        assert torch.equal(value, float_state[key])


def long_tail(count=19500, seed=0):
    """Values like an attention map's over 65 tokens (vit-mini): most near zero, a few up to 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(count // 65, 65, generator=generator), dim=1).flatten()


def test_two_region_grid():
    values = long_tail()
    quantizer = TwoRegionQuantizer(4)
    quantizer.fit(values, float(values.min()), float(values.max()))
    quantizer.initialized.fill_(True)
    fine, ratio = float(quantizer.scale.detach()), 2 ** int(quantizer.coarse_log2)
    coarse = fine * ratio
    assert int(quantizer.coarse_log2) >= 2  # a long tail wants a much finer grid near zero
    assert coarse * quantizer.region_q_max == pytest.approx(float(values.max()), rel=1e-5)
    out = quantizer(values).detach()
    assert out.unique().numel() <= 2**4
    small = values <= fine * quantizer.region_q_max
    assert (out[small] - values[small]).abs().max() <= fine / 2 * (1 + 1e-4)
    assert (out[~small] - values[~small]).abs().max() <= coarse / 2 * (1 + 1e-4)
    on_fine = out[small] / fine
    assert torch.allclose(on_fine, on_fine.round(), atol=1e-3)
    uniform = LsqPlusQuantizer(4, "activation")
    with torch.no_grad():
        set_activation_grid(uniform, float(values.min()), float(values.max()))
    uniform.initialized.fill_(True)
    assert (out - values).pow(2).mean() < (uniform(values).detach() - values).pow(2).mean() * 0.7


def test_two_region_quantizer_passes_gradients():
    quantizer = TwoRegionQuantizer(4)
    values = long_tail(2000).requires_grad_()
    quantizer(values).pow(2).sum().backward()  # initialises from this first batch
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert quantizer.scale.grad is not None and quantizer.scale.grad.abs() > 0
    with pytest.raises(ValueError, match="3 bits"):
        TwoRegionQuantizer(2)


def test_folds_leave_the_float_function_unchanged(float_vit, calibration, digits):
    x = digits.test.x[:64]
    smoothed = copy.deepcopy(float_vit)
    quantized = build_model(**vit_kwargs(4))
    chosen = smooth_with_bias(smoothed, quantized, calibration)
    assert len(chosen) == 9 and any(alpha is not None for alpha in chosen.values())
    assert relative_error(smoothed, float_vit, x) < 1e-9
    shifted = copy.deepcopy(float_vit)
    with torch.no_grad():
        shifted.blocks[1].norm2.weight[5] *= 40  # an outlier channel, as trained LayerNorms grow
    reference = copy.deepcopy(shifted)
    folded = fold_layernorm_outliers(shifted, calibration)
    assert folded.get("blocks.1.mlp.0", 0) >= 4
    assert relative_error(shifted, reference, x) < 1e-9
    after = linear_inputs(shifted, [shifted.blocks[1].mlp[0]], calibration)[0]
    channel_range = after.amax(0) - after.amin(0)
    assert channel_range[5] <= channel_range.max() and channel_range[5] < 2 * channel_range.median() * 4


def test_mixed_precision_respects_the_size_budget(float_vit, calibration):
    # 8-bit activations: the weights' bits then decide the error (at W4A4 the activations' error
    # dominates and raising weights barely helps).
    kwargs = {**vit_kwargs(4), "act_bits": 8}
    uniform = post_training_quantize(kwargs, float_vit, calibration, "mptq")
    budget = int(model_size_bytes(uniform) * 1.1)
    mixed = post_training_quantize(kwargs, float_vit, calibration, "mptq", size_budget=budget)
    assert model_size_bytes(uniform) < model_size_bytes(mixed) <= budget
    calibration_x = torch.cat(calibration)  # the greedy choice lowers the error it measures
    assert relative_error(mixed, float_vit, calibration_x) < relative_error(uniform, float_vit, calibration_x)
    bits = ptq_layout(mixed)["weight_bits"]
    assert set(bits.values()) <= {4, 6, 8} and any(b > 4 for name, b in bits.items() if name.startswith("blocks"))
    with pytest.raises(ValueError, match="size_budget"):
        post_training_quantize(kwargs, float_vit, calibration, "mptq", size_budget=1000)


def test_model_size_counts_bits():
    model = build_model(**vit_kwargs(4))
    weights = quantized_weight_bits(model)
    state = model.state_dict()
    expected = sum(math.ceil(state[key].numel() * bits / 8) for key, bits in weights.items())
    expected += sum(4 * t.numel() for key, t in state.items() if key not in weights and t.is_floating_point())
    assert model_size_bytes(model) == expected
    assert set(weights.values()) == {4, 8}  # the body, and the first and last layers
    float_size = model_size_bytes(build_model("digits-vit", 10, 1, None, None))
    assert model_size_bytes(model) < float_size / 4


@pytest.mark.parametrize("method, options", [("tsptq", {}), ("mptq", {"size_budget": 95000})])
def test_artifact_round_trip_then_fine_tuning(method, options, float_vit, calibration, digits, tmp_path):
    quantized = post_training_quantize(vit_kwargs(4), float_vit, calibration, method, **options)
    path, _ = save_artifact(quantized, {"model": vit_kwargs(4)}, tmp_path)
    loaded, spec = load_artifact(path)
    assert spec["ptq_layout"] == ptq_layout(quantized) != {}
    x = digits.test.x[:64]
    with torch.no_grad():
        assert torch.allclose(loaded(x), quantized(x), rtol=1e-5, atol=1e-5)
    loaded.train()
    torch.nn.functional.cross_entropy(loaded(x), digits.test.y[:64]).backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


def test_export_refuses_two_region_quantizers(float_vit, calibration):
    tsptq = post_training_quantize(vit_kwargs(4), float_vit, calibration, "tsptq")
    with pytest.raises(ValueError, match="two-region"):
        export_integer(tsptq)
    mixed = post_training_quantize(vit_kwargs(4), float_vit, calibration, "mptq", size_budget=95000)
    exported = export_integer(mixed)  # per-layer bits export
    assert {entry["weight"]["bits"] for entry in exported["layers"].values()} > {4}


@pytest.mark.parametrize("method, options, message", [
    ("gptq", {}, "method"),
    ("minmax", {"percentile": 99}, "options"),
    ("tsptq", {"alphas": (0.5,)}, "options"),
])
def test_bad_methods_and_options_are_refused(method, options, message, float_vit, calibration):
    with pytest.raises(ValueError, match=message):
        post_training_quantize(vit_kwargs(8), float_vit, calibration, method, **options)
    with pytest.raises(ValueError, match="at least one batch"):
        post_training_quantize(vit_kwargs(8), float_vit, [], "minmax")
