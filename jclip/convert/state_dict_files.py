"""Reading PyTorch weight files (.safetensors, .pt, .bin, OpenAI's TorchScript archives) into a state dict."""

import os
from typing import Any


def load_state_dict(path: str) -> dict[str, Any]:
    """The parameter mapping stored in `path`, as numpy arrays (.safetensors) or CPU tensors.

    `.safetensors` needs the `safetensors` package; other files need torch (the
    `jclip[torch]` extra). OpenCLIP training checkpoints keep the weights under
    "state_dict"; OpenAI's released `.pt` files are TorchScript archives.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if not path.endswith((".pt", ".pth", ".bin")):
        raise ValueError(f"unknown weight file type {path!r}; use a .safetensors, .pt, .pth or .bin file")
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs torch: pip install 'jclip[torch]'") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError:  # a TorchScript archive (OpenAI's released weights) is no pickle
        loaded = torch.jit.load(path, map_location="cpu").state_dict()
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict of parameter names to tensors")
    return dict(loaded)
