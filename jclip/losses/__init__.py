"""Contrastive image-text losses as pure JAX functions; no Flax, TensorFlow or config imports.

Each loss works on the whole batch (`axis_name=None`) or per device inside `jax.pmap` /
`jax.shard_map` (`axis_name` set), and returns the loss of the global batch either way.
"""

from jclip.losses.metrics import embedding_geometry, logits, top1_accuracy
from jclip.losses.sigmoid import siglip_loss
from jclip.losses.softmax import clip_loss
from jclip.losses.temperature import (
    CLIP_INIT_LOG_SCALE,
    CLIP_INIT_SCALE,
    CLIP_MAX_SCALE,
    SIGLIP_INIT_BIAS,
    SIGLIP_INIT_LOG_SCALE,
    SIGLIP_INIT_SCALE,
    clamp_log_scale,
)

__all__ = [
    "CLIP_INIT_LOG_SCALE",
    "CLIP_INIT_SCALE",
    "CLIP_MAX_SCALE",
    "SIGLIP_INIT_BIAS",
    "SIGLIP_INIT_LOG_SCALE",
    "SIGLIP_INIT_SCALE",
    "clamp_log_scale",
    "clip_loss",
    "embedding_geometry",
    "logits",
    "siglip_loss",
    "top1_accuracy",
]
