"""Import shims for environments with mismatched binary builds.

PyPI's torchvision wheels are CUDA builds. Next to a CPU-only torch (as on CI machines with no
GPU) their compiled ops fail to load, and torchvision 0.28 then crashes at import while
registering fake kernels for ``torchvision::nms`` / ``torchvision::qnms``. timm needs only
torchvision's pure-Python transforms, so when (and only when) the compiled ops cannot load we
declare those two operator schemas first; torchvision then imports without its compiled ops.
On a cluster with a matching CUDA torch/torchvision pair this is a no-op.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` (and so ``import timm``) work when its compiled ops cannot load."""
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return
    except OSError as err:
        log.info("torchvision compiled ops unavailable (%s); using its Python parts only", err)
    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{name}", schema)
