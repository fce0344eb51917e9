"""Classifier architectures, built float and then quantized for QAT."""

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


MODELS = {"digits-cnn": DigitsCNN}


def build_model(
    architecture: str,
    num_classes: int,
    in_channels: int,
    weight_bits: int,
    act_bits: int,
    quantizer: str = "lsq+",
) -> nn.Module:
    """A freshly initialised, fake-quantized model (first and last layer at 8 bits)."""
    if architecture not in MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(MODELS)}")
    model = MODELS[architecture](num_classes=num_classes, in_channels=in_channels)
    return quantize_model(model, weight_bits, act_bits, quantizer=quantizer)
