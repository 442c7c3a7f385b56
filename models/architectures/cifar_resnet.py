"""ResNet-18 for 32x32 inputs (CIFAR), as in He et al. 2016 adapted to small images.

Stem: 3x3 conv (64 channels, stride 1) + BN + ReLU, no max-pool; four stages of two
:class:`BasicBlock` each (64, 128, 256, 512 channels; stride 1, 2, 2, 2) with 1x1 conv + BN
projection shortcuts where the shape changes; global average pooling; one linear layer.
With 10 classes and 3 input channels it has 11,173,962 parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.architectures.init import init_weights
from models.registry import register_model
from models.spec import DataSpec

CIFAR10_SPEC = DataSpec(
    channels=3,
    size=32,
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augment=True,
)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output for ``x``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, stride 1, no max-pool) and :class:`BasicBlock` stages."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.avgpool(out)))


@register_model(
    "resnet18",
    CIFAR10_SPEC,
    description="CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2,2,2,2]); 11.17M parameters",
)
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-18: 11,173,962 parameters with 10 classes and 3 input channels."""
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@register_model(
    "resnet_mini",
    CIFAR10_SPEC,
    description="Small CIFAR ResNet-10 (BasicBlocks [1,1,1,1], widths 16-128) for tests and quick runs",
)
def resnet_mini(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-10 at a quarter of ResNet-18's width: 308,826 parameters (10 classes)."""
    return CifarResNet((1, 1, 1, 1), num_classes=num_classes, in_channels=in_channels, width=16)
