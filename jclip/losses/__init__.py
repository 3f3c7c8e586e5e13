"""Contrastive image-text losses as pure JAX functions; no Flax, TensorFlow or config imports.

Conventions of every function here, said once:

- Inputs. Embeddings `[b, dim]` come as the model produced them (L2-normalised; other values are
  handled) and are computed in at least float32, bfloat16 promoted. `scale` (the inverse
  temperature exp(t)) and `bias` are one-element arrays (shape `()` or `(1,)`, as checkpoints
  store them), so that gradients flow to them. Options (weights, block sizes, ...) are Python values.
- The batch. Each function returns the value of the global batch of B rows, called three ways:
  - on one device, the arrays the whole batch (`axis_name=None`);
  - on global arrays sharded over a mesh, explicit or auto (`axis_name=None` under `jax.jit`): the
    function runs per device over the mesh axes that shard the batch, each device keeping its own
    rows of the logits (`_global_arrays.py`);
  - per device inside `jax.pmap` / `jax.shard_map`: `axis_name` names the device axis, the arrays
    are this device's b rows (device d holds global rows d·b .. d·b + b - 1, the order of
    `lax.all_gather`), and the result is the global batch's value, the same on every device.
  The value and the gradients never depend on the number of devices.
- Gradients per device (params replicated, data sharded over axis "data"). Under `jax.shard_map`
  (default `check_vma=True`), `jax.grad` of the returned loss is already the global gradient, the
  same on every device; no extra collective:

      def step(params, images, texts):           # this device's rows of the batch
          def loss_fn(params):
              zimg, ztxt, scale = model(params, images, texts)
              return clip_loss(zimg, ztxt, scale, axis_name="data")
          return jax.value_and_grad(loss_fn)(params)
      jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))

  Under `jax.pmap` (and `shard_map` with `check_vma=False`), each device's `jax.grad` is the
  derivative of the sum of the N per-device copies of the loss with respect to its own copy of the
  params, N times that device's share; `lax.pmean` over the axis gives the global gradient:

      def step(params, images, texts):
          loss, grads = jax.value_and_grad(loss_fn)(params)
          return loss, jax.lax.pmean(grads, "data")
      jax.pmap(step, axis_name="data", in_axes=(None, 0, 0))

  The same holds for `scale` and `bias`. Gradients with respect to the local embeddings are the
  global loss's under `shard_map` and N times those under `pmap`.

| family | losses |
|---|---|
| softmax / sigmoid (memory-linear with `ring`, `block_size`) | `clip_loss`, `siglip_loss` |
| decoupled, hard negatives | `dcl_loss`, `hard_negative_clip_loss`, `negclip_loss`, `mochi_loss` |
| geometry of the sphere | `alignment_loss`, `uniformity_loss`, `cross_modal_uniformity_loss`, `contrastive_gap_loss` |
| soft targets, labels | `cwcl_loss`, `distillation_loss`, `supervised_contrastive_loss` |
| several views per sample | `multi_view_infonce_loss`, `multi_view_dhel_loss`, `poly_view_loss` |
| beyond contrastive | `caption_loss` (CoCa), `catlip_loss` (CatLIP) |
| metrics, helpers | `logits`, `top1_accuracy`, `embedding_geometry`; `gather_rows` (per device: the global batch's rows) |
"""

from jclip.losses._device_axis import gather_rows
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
    "gather_rows",
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
