import pytest
import torch

from workers.engine.models import build_model
from workers.engine.ptq import calibrate


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
            weight_step = module.weight.abs().max() / module.weight_quantizer.q_max
            assert float(module.weight_quantizer.scale) == pytest.approx(float(weight_step), rel=1e-6)
            grid = module.input_quantizer
            low = float(grid.offset)
            high = low + float(grid.scale) * grid.q_max
            assert low == pytest.approx(min(seen[name][0], 0.0), rel=1e-5, abs=1e-6)
            assert high == pytest.approx(max(seen[name][1], 0.0), rel=1e-5, abs=1e-6)
