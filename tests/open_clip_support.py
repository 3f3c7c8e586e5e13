"""Importing the optional `torch` extra's open_clip in tests, skipping cleanly when it is absent."""

import functools

import numpy as np
import pytest

from jclip.convert import torch_import


def import_open_clip():
    """`(torch, open_clip)`, or a skip when the optional torch extra is not installed."""
    try:
        return torch_import.import_open_clip()
    except ImportError as error:
        pytest.skip(f"the torch extra is not installed ({error})")


# The README's bound on a converted model's relative (Frobenius) error against OpenCLIP's outputs. Measured
# on CPU in float32: at most 1.4e-6 (CoCa's text embedding; ViT-B-32 1.3e-6, RN50 1.2e-6, SigLIP 0.9e-6),
# about a dozen float32 roundings (1.2e-7 each) through 12 layers. Small bugs exceed it where 1e-4 did not:
# batch-norm epsilon 1e-6 for PyTorch's 1e-5 in RN50 gives 4.9e-6, CoCa's pooler at the default 1e-6 4.3e-6.
PARITY = 2e-6


def assert_parity(got, want, what: str):
    """`got` is within PARITY relative (Frobenius) error of OpenCLIP's `want`; the message gives the error."""
    error = float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))
    assert error < PARITY, f"{what}: relative error {error:.2e} against OpenCLIP exceeds {PARITY:.0e}"


@functools.lru_cache(maxsize=2)
def random_open_clip(name):
    """OpenCLIP's model `name` with random weights and batch-norm statistics. The last two built are kept for
    the tests that follow (a few seconds each to build; all of them kept took a worker past 12 GB)."""
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
