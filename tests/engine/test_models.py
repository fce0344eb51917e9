"""The model registry: output shapes on 32x32 inputs, the CIFAR adaptations of torchvision's
ResNet-18 and MobileNetV2, quantization by build_model, and ModelSpec's stored form."""

import pytest
import torch
from torch import nn

from workers.engine import MODELS, ModelSpec, TrainConfig, build_model
from workers.engine.quantization import FakeQuantizer, QuantConv2d, QuantLinear


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def spatial_sizes(model, x, layer_type=nn.Conv2d):
    """Output height of every conv, in execution order."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for m in model.modules() if isinstance(m, layer_type)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return sizes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_quantized_output_shape(name):
    size, channels = (8, 1) if name == "digits-cnn" else (32, 3)
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, weight_bits=4, act_bits=4)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    layers = quant_layers(model)
    floats = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert layers and not floats  # every conv and linear layer was replaced
    assert [layers[0].weight_quantizer.bits, layers[-1].weight_quantizer.bits] == [8, 8]
    assert {m.weight_quantizer.bits for m in layers[1:-1]} == {4}
    assert isinstance(layers[-1], QuantLinear) and layers[-1].out_features == 7


def test_cifar_resnet18_has_the_cifar_stem():
    model = MODELS["resnet18"](num_classes=10, in_channels=3)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.2e6
    sizes = spatial_sizes(model, torch.randn(1, 3, 32, 32))
    assert sizes[0] == 32 and sizes[-1] == 4  # stages at 32, 16, 8, 4 pixels
    assert sorted(set(sizes), reverse=True) == [32, 16, 8, 4]


def test_cifar_mobilenet_v2_strides_and_no_dropout():
    model = MODELS["mobilenetv2"](num_classes=10, in_channels=1)
    sizes = spatial_sizes(model, torch.randn(1, 1, 32, 32))
    assert sizes[0] == 32 and sizes[-1] == 4  # total stride 8 instead of torchvision's 32
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_small_cifar_cnn_is_small():
    model = MODELS["cifar-cnn"](num_classes=10, in_channels=3)
    assert 50e3 < sum(p.numel() for p in model.parameters()) < 0.5e6
    assert spatial_sizes(model, torch.randn(1, 3, 32, 32)) == [32, 16, 8, 4]


@pytest.mark.parametrize("quantizer", ["lsq+", "pact", "dsq"])
def test_build_model_applies_quantizer_bits_and_granularity(quantizer):
    model = build_model("mobilenetv2", 10, 3, weight_bits=2, act_bits=None, quantizer=quantizer,
                        per_channel=True)
    layers = quant_layers(model)
    assert {m.weight_quantizer.bits for m in layers[1:-1]} == {2}
    assert all(isinstance(m.input_quantizer, nn.Identity) for m in layers)  # FP activations
    assert all(m.weight_quantizer.channels == m.weight.shape[0] for m in layers)
    assert all(isinstance(m.weight_quantizer, FakeQuantizer) for m in layers)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_model_spec_reads_dicts_stored_before_the_new_fields():
    old = {"architecture": "digits-cnn", "dataset": "digits", "weight_bits": 4, "act_bits": 4,
           "quantizer": "lsq+", "train": {"epochs": 3}}
    spec = ModelSpec.from_dict(old)
    assert spec == ModelSpec(train=TrainConfig(epochs=3))
    assert (spec.per_channel, spec.first_last_bits, spec.data_seed, spec.data_options) == (
        False, 8, 0, {})
    kwargs = spec.model_kwargs()
    assert kwargs == {"architecture": "digits-cnn", "num_classes": 10, "in_channels": 1,
                      "weight_bits": 4, "act_bits": 4, "quantizer": "lsq+",
                      "per_channel": False, "first_last_bits": 8}
    new = ModelSpec(architecture="cifar-cnn", dataset="cifar10", weight_bits=2, act_bits=None,
                    quantizer="pact", per_channel=True, first_last_bits=None,
                    data_options={"train_per_class": 5})
    assert ModelSpec.from_dict(new.to_dict()) == new
    assert new.model_kwargs()["in_channels"] == 3
    assert type(new.build().features[0]) is nn.Conv2d  # first layer left float
