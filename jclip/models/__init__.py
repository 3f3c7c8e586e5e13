"""Flax Linen models: `create(name, **overrides)` builds a named two-tower CLIP."""

from jclip.models.clip import CLIP, l2_normalize
from jclip.models.registry import MODEL_CONFIGS, create, list_models, model_config

__all__ = ["CLIP", "MODEL_CONFIGS", "create", "l2_normalize", "list_models", "model_config"]
