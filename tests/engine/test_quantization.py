import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.models import build_model
from workers.engine.quantization import (
    LsqPlusQuantizer,
    QuantConv2d,
    QuantLinear,
    quantize_model,
    round_ste,
)


def quantizer_with(bits, kind, scale, offset=None, channels=None):
    quantizer = LsqPlusQuantizer(bits, kind, channels)
    with torch.no_grad():
        quantizer.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        if offset is not None:
            quantizer.offset.fill_(offset)
    quantizer.initialized.fill_(True)
    return quantizer


# 2-bit activation, s = 0.5, beta = -0.25: v = (x - beta) / s = [-1.5, 0.1, 0.7, 1.1, 2.3, 4.5],
# clamped to [0, 3] and rounded: [0, 0, 1, 1, 2, 3]; back: k * 0.5 - 0.25.
ACT_X = torch.tensor([[-1.0, -0.2, 0.1, 0.3, 0.9, 2.0]])
ACT_OUT = torch.tensor([[-0.25, -0.25, 0.25, 0.25, 0.75, 1.25]])


def test_activation_forward_hand_computed():
    quantizer = quantizer_with(2, "activation", [0.5], offset=-0.25)
    assert torch.allclose(quantizer(ACT_X), ACT_OUT)


def test_weight_forward_hand_computed():
    # 3-bit signed range [-4, 3], s = 0.1: v = [-5, -2.6, -0.4, 0.6, 2.4, 5] -> [-4, -3, 0, 1, 2, 3].
    quantizer = quantizer_with(3, "weight", [0.1])
    w = torch.tensor([[-0.5, -0.26, -0.04], [0.06, 0.24, 0.5]])
    expected = torch.tensor([[-0.4, -0.3, 0.0], [0.1, 0.2, 0.3]])
    assert torch.allclose(quantizer(w), expected)
    assert (quantizer.q_min, quantizer.q_max) == (-4, 3)


def test_per_channel_weight_forward_and_grad_scale():
    # Row 0 with s = 0.1 as above; row 1 with s = 0.2: v = [0.3, 1.2, 4.5] -> [0, 1, 3].
    quantizer = quantizer_with(3, "weight", [0.1, 0.2], channels=2)
    w = torch.tensor([[-0.5, -0.26, -0.04], [0.06, 0.24, 0.9]])
    out = quantizer(w)
    assert torch.allclose(out, torch.tensor([[-0.4, -0.3, 0.0], [0.0, 0.2, 0.6]]))
    out.sum().backward()
    g = 1 / math.sqrt(3 * 3)  # 3 weights per channel, q_max = 3
    # d/ds: q_min below the range, round(v) - v inside, q_max above.
    expected = torch.tensor([g * (-4 + (-3 + 2.6) + (0 + 0.4)), g * ((0 - 0.3) + (1 - 1.2) + 3)])
    assert torch.allclose(quantizer.scale.grad, expected, atol=1e-5)


def test_outputs_lie_on_the_clamped_grid():
    torch.manual_seed(0)
    for kind, bits in (("activation", 4), ("weight", 4), ("activation", 8)):
        quantizer = LsqPlusQuantizer(bits, kind)
        x = torch.randn(16, 3, 5, 5) * 2
        out = quantizer(x)  # initialises from x
        scale, offset = quantizer.scale.detach().abs(), quantizer.offset.detach()
        k = (out.detach() - offset) / scale
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.min() >= quantizer.q_min - 1e-4 and k.max() <= quantizer.q_max + 1e-4
        assert len(torch.unique(k.round())) <= 2**bits


def test_ste_gradient_is_one_inside_the_range_zero_outside():
    quantizer = quantizer_with(2, "activation", [0.5], offset=-0.25)
    x = ACT_X.clone().requires_grad_()
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))


def test_scale_and_offset_gradients_match_the_lsq_formula():
    quantizer = quantizer_with(2, "activation", [0.5], offset=-0.25)
    quantizer(ACT_X).sum().backward()
    g = 1 / math.sqrt(6 * 3)  # 6 features per sample, q_max = 3
    # d/ds: 0 (= q_min, below) + (0-0.1) + (1-0.7) + (1-1.1) + (2-2.3) + 3 (above) = 2.8
    assert quantizer.scale.grad.item() == pytest.approx(2.8 * g, rel=1e-5)
    # d/d beta: 0 inside the range, 1 outside; two samples are outside.
    assert quantizer.offset.grad.item() == pytest.approx(2 * g, rel=1e-5)


def test_activation_grad_scale_does_not_depend_on_batch_size():
    single = quantizer_with(2, "activation", [0.5], offset=-0.25)
    double = quantizer_with(2, "activation", [0.5], offset=-0.25)
    single(ACT_X).sum().backward()
    double(ACT_X.repeat(2, 1)).sum().backward()
    assert torch.allclose(double.scale.grad, 2 * single.scale.grad)


def test_weight_quantizer_has_no_learnable_offset():
    quantizer = LsqPlusQuantizer(4, "weight")
    assert [name for name, _ in quantizer.named_parameters()] == ["scale"]


def test_lsq_plus_initialisation():
    torch.manual_seed(0)
    x = torch.randn(8, 10) * 3 + 1
    act = LsqPlusQuantizer(4, "activation")
    act(x)
    assert act.scale.item() == pytest.approx((x.max() - x.min()).item() / 15, rel=1e-5)
    assert act.offset.item() == pytest.approx(x.min().item(), rel=1e-5)

    weight = LsqPlusQuantizer(4, "weight")
    weight(x)
    mean, std = x.mean(), x.std(unbiased=False)
    bound = max(abs(mean - 3 * std), abs(mean + 3 * std))
    assert weight.scale.item() == pytest.approx(bound.item() / 8, rel=1e-5)


