"""Flax Linen models: `create(name, **overrides)` builds a named two-tower CLIP or CoCa."""

from jclip.models.clip import CLIP, l2_normalize
from jclip.models.coca import CoCa, generate
from jclip.models.registry import (MODEL_CONFIGS, architecture_differences, config_differences, create, list_models,
                                   model_class, model_config)

__all__ = ["CLIP", "CoCa", "MODEL_CONFIGS", "architecture_differences", "config_differences", "create", "generate",
           "l2_normalize", "list_models", "model_class", "model_config"]
