"""Named model configurations, in the spirit of OpenCLIP's model-config table.

Each entry is the keyword arguments of `jclip.models.clip.CLIP`. The text
tower's `vocab_size` of the small built-in models is a placeholder that the
trainer replaces with the tokenizer's size.
"""

import copy
from typing import Any

import flax.linen as nn

from jclip.models.clip import CLIP

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # The demo model: 64 px images of the built-in `shapes` dataset, a conv stem
    # down to a 4x4 grid, captions of at most 16 tokens.
    "shapes-tiny": dict(
        embed_dim=128,
        vision=dict(patch_size=16, width=128, depth=4, num_heads=4, stem="conv", pool="cls"),
        text=dict(vocab_size=1000, context_length=16, width=128, depth=2, num_heads=4),
    ),
    # The smallest model that still exercises every code path; used by tests.
    "test-micro": dict(
        embed_dim=16,
        vision=dict(patch_size=16, width=32, depth=1, num_heads=2, stem="patch"),
        text=dict(vocab_size=512, context_length=16, width=32, depth=1, num_heads=2),
    ),
}


def list_models() -> list[str]:
    """The names `create` accepts."""
    return sorted(MODEL_CONFIGS)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of model `name`, with `overrides` merged in.

    A dict override of `vision` or `text` updates that tower's arguments
    (`vision={"depth": 2}`); any other override replaces the value.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config = copy.deepcopy(MODEL_CONFIGS[name])
    for key, value in overrides.items():
        if key in ("vision", "text"):
            unknown = set(value) - set(config[key]) - set(_TOWER_OPTIONS[key])
            if unknown:
                raise ValueError(f"unknown {key} option(s) {sorted(unknown)} for model {name!r}")
            config[key].update(value)
        elif key in _TOP_LEVEL_OPTIONS:
            config[key] = value
        else:
            raise ValueError(f"unknown model option {key!r}; options are {sorted(_TOP_LEVEL_OPTIONS)}")
    return config


def create(name: str, **overrides: Any) -> nn.Module:
    """The CLIP module of model `name` (see `list_models`), with `overrides` applied."""
    return CLIP(**model_config(name, **overrides))


_TOP_LEVEL_OPTIONS = ("embed_dim", "vision", "text", "init_scale", "max_scale", "init_bias")
_TOWER_OPTIONS = {
    "vision": ("embed_dim", "patch_size", "width", "depth", "num_heads", "mlp_ratio",
               "activation", "stem", "pool", "dtype"),
    "text": ("vocab_size", "context_length", "width", "depth", "num_heads", "mlp_ratio",
             "activation", "causal", "dtype"),
}
