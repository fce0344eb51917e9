"""The model registry: output shapes on 32x32 inputs, the CIFAR adaptations of torchvision's
ResNet-18 and MobileNetV2, quantization by build_model, and ModelSpec's stored form."""

import pytest
import torch
from torch import nn

from workers.engine import MODELS, ModelSpec, TrainConfig, build_model, export_integer, integer_model
from workers.engine.models import LearnableBias, QMulPublicResNet18, ReActBasicBlock, VisionTransformer
from workers.engine.quantization import FakeQuantizer, LsqPlusQuantizer, MatMul, QuantConv2d, QuantLinear, QuantMatMul


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


# Models quantized by quantize_model; those with a quantize_layout of their own are tested below.
UNIFORM_MODELS = sorted(name for name, build in MODELS.items() if not hasattr(build, "quantize_layout"))


@pytest.mark.parametrize("name", UNIFORM_MODELS)
def test_every_model_quantized_output_shape(name):
    size, channels = (8, 1) if name.startswith("digits-") else (32, 3)
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


def test_qmul_public_resnet18_quantizes_only_the_block_convolutions():
    torch.manual_seed(0)
    model = QMulPublicResNet18(num_classes=10, in_channels=3, width=4).quantize_layout(4, 4)
    blocks = [m for m in model.modules() if isinstance(m, ReActBasicBlock)]
    assert len(blocks) == 8
    quantized = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert quantized == [conv for block in blocks for conv in (block.conv1, block.conv2)]
    assert all(conv.kernel_size == (3, 3) for conv in quantized)
    assert {conv.weight_quantizer.bits for conv in quantized} == {4}
    assert {conv.input_quantizer.bits for conv in quantized} == {8}  # A8 whatever act_bits says
    assert all(isinstance(conv.weight_quantizer, LsqPlusQuantizer) for conv in quantized)
    floats = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    shortcuts = [block.shortcut[0] for block in blocks if len(block.shortcut)]
    assert floats == [model.stem[0], *shortcuts, model.classifier]
    assert len(shortcuts) == 3 and all(conv.kernel_size == (1, 1) for conv in shortcuts)
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 3 * 8
    assert sum(isinstance(m, LearnableBias) for m in model.modules()) == 6 * 8
    assert not any(isinstance(m, nn.ReLU) for block in blocks for m in block.modules())
    assert spatial_sizes(model, torch.randn(1, 3, 32, 32), nn.Conv2d)[-1] == 4


def test_qmul_public_resnet18_trains_a_step():
    torch.manual_seed(0)
    model = QMulPublicResNet18(num_classes=10, in_channels=3, width=4).quantize_layout(4, 4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    named = dict(model.named_parameters())
    for name in ["stages.0.0.act2.1.weight", "stages.0.0.act1.0.bias", "stages.3.1.act3.2.bias",
                 "stages.1.0.conv1.weight_quantizer.scale", "stages.1.0.conv1.input_quantizer.offset",
                 "stem.0.weight", "classifier.weight"]:
        assert not torch.equal(named[name], before[name]), name


def test_qmul_public_resnet18_by_name_bits_and_integer_export():
    torch.manual_seed(0)
    model = build_model("resnet18-qmul-public", 10, 3, weight_bits=4, act_bits=None)
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.3e6
    quantized = quant_layers(model)
    assert len(quantized) == 16 and all(isinstance(m.input_quantizer, nn.Identity) for m in quantized)
    model = build_model("resnet18-qmul-public", 10, 3, weight_bits=4, act_bits=4)
    # Channels-last input, as the model's weights: both run the same kernels. (Other kernels add in
    # another order and move values on a rounding tie of the 8-bit grids: test_export.py.)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x)  # initialises the quantizers
    model.eval()
    with torch.no_grad():
        expected = model(x)
    # PReLU and the learnable biases travel as float state; the logits come back unchanged.
    rebuilt = integer_model(export_integer(model), "resnet18-qmul-public", 10, 3)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("quantizer", ["lsq+", "pact", "dsq"])
def test_vit_quantizes_every_linear_and_both_products_of_each_attention(quantizer):
    model = build_model("digits-vit", 10, 1, weight_bits=3, act_bits=4, quantizer=quantizer)
    layers = quant_layers(model)
    # The patch embedding, per block qkv, projection and two MLP layers, and the head.
    assert len(layers) == 1 + 4 * 4 + 1
    assert layers[0] is model.patch_embedding and layers[-1] is model.head
    assert [layers[0].weight_quantizer.bits, layers[-1].weight_quantizer.bits] == [8, 8]
    assert {(m.weight_quantizer.bits, m.input_quantizer.bits) for m in layers[1:-1]} == {(3, 4)}
    products = [m for m in model.modules() if isinstance(m, MatMul)]
    assert len(products) == 2 * 4 and all(isinstance(m, QuantMatMul) for m in products)
    assert {(m.a_quantizer.bits, m.b_quantizer.bits) for m in products} == {(4, 4)}
    x = torch.rand(16, 1, 8, 8)
    out = model(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    out.sum().backward()  # gradients reach the products' quantizers
    assert all(p.grad is not None for m in products for p in m.parameters())

    # Full-precision activations: the products stay float, the weights are still quantized.
    float_acts = build_model("digits-vit", 10, 1, weight_bits=3, act_bits=None, quantizer=quantizer)
    assert all(type(m) is MatMul for m in float_acts.modules() if isinstance(m, MatMul))
    assert all(isinstance(m.input_quantizer, nn.Identity) for m in quant_layers(float_acts)[1:-1])


def test_vit_cls_attention_is_a_distribution_over_the_patches():
    torch.manual_seed(0)
    model = build_model("digits-vit", 10, 1, 4, 4).eval()
    x = torch.rand(5, 1, 8, 8)
    for layer in (0, -1):
        attention = model.cls_attention(x, layer)
        assert attention.shape == (5, 4, 4)  # 2x2 patches of an 8x8 image
        # The CLS row also attends to the CLS token itself: the patches' share is at most 1.
        assert (attention >= 0).all() and (attention.sum(dim=(1, 2)) <= 1 + 1e-6).all()
    assert all(block.attention.cls_attention is None for block in model.blocks)  # nothing kept after
    with pytest.raises(ValueError, match="multiple"):
        VisionTransformer(image_size=30, patch_size=4)


def test_vit_tiny_has_deit_tiny_width_and_depth():
    model = MODELS["vit-tiny"]()
    assert len(model.blocks) == 12 and model.head.in_features == 192
    assert model.blocks[0].attention.heads == 3 and model.position_embedding.shape == (1, 65, 192)
    assert 5.3e6 < sum(p.numel() for p in model.parameters()) < 5.5e6
