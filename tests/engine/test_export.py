"""Integer export: bit packing, the packed size, and the rebuilt inference model's outputs against
the fake-quantized model's, for every quantizer, bit width and weight granularity."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.engine import (
    build_model,
    export_integer,
    integer_model,
    load_integer_model,
    save_integer_artifact,
)
from workers.engine.export import export_weight_bytes, pack_bits, unpack_bits
from workers.engine.quantization import QuantConv2d, QuantLinear

# The rebuilt model repeats the fake-quantized forward operation for operation; it is held to
# this relative tolerance on the logits (and is bit-identical in practice, on one machine).
RTOL = 1e-5


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_and_size(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=1001)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_pack_layout_is_little_endian():
    assert pack_bits(np.array([0x3, 0xA]), 4).tolist() == [0xA3]  # two 4-bit codes per byte
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # Eight 3-bit codes in three bytes: 1, 7, 0... -> bits 100 111 000 ... (LSB first).
    assert pack_bits(np.array([1, 7, 0, 0, 0, 0, 0, 0]), 3).tolist() == [0b00111001, 0, 0]
    with pytest.raises(ValueError):
        pack_bits(np.array([16]), 4)


def trained(quantizer, bits, per_channel, architecture="cifar-cnn", steps=2, act_bits="same"):
    """A model whose quantizer parameters have moved away from their initial values."""
    torch.manual_seed(bits)
    kwargs = {"architecture": architecture, "num_classes": 10, "in_channels": 3,
              "weight_bits": bits, "act_bits": bits if act_bits == "same" else act_bits,
              "quantizer": quantizer, "per_channel": per_channel}
    model = build_model(**kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), kwargs


def assert_same_outputs(model, rebuilt, x):
    with torch.no_grad():
        expected, got = model(x), rebuilt(x)
    scale = expected.abs().max()
    assert scale > 0
    assert (got - expected).abs().max() <= RTOL * scale
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


@pytest.mark.parametrize("quantizer", ["lsq+", "pact", "dsq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_model_matches_the_fake_quantized_model(quantizer, bits, per_channel):
    model, kwargs = trained(quantizer, bits, per_channel)
    exported = export_integer(model)
    rebuilt = integer_model(exported, **kwargs)
    assert_same_outputs(model, rebuilt, torch.randn(16, 3, 16, 16))
    assert not any(p.requires_grad for p in rebuilt.parameters())

    # Body layers at `bits`, first and last at 8; each packs into exactly ceil(n * b / 8) bytes.
    layers = exported["layers"]
    names = list(layers)
    for name, entry in layers.items():
        expected_bits = 8 if name in (names[0], names[-1]) else bits
        assert entry["weight"]["bits"] == expected_bits
        n = math.prod(entry["shape"])
        assert entry["weight"]["packed"].numel() == math.ceil(n * expected_bits / 8)
        assert entry["weight"]["scale"].numel() == (entry["shape"][0] if per_channel else 1)
        assert entry["input"]["bits"] == expected_bits
    assert not any("quantizer" in key for key in exported["float_state"])
    assert any("running_mean" in key for key in exported["float_state"])  # BatchNorm travels


@pytest.mark.parametrize("quantizer", ["lsq+", "pact", "dsq"])
def test_full_precision_activations_and_float_edge_layers_export(quantizer):
    model, kwargs = trained(quantizer, 2, False, act_bits=None)
    exported = export_integer(model)
    assert all(entry["input"] is None for entry in exported["layers"].values())
    assert_same_outputs(model, integer_model(exported, **kwargs), torch.randn(8, 3, 16, 16))

    torch.manual_seed(0)
    kwargs = {**kwargs, "act_bits": 4, "first_last_bits": None}
    model = build_model(**kwargs)
    model(torch.randn(8, 3, 16, 16))  # calibrates the activation quantizers
    model.eval()
    exported = export_integer(model)
    assert "features.0.weight" in exported["float_state"]  # the float first layer
    assert "features.0" not in exported["layers"]
    assert_same_outputs(model, integer_model(exported, **kwargs), torch.randn(8, 3, 16, 16))


def test_resnet18_packs_to_about_bits_over_32():
    model = build_model("resnet18", 10, 3, weight_bits=4, act_bits=4)
    model.eval()(torch.randn(1, 3, 16, 16))  # calibrates the activation quantizers
    exported = export_integer(model)
    packed, fp32 = export_weight_bytes(exported)
    # 11.2M weights: the 8-bit stem conv and classifier are 0.07% of them.
    assert fp32 == 4 * sum(m.weight.numel() for m in model.modules()
                           if isinstance(m, (QuantConv2d, QuantLinear)))
    assert 4 / 32 <= packed / fp32 <= 4 / 32 * 1.01


def test_integer_artifact_round_trip(tmp_path):
    model, kwargs = trained("dsq", 3, True, steps=1)
    spec = {"model": kwargs, "note": "export test"}
    path, sha256 = save_integer_artifact(model, spec, tmp_path)
    assert path == tmp_path / f"{sha256}.int.pt"
    assert save_integer_artifact(model, spec, tmp_path) == (path, sha256)  # content-addressed
    rebuilt, loaded_spec = load_integer_model(path)
    assert loaded_spec == spec
    assert_same_outputs(model, rebuilt, torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="sha256"):
        load_integer_model(path, expected_sha256="0" * 64)


def test_export_refuses_what_it_cannot_describe():
    model = build_model("cifar-cnn", 10, 3, 4, 4)  # activation quantizers never ran
    with pytest.raises(RuntimeError, match="never run"):
        export_integer(model)
    trained_model, kwargs = trained("lsq+", 4, False, steps=1)
    exported = export_integer(trained_model)
    with pytest.raises(ValueError, match="shape"):
        integer_model(exported, **{**kwargs, "num_classes": 7})
    with pytest.raises(ValueError, match="format"):
        integer_model({**exported, "format": "other"}, **kwargs)
