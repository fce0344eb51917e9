"""PACT (with DoReFa weights) and DSQ, the quantizer registry, bit widths, full precision and the
first/last layer policy. LSQ+ has its own hand-computed tests in test_quantization.py."""

import math

import pytest
import torch
from torch import nn

from workers.engine import ModelSpec, TrainConfig, accuracy, train_model
from workers.engine.quantization import (
    QUANTIZERS,
    DoReFaWeightQuantizer,
    DsqQuantizer,
    FakeQuantizer,
    LsqPlusQuantizer,
    PactQuantizer,
    QuantConv2d,
    QuantLinear,
    make_quantizer,
    quantize_model,
)

BITS = (2, 3, 4, 8)


def pact_with(bits, alpha, signed=False):
    quantizer = PactQuantizer(bits)
    with torch.no_grad():
        quantizer.alpha.fill_(alpha)
    quantizer.signed.fill_(signed)
    quantizer.initialized.fill_(True)
    return quantizer


def dsq_with(bits, lower, upper, alpha=0.2, kind="activation", channels=None):
    quantizer = DsqQuantizer(bits, kind, channels, alpha=alpha)
    with torch.no_grad():
        quantizer.lower.copy_(torch.as_tensor(lower, dtype=torch.float32))
        quantizer.upper.copy_(torch.as_tensor(upper, dtype=torch.float32))
    quantizer.initialized.fill_(True)
    return quantizer


def test_registry_names_and_kinds():
    assert set(QUANTIZERS) == {"lsq+", "pact", "dsq"}
    assert isinstance(make_quantizer("pact", 4, "weight"), DoReFaWeightQuantizer)
    assert isinstance(make_quantizer("pact", 4, "activation"), PactQuantizer)
    assert isinstance(make_quantizer("dsq", 4, "weight", 8), DsqQuantizer)
    assert isinstance(make_quantizer("lsq+", 3, "activation"), LsqPlusQuantizer)
    for bits in (None, 32):
        assert isinstance(make_quantizer("dsq", bits, "activation"), nn.Identity)
    for bad in (0, 1, 17, 31, 33, 2.5, True, "4"):
        with pytest.raises(ValueError, match="bits"):
            make_quantizer("lsq+", bad, "weight")
    with pytest.raises(ValueError, match="PACT"):
        PactQuantizer(4, "weight")
    with pytest.raises(ValueError, match="DoReFa"):
        DoReFaWeightQuantizer(4, "activation")


# PACT --------------------------------------------------------------------------------------------

# 2-bit unsigned, alpha = 1.5: s = 0.5; clip to [0, 1.5]: v = [0, .4, .6, 1.6, 2.8, 3],
# rounded [0, 0, 1, 2, 3, 3].
PACT_X = torch.tensor([[-0.3, 0.2, 0.3, 0.8, 1.4, 2.0]])


def test_pact_forward_hand_computed():
    out = pact_with(2, 1.5)(PACT_X)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.5, 1.5]]))


def test_pact_gradients_are_the_papers():
    quantizer = pact_with(2, 1.5)
    x = PACT_X.clone().requires_grad_()
    (quantizer(x) * torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 7.0]])).sum().backward()
    # STE inside [0, alpha), zero where clipped.
    assert torch.equal(x.grad, torch.tensor([[0.0, 2.0, 3.0, 4.0, 5.0, 0.0]]))
    # d/d alpha: the upstream gradient of the clipped-at-alpha elements only (2.0 >= 1.5); the
    # in-range rounding errors (which LSQ would propagate) contribute nothing.
    assert quantizer.alpha.grad.item() == pytest.approx(7.0)


