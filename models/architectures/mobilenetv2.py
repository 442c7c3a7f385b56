"""MobileNetV2 for 32x32 inputs (CIFAR), after Sandler et al. 2018 and the common CIFAR variant
(kuangliu/pytorch-cifar).

Differences from the ImageNet model: the stem is a stride-1 3x3 conv (32 channels) and the
second stage (24 channels) has stride 1, so the final feature map is 4x4. Every block has the
1x1 expansion conv (even with expansion 1); stride-1 blocks add a shortcut, which is a 1x1 conv
+ BN where the channel count changes. A 1x1 conv to 1280 channels, global average pooling and
one linear layer close the network. Activations are ReLU6.
With 10 classes and 3 input channels it has 2,296,922 parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.architectures.cifar_resnet import CIFAR10_SPEC
from models.architectures.init import init_weights
from models.registry import register_model

# (expansion, out_planes, num_blocks, stride) per stage.
CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a shortcut at stride 1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(
            hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU6()
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Block output for ``x``; a plain Python branch on ``stride``, so fx-traceable."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + self.shortcut(x)
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 built from :data:`CIFAR_CFG`."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        cfg: tuple[tuple[int, int, int, int], ...] = CIFAR_CFG,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU6()
        blocks: list[nn.Module] = []
        in_planes = 32
        for expansion, out_planes, num_blocks, stride in cfg:
            for i in range(num_blocks):
                blocks.append(
                    InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1)
                )
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.flatten(self.avgpool(out)))


@register_model(
    "mobilenetv2",
    CIFAR10_SPEC,
    description="CIFAR MobileNetV2 (stride-1 stem and second stage, ReLU6); 2.30M parameters",
)
def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR MobileNetV2: 2,296,922 parameters with 10 classes and 3 input channels."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels)
