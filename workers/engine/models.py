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
- "resnet18-qmul-public": the quantized ResNet-18 of the Q-MUL authors' public code, the model
  behind the paper's Table 1 (QMulPublicResNet18). It fixes its own quantization layout
  (`quantize_layout`, which build_model calls instead of quantize_model).
- "vit-tiny": a vision transformer for 32x32 images with DeiT-Tiny's width and depth (4x4 patches,
  so 64 patch tokens and a CLS token; width 192, 12 blocks of 3 heads, MLP ratio 4); 5.4M
  parameters, about 0.37G multiply-adds per image.
- "vit-mini": the same transformer narrower and shallower for the CPU benchmark preset (4x4
  patches, width 96, 6 blocks of 3 heads, MLP ratio 2); 0.46M parameters, about 34M multiply-adds.
- "digits-vit": the same transformer sized for the 8x8 digits and the tests (2x2 patches, width 64,
  4 blocks of 4 heads, MLP ratio 2); about 0.14M parameters.

The transformers are quantized like the CNNs: every Linear (qkv, projection, MLP, head) and the
patch embedding (a Conv2d) become QuantLinear/QuantConv2d, the patch embedding and the head being
the first and last layers; the two products of activations in each attention (q k^T and
attention times values) are MatMul modules, whose operands quantize_model quantizes at act_bits.
LayerNorm, GELU, the softmax and the residual sums stay float, as BatchNorm and ReLU do in the CNNs.
"""

import torch
from torch import nn

from .quantization import MatMul, QuantConv2d, more_precise, quantize_model
from .spm import SemiParametricClassifier, SPMOptions


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


class LearnableBias(nn.Module):
    """A learned per-channel offset added to the input (zero at first): ReActNet's "move", which
    shifts a distribution before a PReLU or a quantizer."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


def react_activation(channels: int) -> nn.Sequential:
    """Bias, PReLU, bias: the activation of a ReActNet-style block, where the plain ReLU would be."""
    return nn.Sequential(LearnableBias(channels), nn.PReLU(channels), LearnableBias(channels))


