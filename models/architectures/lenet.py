"""LeNet-300-100 and LeNet-5 (Caffe variant) for 28x28 grey images (MNIST).

These are the two MNIST networks of the pruning and quantization literature (LeCun et al.
1998; Han et al. 2015):

* LeNet-300-100: fully connected 784-300-100-10 with ReLU; 266,610 parameters.
* LeNet-5-Caffe: conv 5x5 (20) - max-pool 2 - conv 5x5 (50) - max-pool 2 - fc 800-500 - fc
  500-10, ReLU after each conv and the first fc; 431,080 parameters.

Counts are for 10 classes and 1 input channel.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.architectures.init import init_weights
from models.registry import register_model
from models.spec import DataSpec

MNIST_SPEC = DataSpec(
    channels=1,
    size=28,
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    augment=False,
)


class LeNet300(nn.Module):
    """LeNet-300-100: a 3-layer perceptron that flattens its ``(N, C, 28, 28)`` input itself."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, size: int = 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_channels * size * size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = self.relu1(self.fc1(self.flatten(x)))
        out = self.relu2(self.fc2(out))
        return self.fc3(out)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example: two 5x5 convs (20, 50) and two linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        # No BN here, so the convs keep their biases.
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, 28, 28)``."""
        out = self.pool1(self.relu1(self.conv1(x)))
        out = self.pool2(self.relu2(self.conv2(out)))
        out = self.relu3(self.fc1(self.flatten(out)))
        return self.fc2(out)


@register_model(
    "lenet300",
    MNIST_SPEC,
    description="LeNet-300-100 (fully connected 784-300-100-10, ReLU); 266,610 parameters",
)
def lenet300(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-300-100: 266,610 parameters with 10 classes and 1 input channel."""
    return LeNet300(num_classes=num_classes, in_channels=in_channels)


@register_model(
    "lenet5",
    MNIST_SPEC,
    description="LeNet-5-Caffe (conv20-pool-conv50-pool-fc500-fc); 431,080 parameters",
)
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5-Caffe: 431,080 parameters with 10 classes and 1 input channel."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
