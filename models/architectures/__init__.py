"""Model architectures; importing this package registers every model with :mod:`models.registry`."""

from __future__ import annotations

from models.architectures import cifar_resnet, digits_cnn, lenet, mobilenetv2, wrn

__all__ = ["cifar_resnet", "digits_cnn", "lenet", "mobilenetv2", "wrn"]
