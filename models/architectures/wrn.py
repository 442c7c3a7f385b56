"""Wide ResNet WRN-16-4 for 32x32 inputs (CIFAR), after Zagoruyko & Komodakis 2016.

Depth 16 gives (16 - 4) / 6 = 2 pre-activation blocks per group; widening factor 4 gives
widths 16 (stem), 64, 128, 256 with strides 1, 2, 2. Each block is BN-ReLU-conv3x3-BN-ReLU-
(dropout)-conv3x3; where the shape changes the shortcut is a 1x1 conv applied to the
pre-activated input (as in the reference implementation). A final BN-ReLU, global average
pooling and one linear layer close the network. Dropout is 0 by default.
With 10 classes and 3 input channels WRN-16-4 has 2,748,890 parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.architectures.cifar_resnet import CIFAR10_SPEC
from models.architectures.init import init_weights
from models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Block output for ``x``."""
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # The projection sees the pre-activated input; the identity sees the raw one.
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: a 3x3 stem and three groups of :class:`WideBasicBlock`."""

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks: list[nn.Module] = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        return self.fc(self.flatten(self.avgpool(out)))


@register_model(
    "wrn16_4",
    CIFAR10_SPEC,
    description="WideResNet-16-4 (pre-activation, widths 16/64/128/256); 2.75M parameters",
)
def wrn16_4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """WRN-16-4, no dropout: 2,748,890 parameters with 10 classes and 3 input channels."""
    return WideResNet(16, 4, num_classes=num_classes, in_channels=in_channels, dropout=0.0)