def test_pact_signed_inputs_get_the_symmetric_grid():
    # First batch has negative values: signed. 2 bits: levels 1, grid {-alpha, 0, alpha}.
    quantizer = PactQuantizer(2)
    quantizer(torch.tensor([[-1.0, 2.0]]))
    assert bool(quantizer.signed) and (quantizer.q_min, quantizer.q_max) == (-1, 1)
    with torch.no_grad():
        quantizer.alpha.fill_(1.0)
    x = torch.tensor([[-2.0, -1.5, -0.4, 0.4, 0.6, 3.0]], requires_grad=True)
    out = quantizer(x)
    assert torch.equal(out, torch.tensor([[-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]))
    assert quantizer.alpha.grad.item() == pytest.approx(-1.0)  # -1 twice below, +1 once above


def test_pact_initialisation_from_the_first_batch():
    x = torch.rand(64, 10) * 4
    quantizer = PactQuantizer(4)
    quantizer(x)
    assert not quantizer.signed and (quantizer.q_min, quantizer.q_max) == (0, 15)
    assert quantizer.alpha.item() == pytest.approx((x.mean() + 3 * x.std()).item(), rel=1e-5)
    restored = PactQuantizer(4)
    restored.load_state_dict(quantizer.state_dict())
    restored(-x)  # loaded, so not re-initialised (negative inputs would make it signed)
    assert not restored.signed and restored.alpha.item() == quantizer.alpha.item()


def test_loading_a_state_dict_replaces_the_flags_the_forward_pass_caches():
    unsigned = PactQuantizer(3)
    unsigned(torch.rand(4, 5))
    signed = PactQuantizer(3)
    signed(torch.randn(4, 5) - 1)
    unsigned.load_state_dict(signed.state_dict())
    x = torch.full((1, 3), -signed.alpha.item())
    assert (unsigned(x) < 0).all()  # the loaded, signed grid (the old one would give 0)
    assert torch.equal(unsigned(x), signed(x))


# DoReFa ------------------------------------------------------------------------------------------


def test_dorefa_weights_hand_computed():
    quantizer = DoReFaWeightQuantizer(2)
    w = torch.tensor([[-3.0, -0.5, -0.01, 0.01, 0.2, 3.0]])
    rho = math.tanh(3.0)
    # v = (tanh(w) / (2 rho) + 1/2) * 3, rounded: -3 -> 0, -.5 -> 0.78 -> 1, +-0.01 -> 1 and 2,
    # 0.2 -> 1.81 -> 2, 3 -> 3; grid rho * {-1, -1/3, 1/3, 1}.
    expected = rho * torch.tensor([[-1.0, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1.0]])
    assert torch.allclose(quantizer(w), expected, atol=1e-6)


def test_dorefa_ste_gradient_is_the_tanh_derivative():
    w = torch.tensor([[-1.0, -0.2, 0.3, 0.9]], requires_grad=True)
    DoReFaWeightQuantizer(3)(w).sum().backward()
    assert torch.allclose(w.grad, 1 - torch.tanh(w.detach()) ** 2)


def test_dorefa_per_channel_uses_each_rows_range():
    quantizer = DoReFaWeightQuantizer(2, channels=2)
    w = torch.tensor([[-0.02, 0.0, 0.02], [-1.0, 0.1, 2.0]])
    out = quantizer(w)
    rho = torch.tanh(w).abs().amax(dim=1)
    assert torch.allclose(out.abs().amax(dim=1), rho)  # each row reaches its own +-rho
    per_tensor = DoReFaWeightQuantizer(2)(w)
    # On the shared grid the small row falls on the two levels next to zero; on its own it
    # spreads over three (-rho_0, rho_0 / 3, rho_0).
    assert len(torch.unique(per_tensor[0])) <= 2
    assert len(torch.unique(out[0])) == 3
    assert list(quantizer.parameters()) == []


# DSQ ---------------------------------------------------------------------------------------------


def test_dsq_forward_is_hard_quantization_hand_computed():
    # 2 bits on [0, 1.5]: step 0.5; v = [0, .4, .6, 1.48, 2.6, 3] -> [0, 0, 1, 1, 3, 3].
    quantizer = dsq_with(2, [0.0], [1.5])
    out = quantizer(torch.tensor([[-1.0, 0.2, 0.3, 0.74, 1.3, 2.0]]))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.5, 1.5]]))


def test_dsq_soft_staircase_shape():
    quantizer = dsq_with(3, [0.0], [7.0], alpha=0.2)
    v = torch.linspace(0, 7, 701)
    soft = quantizer.soft(v).detach()
    assert torch.all(soft[1:] >= soft[:-1])  # monotonic
    assert (soft - v.round()).abs().max() <= 0.5 + 1e-5  # within half a step of the grid
    integers = torch.arange(8.0)
    assert torch.allclose(quantizer.soft(integers).detach(), integers, atol=1e-5)
    # A smaller alpha is closer to the hard staircase.
    deviations = [(dsq_with(3, [0.0], [7.0], alpha=a).soft(v).detach() - v.round()).abs().mean()
                  for a in (0.5, 0.2, 0.05, 0.01)]
    assert deviations == sorted(deviations, reverse=True) and deviations[-1] < 0.6 * deviations[0]


def test_dsq_gradients_are_the_soft_derivative_not_the_ste():
    alpha = 0.2
    quantizer = dsq_with(2, [0.0], [1.5], alpha=alpha)
    x = torch.tensor([[-1.0, 0.25, 0.3, 0.5, 2.0]], requires_grad=True)
    quantizer(x).sum().backward()
    k = 2 * math.atanh(1 - alpha)
    v = x.detach() / 0.5
    m = v - v.floor().clamp(max=2) - 0.5
    expected = (k / (1 - alpha)) * (1 - torch.tanh(k * m) ** 2) / 2
    expected[0, 0] = expected[0, -1] = 0.0  # clipped
    assert torch.allclose(x.grad, expected, atol=1e-5)
    assert x.grad[0, 1] > 1.0 > x.grad[0, 3]  # steep at a step's centre, flat at its edge
    for name in ("lower", "upper", "alpha"):
        assert getattr(quantizer, name).grad.abs().sum() > 0, name


def test_dsq_initial_ranges():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    weight = DsqQuantizer(4, "weight", channels=4)
    weight(w)
    flat = w.flatten(1)
    mean, std = flat.mean(1), flat.std(1, unbiased=False)
    bound = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())
    assert torch.allclose(weight.upper, bound) and torch.allclose(weight.lower, -bound)
    x = torch.rand(8, 5) * 3 - 1
    act = DsqQuantizer(4, "activation")
    act(x)
    assert act.lower.item() == pytest.approx(x.min().item())
    assert act.upper.item() == pytest.approx(x.max().item())


