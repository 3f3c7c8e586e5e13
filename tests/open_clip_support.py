"""Importing the optional `torch` extra's open_clip in tests, skipping cleanly when it is absent."""

import functools

import pytest

from jclip.convert import torch_import


def import_open_clip():
    """`(torch, open_clip)`, or a skip when the optional torch extra is not installed."""
    try:
        return torch_import.import_open_clip()
    except ImportError as error:
        pytest.skip(f"the torch extra is not installed ({error})")


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
