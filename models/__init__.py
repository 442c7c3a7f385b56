"""Architectures, datasets, the device-resident loader, the one training loop and baselines."""

from __future__ import annotations

from models.errors import DataNotFoundError, UnknownNameError, UserError
from models.registry import create_model, get_model_info, list_models, register_model
from models.spec import DataSpec

__all__ = [
    "DataNotFoundError",
    "DataSpec",
    "UnknownNameError",
    "UserError",
    "create_model",
    "get_model_info",
    "list_models",
    "register_model",
]
