"""Classifier architectures, built float and then quantized for QAT.

MODELS maps a name to a constructor `(num_classes, in_channels) -> nn.Module`; `build_model`
builds one and replaces its Conv2d/Linear layers by fake-quantized ones. All CIFAR models take
32x32 inputs (any size works: they end in global average pooling); the digits CNN takes 8x8.

- "digits-cnn": two 3x3 convs, a pool and two linear layers (8x8 inputs, about 0.15M parameters).
- "cifar-cnn": a small VGG-style net for CPU benchmarks: four conv-BN-ReLU stages
  (16-32-64-128 channels, max-pooling after each of the first three), global average pooling and
  a linear classifier; about 0.1M parameters and 4M multiply-adds per 32x32 image.
- "resnet18": torchvision's ResNet-18 in its CIFAR form (the SalUn / l1-sparse reference): a
  3x3 stride-1 stem conv, no max-pool, so the four stages run at 32, 16, 8 and 4 pixels; 11.2M
  parameters, 0.56G multiply-adds per image.
- "mobilenetv2": torchvision's MobileNetV2 with CIFAR strides (stem conv and the second stage at
  stride 1, total stride 8 instead of 32) and without dropout (dropout would draw from the global
  RNG, which the seeded recipes do not control); 2.2M parameters, 0.1G multiply-adds.
"""

import torch
from torch import nn

from .quantization import quantize_model


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digit images: two 3x3 convs, a 2x2 pool and two fully connected layers.

    BatchNorm sits only after the convs, where each channel has 8x8 values per sample, so a batch
    of one still has statistics to normalise with.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CifarCNN(nn.Module):
    """Small VGG-style CNN for 32x32 images, cheap enough to train on a CPU (module docstring).

    Each pooling halves the resolution before the next, wider conv, so every conv costs about the
    same; the widths and the pooling, not the parameter count, set the CPU time.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, previous = [], in_channels
        for stage, channels in enumerate(widths):
            layers += conv_bn_relu(previous, channels)
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# torchvision's setting (expansion t, channels c, blocks n, first stride s) with the second
# stage's stride 2 -> 1, as in the usual CIFAR adaptation: with the stem at stride 1 as well,
# 32x32 inputs reach the last stages at 4x4.
MOBILENET_V2_CIFAR = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def cifar_mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNetV2 with CIFAR strides and no dropout (module docstring)."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(
        weights=None, num_classes=num_classes, inverted_residual_setting=MOBILENET_V2_CIFAR,
        dropout=0.0,
    )
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1,
                                     bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    model.classifier = nn.Sequential(model.classifier[1])  # drop the (p=0) Dropout module
    return model


MODELS = {
    "digits-cnn": DigitsCNN,
    "cifar-cnn": CifarCNN,
    "resnet18": cifar_resnet18,
    "mobilenetv2": cifar_mobilenet_v2,
}


def build_model(
    architecture: str,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None,
    act_bits: int | None,
    quantizer: str = "lsq+",
    per_channel: bool = False,
    first_last_bits: int | None = 8,
) -> nn.Module:
    """A freshly initialised, fake-quantized model. Bits None (or 32) mean full precision; the
    first and last layers follow first_last_bits (see quantization.quantize_model)."""
    if architecture not in MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(MODELS)}")
    model = MODELS[architecture](num_classes=num_classes, in_channels=in_channels)
    model = quantize_model(model, weight_bits, act_bits, first_last_bits, quantizer, per_channel)
    # Channels-last (NHWC) weights: convolutions then run on NHWC activations, 20 to 25% faster per
    # epoch on the CPU's oneDNN kernels (docs/performance.md). Moves, copies and loaded state dicts
    # keep the layout; artifacts are written in the standard layout (artifacts.save_artifact).
    return model.to(memory_format=torch.channels_last)
