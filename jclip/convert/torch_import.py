"""Importing the optional `torch` extra's open_clip, also where torchvision's C extension cannot load.

Used by the OpenCLIP comparisons (tests, `benchmarks/train_throughput.py`);
jclip itself never needs torch.
"""

import glob
import importlib
import importlib.util
import os

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
    """`(torch, open_clip)`; ImportError when the torch extra (`pip install -e .[torch]`) is absent."""
    torch = importlib.import_module("torch")
    if not _TORCHVISION_STUBS and not _torchvision_extension_loads(torch):
        _define_missing_torchvision_ops(torch)
    return torch, importlib.import_module("open_clip")
