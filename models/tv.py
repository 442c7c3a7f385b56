"""The one place torchvision is imported.

The torchvision wheel on some machines is a CUDA build while torch is a CPU build; its C++ ops
(``torchvision::nms`` and friends) then cannot load and ``import torchvision`` dies with
``operator torchvision::nms does not exist`` because its Python side registers fake kernels for
ops whose schemas were never defined. Defining those schemas first lets models, transforms and
dataset classes import; nms/deform_conv2d stay unusable, and nothing here needs them. Where the
extension loads (matching builds), nothing is touched.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

# Schemas torchvision registers fake kernels for at import time, unconditionally.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it undefines the ops


def _extension_loads(package_dir: str) -> bool:
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd")
    ):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            return False
    return False


@cache
def import_torchvision() -> ModuleType:
    """Import and return torchvision, defining its missing op schemas first when needed."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed; pip install torchvision")
    package_dir = spec.submodule_search_locations[0]
    if not _extension_loads(package_dir) and not hasattr(torch.ops.torchvision, "nms"):
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
    import torchvision

    return torchvision