# Every quantizer, every bit width ---------------------------------------------------------------


def grid_of(quantizer, x):
    """(codes the output lies on, q_min, q_max), from the quantizer's own export grid."""
    out = quantizer(x).detach()  # initialises from x
    if quantizer.kind == "weight":
        _, scale, offset = quantizer.weight_codes(x)
        view = [-1] + [1] * (x.dim() - 1)
        scale, offset = scale.view(view), offset.view(view)
    else:
        grid = quantizer.activation_grid()
        scale, offset = grid["scale"], grid["offset"]
    return (out - offset) / scale, quantizer.q_min, quantizer.q_max


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind, channels", [("weight", None), ("weight", 6), ("activation", None)])
def test_outputs_lie_on_the_grid_for_every_bit_width(name, bits, kind, channels):
    torch.manual_seed(bits)
    x = torch.randn(6, 4, 3, 3) * 2
    quantizer = make_quantizer(name, bits, kind, channels)
    k, q_min, q_max = grid_of(quantizer, x)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.min() >= q_min - 1e-3 and k.max() <= q_max + 1e-3
    assert q_max - q_min <= 2**bits - 1
    levels = len(torch.unique(k.round()))
    # 216 Gaussian values reach a good part of the grid (a collapsed grid would not).
    assert min(2**bits // 2, 64) <= levels <= 2**bits


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_learnable_quantizer_parameter_gets_a_gradient(name, per_channel):
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), name, 3, 3, per_channel)
    linear = QuantLinear.from_float(nn.Linear(4, 2), name, 4, 4, per_channel)
    x = torch.randn(8, 3, 5, 5) * 2

    def forward(x):
        return linear(torch.relu(conv(x)).mean(dim=(2, 3)))

    forward(x)  # initialises the quantizers from this batch
    out = forward(3 * x)  # wider than the first batch: some values are clipped
    (out * torch.randn_like(out)).sum().backward()
    parameters = [(f"{layer}.{n}", p) for layer, module in (("conv", conv), ("linear", linear))
                  for n, p in module.named_parameters() if "quantizer" in n]
    expected = {"lsq+": {"weight_quantizer.scale", "input_quantizer.scale",
                         "input_quantizer.offset"},
                "pact": {"input_quantizer.alpha"},
                "dsq": {f"{q}_quantizer.{p}" for q in ("weight", "input")
                        for p in ("lower", "upper", "alpha")}}[name]
    assert {n.split(".", 1)[1] for n, _ in parameters} == expected
    for n, p in parameters:
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert conv.weight.grad.abs().sum() > 0 and linear.weight.grad.abs().sum() > 0
    if per_channel and name != "pact":
        assert conv.weight_quantizer.state_dict()[
            "scale" if name == "lsq+" else "lower"].shape == (4,)


# Full precision and the first/last layer policy --------------------------------------------------


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def bits_of(model):
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    def bits(q):
        return q.bits if isinstance(q, FakeQuantizer) else None
    return ([bits(m.weight_quantizer) if hasattr(m, "weight_quantizer") else "float"
             for m in layers],
            [bits(m.input_quantizer) if hasattr(m, "input_quantizer") else "float"
             for m in layers])


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_full_precision_activations_with_low_bit_weights(name):
    model = quantize_model(small_net(), weight_bits=2, act_bits=None, quantizer=name)
    # First/last at 8-bit weights; a full-precision body keeps full-precision activations there.
    assert bits_of(model) == ([8, 2, 2, 8], [None, None, None, None])
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 3)
    assert bits_of(quantize_model(small_net(), 3, 32, quantizer=name))[1] == [None] * 4


def test_first_last_policy_is_configurable():
    model = quantize_model(small_net(), weight_bits=4, act_bits=3, first_last_bits=None)
    assert bits_of(model) == (["float", 4, 4, "float"], ["float", 3, 3, "float"])
    assert type(model[0]) is nn.Conv2d and type(model[-1]) is nn.Linear
    model = quantize_model(small_net(), weight_bits=8, act_bits=2, first_last_bits=4)
    assert bits_of(model) == ([8, 8, 8, 8], [4, 2, 2, 4])  # never less precise than the body
    model = quantize_model(small_net(), weight_bits=2, act_bits=2, first_last_bits=32)
    assert bits_of(model) == (["float", 2, 2, "float"], ["float", 2, 2, "float"])


@pytest.mark.parametrize("name", ["pact", "dsq"])
def test_two_bit_qat_with_pact_and_dsq_learns_digits(name, small_train, digits):
    """The recipe that trains the LSQ+ fixture model (conftest) also trains these at W2A2:
    the gradients reach the weights through DoReFa/PACT and DSQ's soft staircase."""
    spec = ModelSpec(quantizer=name, weight_bits=2, act_bits=2, train=TrainConfig(epochs=8))
    model = train_model(spec.build(), small_train, spec.train, progress=False)
    assert accuracy(model, digits.test) >= 85.0
