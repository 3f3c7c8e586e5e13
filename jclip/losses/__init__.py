"""Contrastive image-text losses as pure JAX functions; no Flax, TensorFlow or config imports.

Each loss returns the loss of the global batch, called three ways:
- on one device, the arrays the whole batch (`axis_name=None`);
- on global arrays sharded over a mesh, explicit or auto (`axis_name=None` under `jax.jit`): the loss
  runs per device over the mesh axes that shard the batch, each device holding its own rows of the
  logits (`_global_arrays.py`);
- per device inside `jax.pmap` / `jax.shard_map`, the arrays this device's rows (`axis_name` set).

| family | losses |
|---|---|
| softmax / sigmoid (memory-linear with `ring`, `block_size`) | `clip_loss`, `siglip_loss` |
| decoupled, hard negatives | `dcl_loss`, `hard_negative_clip_loss`, `negclip_loss`, `mochi_loss` |
| geometry of the sphere | `alignment_loss`, `uniformity_loss`, `cross_modal_uniformity_loss`, `contrastive_gap_loss` |
| soft targets, labels | `cwcl_loss`, `distillation_loss`, `supervised_contrastive_loss` |
| several views per sample | `multi_view_infonce_loss`, `multi_view_dhel_loss`, `poly_view_loss` |
| beyond contrastive | `caption_loss` (CoCa), `catlip_loss` (CatLIP) |
"""

from jclip.losses.captioning import caption_loss
from jclip.losses.decoupled import dcl_loss
from jclip.losses.geometry import alignment_loss, contrastive_gap_loss, cross_modal_uniformity_loss, uniformity_loss
from jclip.losses.hard_negatives import hard_negative_clip_loss, mochi_loss, negclip_loss
from jclip.losses.metrics import embedding_geometry, logits, top1_accuracy
from jclip.losses.multi_label import catlip_loss
from jclip.losses.multi_view import multi_view_dhel_loss, multi_view_infonce_loss, poly_view_loss
from jclip.losses.sigmoid import siglip_loss
from jclip.losses.soft_targets import cwcl_loss, distillation_loss
from jclip.losses.softmax import clip_loss
from jclip.losses.supervised import supervised_contrastive_loss
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
    "alignment_loss",
    "caption_loss",
    "catlip_loss",
    "clamp_log_scale",
    "clip_loss",
    "contrastive_gap_loss",
    "cross_modal_uniformity_loss",
    "cwcl_loss",
    "dcl_loss",
    "distillation_loss",
    "embedding_geometry",
    "hard_negative_clip_loss",
    "logits",
    "mochi_loss",
    "multi_view_dhel_loss",
    "multi_view_infonce_loss",
    "negclip_loss",
    "poly_view_loss",
    "siglip_loss",
    "supervised_contrastive_loss",
    "top1_accuracy",
    "uniformity_loss",
]