def test_initialisation_happens_once_and_survives_a_state_dict_round_trip():
    first, other = torch.rand(4, 10), torch.rand(4, 10) * 10 - 5
    quantizer = LsqPlusQuantizer(4, "activation")
    quantizer(first)
    learned = quantizer.state_dict()
    quantizer(other)
    assert torch.equal(quantizer.scale, learned["scale"])  # not re-initialised on the 2nd batch

    restored = LsqPlusQuantizer(4, "activation")
    restored.load_state_dict(learned)
    restored(other)
    assert torch.equal(restored.scale, learned["scale"])
    assert torch.equal(restored.offset, learned["offset"])
    fresh = LsqPlusQuantizer(4, "activation")
    fresh(other)  # a fresh quantizer does initialise from `other`: the check above can fail
    assert not torch.equal(fresh.scale, learned["scale"])


def test_quant_layers_quantize_weight_and_input():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(2, 3, 3, padding=1), "lsq+", 4, 4, False)
    x = torch.randn(2, 2, 5, 5)
    expected = F.conv2d(conv.input_quantizer(x), conv.weight_quantizer(conv.weight), conv.bias,
                        padding=1)
    assert torch.allclose(conv(x), expected)

    linear = QuantLinear.from_float(nn.Linear(6, 4), "lsq+", 4, 4, True)
    x = torch.randn(3, 6)
    expected = F.linear(linear.input_quantizer(x), linear.weight_quantizer(linear.weight),
                        linear.bias)
    assert torch.allclose(linear(x), expected)
    assert linear.weight_quantizer.scale.shape == (4,)


def test_quantize_model_keeps_weights_and_puts_first_and_last_layer_at_8_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    weights = [m.weight.clone() for m in model if hasattr(m, "weight")]
    quantize_model(model, weight_bits=4, act_bits=3)
    layers = [m for m in model if hasattr(m, "weight")]
    assert [type(m) for m in layers] == [QuantConv2d, QuantConv2d, QuantLinear, QuantLinear]
    assert [m.weight_quantizer.bits for m in layers] == [8, 4, 4, 8]
    assert [m.input_quantizer.bits for m in layers] == [8, 3, 3, 8]
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, weights))
    assert model(torch.randn(2, 1, 6, 6)).shape == (2, 3)


def test_unknown_quantizer_and_architecture_are_rejected():
    with pytest.raises(ValueError, match="quantizer"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), quantizer="nope")
    with pytest.raises(ValueError, match="architecture"):
        build_model("nope", 10, 1, 4, 4)


def test_build_model_digits_cnn():
    model = build_model("digits-cnn", num_classes=10, in_channels=1, weight_bits=4, act_bits=4)
    quantizers = [m for m in model.modules() if isinstance(m, LsqPlusQuantizer)]
    assert len(quantizers) == 8  # weight and input of 2 convs and 2 linear layers
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("kind, channels", [("activation", None), ("weight", None), ("weight", 8)])
def test_the_fused_quantizer_matches_the_plain_autograd_expression(kind, channels):
    # AffineFakeQuantize is one autograd node for what these eight element-wise steps compute.
    torch.manual_seed(0)
    quantizer = LsqPlusQuantizer(4, kind, channels)
    x = (torch.randn(8, 6, 5, 5) * 2).to(memory_format=torch.channels_last).requires_grad_()
    quantizer(x.detach())  # initialises the grid from x
    with torch.no_grad():  # values at the edges of the range, where the gradients switch
        x[0, 0, 0] = quantizer.effective(x)[1].flatten()[0]
    grad_out = torch.randn_like(x)

    fused = quantizer(x)
    (fused * grad_out).sum().backward()
    fused_grads = [t.grad.clone() for t in (x, *quantizer.parameters())]
    for t in (x, *quantizer.parameters()):
        t.grad = None

    scale, offset = quantizer.effective(x)
    plain = round_ste(torch.clamp((x - offset) / scale, quantizer.q_min, quantizer.q_max)) * scale + offset
    (plain * grad_out).sum().backward()

    assert torch.equal(fused, plain)  # export relies on the exact values
    for fused_grad, t in zip(fused_grads, (x, *quantizer.parameters()), strict=True):
        assert torch.allclose(fused_grad, t.grad, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_quantizers_compute_in_float32_and_the_layers_in_bfloat16():
    # Rounding onto an 8-bit grid needs float32; the convolutions and products may run in bf16.
    model = build_model("digits-cnn", num_classes=10, in_channels=1, weight_bits=4, act_bits=4)
    quantizer_dtypes, layer_dtypes = [], []
    for module in model.modules():
        if isinstance(module, LsqPlusQuantizer):
            module.register_forward_hook(lambda m, inputs, out: quantizer_dtypes.append((inputs[0].dtype, out.dtype)))
        elif isinstance(module, (QuantConv2d, QuantLinear)):
            module.register_forward_hook(lambda m, inputs, out: layer_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 1, 8, 8))
    assert len(quantizer_dtypes) == 8 and set(quantizer_dtypes) == {(torch.float32, torch.float32)}
    assert len(layer_dtypes) == 4 and set(layer_dtypes) == {torch.bfloat16}