class ReActBasicBlock(nn.Module):
    """ResNet basic block in the ReActNet style: each 3x3 convolution is preceded by bias-PReLU-bias
    (no ReLU), and the residual sum is followed by another; the shortcut (identity, or a 1x1
    convolution and BatchNorm where the shape changes) reads the block's input."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.act1 = react_activation(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act2 = react_activation(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.act3 = react_activation(channels)

    def forward(self, x):
        out = self.bn1(self.conv1(self.act1(x)))
        out = self.bn2(self.conv2(self.act2(out)))
        return self.act3(out + self.shortcut(x))


class QMulPublicResNet18(nn.Module):
    """The quantized ResNet-18 of the Q-MUL authors' public code (its "4-bit" model is W4A8).

    A float 3x3 stride-1 stem conv, BatchNorm and ReLU; four stages of two ReActBasicBlocks at
    width, 2, 4 and 8 times width (strides 1, 2, 2, 2); global average pooling (the code's 4x4
    average pool on 32x32 inputs) and a float linear classifier. Only the blocks' 3x3
    convolutions are quantized (quantize_layout): their weights at weight_bits, their inputs at
    BLOCK_ACT_BITS, as the code hard-codes 8 for its block activations whatever its bit width. The
    stem, the 1x1 shortcuts and the classifier stay float.

    The engine's quantizers stand in for the code's LSQ: with "lsq+", weights on the same signed
    grid with the same gradient scale (initialised from mean +- 3 std instead of 2 mean|w| /
    sqrt(Qp)), and inputs with LSQ+'s learned offset, which the code's activations do not have.
    width: 64 is ResNet-18; fewer channels make a model small enough to test on a CPU.
    """

    BLOCK_ACT_BITS = 8

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, previous = [], width
        for stage, stride in enumerate([1, 2, 2, 2]):
            channels = width * 2**stage
            stages.append(nn.Sequential(ReActBasicBlock(previous, channels, stride),
                                        ReActBasicBlock(channels, channels)))
            previous = channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.stages(self.stem(x))))

    def quantize_layout(self, weight_bits, act_bits, quantizer="lsq+", per_channel=False,
                        first_last_bits=None) -> "QMulPublicResNet18":
        """Quantize the blocks' 3x3 convolutions in place: weights at weight_bits, inputs at
        BLOCK_ACT_BITS or act_bits where that is more precise (None: float). first_last_bits is
        not used: the layout keeps the stem and the classifier float."""
        block_act_bits = more_precise(self.BLOCK_ACT_BITS, act_bits)
        for block in self.modules():
            if isinstance(block, ReActBasicBlock):
                for name in ("conv1", "conv2"):
                    conv = getattr(block, name)
                    setattr(block, name, QuantConv2d.from_float(
                        conv, quantizer, weight_bits, block_act_bits, per_channel))
        return self


class Attention(nn.Module):
    """Multi-head self-attention. The CLS row of the attention map can be kept for the caller
    (keep_attention), which is what LetheViT reads to pick the most-attended patches."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scores = MatMul()  # q k^T
        self.mix = MatMul()  # attention times values
        self.proj = nn.Linear(dim, dim)
        self.keep_attention = False
        self.cls_attention: torch.Tensor | None = None  # (batch, heads, patches) when kept

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = (self.scores(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.keep_attention:
            self.cls_attention = attention[:, :, 0, 1:].detach()
        return self.proj(self.mix(attention, v).transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier (Dosovitskiy et al. 2020) in DeiT's form, without distillation token: a
    patch embedding (a Conv2d with kernel and stride patch_size), a learned CLS token and learned
    position embeddings, pre-norm blocks, a final LayerNorm and a linear head on the CLS token.
    No dropout or stochastic depth: they would draw from the global RNG, which the seeded recipes
    do not control (as MobileNetV2's dropout is left out). Takes image_size x image_size inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: int = 4):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)  # registered last: quantize_model's last layer
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (batch, grid^2, dim)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), patches], dim=1)
        tokens = self.norm(self.blocks(tokens + self.position_embedding))
        return self.head(tokens[:, 0])

    def cls_attention(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """How much the CLS token attends to each patch in block `layer` (index into the blocks,
        -1 the last), averaged over the heads: (batch, grid, grid), rows of the image's patches.
        Runs a forward pass in the model's current mode."""
        attention = self.blocks[layer].attention
        attention.keep_attention = True
        try:
            self(x)
            kept = attention.cls_attention
        finally:
            attention.keep_attention, attention.cls_attention = False, None
        return kept.mean(dim=1).view(len(x), self.grid, self.grid)


def vit_tiny(num_classes: int = 10, in_channels: int = 3) -> VisionTransformer:
    """DeiT-Tiny's width and depth on 32x32 images in 4x4 patches (module docstring)."""
    return VisionTransformer(num_classes, in_channels, image_size=32, patch_size=4, dim=192, depth=12, heads=3,
                             mlp_ratio=4)


def vit_mini(num_classes: int = 10, in_channels: int = 3) -> VisionTransformer:
    """A ViT for 32x32 images small enough for the CPU benchmark preset (module docstring)."""
    return VisionTransformer(num_classes, in_channels, image_size=32, patch_size=4, dim=96, depth=6, heads=3,
                             mlp_ratio=2)


def digits_vit(num_classes: int = 10, in_channels: int = 1) -> VisionTransformer:
    """A small ViT for the 8x8 digits (module docstring)."""
    return VisionTransformer(num_classes, in_channels, image_size=8, patch_size=2, dim=64, depth=4, heads=4,
                             mlp_ratio=2)


MODELS = {
    "digits-cnn": DigitsCNN,
    "cifar-cnn": CifarCNN,
    "resnet18": cifar_resnet18,
    "mobilenetv2": cifar_mobilenet_v2,
    "resnet18-qmul-public": QMulPublicResNet18,
    "vit-tiny": vit_tiny,
    "vit-mini": vit_mini,
    "digits-vit": digits_vit,
}
# The architectures with a CLS token whose attention a method can read (VisionTransformer.cls_attention).
VISION_TRANSFORMERS = ("vit-tiny", "vit-mini", "digits-vit")


def build_model(
    architecture: str,
    num_classes: int,
    in_channels: int,
    weight_bits: int | None,
    act_bits: int | None,
    quantizer: str = "lsq+",
    per_channel: bool = False,
    first_last_bits: int | None = 8,
    spm: dict | None = None,
) -> nn.Module:
    """A freshly initialised, fake-quantized model. Bits None (or 32) mean full precision; the
    first and last layers follow first_last_bits (see quantization.quantize_model). An
    architecture with a quantize_layout method (resnet18-qmul-public) decides itself which layers
    it quantizes. spm (SPMOptions as a dict): a semi-parametric model whose encoder is the
    architecture emitting an embedding of spm["embed_dim"] values instead of class scores, with an
    empty datastore (spm.py)."""
    if architecture not in MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(MODELS)}")
    if spm is not None:
        options = SPMOptions(**spm)
        encoder = build_model(architecture, options.embed_dim, in_channels, weight_bits, act_bits, quantizer,
                              per_channel, first_last_bits)
        return SemiParametricClassifier(encoder, num_classes, options)
    model = MODELS[architecture](num_classes=num_classes, in_channels=in_channels)
    if hasattr(model, "quantize_layout"):  # an architecture that fixes which layers are quantized
        model = model.quantize_layout(weight_bits, act_bits, quantizer, per_channel, first_last_bits)
    else:
        model = quantize_model(model, weight_bits, act_bits, first_last_bits, quantizer, per_channel)
    # Channels-last (NHWC) weights: convolutions then run on NHWC activations, 20 to 25% faster per
    # epoch on the CPU's oneDNN kernels (docs/performance.md). Moves, copies and loaded state dicts
    # keep the layout; artifacts are written in the standard layout (artifacts.save_artifact).
    return model.to(memory_format=torch.channels_last)
