"""Importing the optional `torch` extra's open_clip in tests, skipping cleanly when it is absent."""

import functools
import glob
import importlib.util
import os

import pytest

_TORCHVISION_STUBS = []


def _define_missing_torchvision_ops(torch):
    """Let torchvision import when its C extension cannot load.

    PyPI's torchvision wheels are CUDA builds whose `_C` extension does not load
    next to a CPU-only torch; torchvision 0.28 then fails at import registering
    fake kernels for `nms` / `qnms`, which open_clip never calls. Declaring the
    two operator schemas lets the pure-Python parts open_clip needs import.
    """
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STUBS.append(library)


def _torchvision_extension_loads(torch) -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return True  # nothing to patch; importing open_clip reports what is missing
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        torch.ops.load_library(libraries[0])
    except (OSError, IndexError):
        return False
    return True


def import_open_clip():
    torch = pytest.importorskip("torch")
    if not _TORCHVISION_STUBS and not _torchvision_extension_loads(torch):
        _define_missing_torchvision_ops(torch)
    return torch, pytest.importorskip("open_clip")


@functools.lru_cache(maxsize=None)
def random_open_clip(name):
    """OpenCLIP's model `name` with random weights and batch-norm statistics (built once per session)."""
    torch, open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
    return torch, model
