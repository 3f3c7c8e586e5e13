"""The softmax (InfoNCE) contrastive loss of CLIP (Radford et al. 2021, arXiv 2103.00020)."""

import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import global_sum
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, prepare_embeddings, ring_type
from jclip.losses.blocks import BlockReduction, reduce_both_ways


def _logits(queries, keys, row_scale):
    # The scale reaches the queries here, tile by tile: a scaled copy of all the queries would be one more
    # [b, dim] array in the tiled forms' memory. (Scaling the logits instead would make autodiff of the
    # untiled form keep the unscaled [b, B] product for the scale's gradient.)
    return (row_scale[:, None] * queries) @ keys.T


def _peak_and_mass(queries, keys, row_scale, first_row, first_column):
    # The online log-sum-exp keeps (row max m, Σ exp(l - m)): accumulating the log-sum-exp itself
    # would round every partial sum to the precision of the large logits.
    logit = _logits(queries, keys, row_scale)
    peak = lax.stop_gradient(jnp.max(logit, axis=1))
    return peak, jnp.sum(jnp.exp(logit - peak[:, None]), axis=1)


def _merge(a, b):
    (peak_a, mass_a), (peak_b, mass_b) = a, b
    peak = jnp.maximum(peak_a, peak_b)
    return peak, mass_a * jnp.exp(peak_a - peak) + mass_b * jnp.exp(peak_b - peak)


def _log_sum_exp(peak_and_mass):
    peak, mass = peak_and_mass
    return peak + jnp.log(mass)


def _softmax_mass(queries, keys, row_scale, first_row, first_column, log_sum_exp):
    # d lse_i / d l_ij = exp(l_ij - lse_i): the derivative of this block's softmax mass at fixed lse.
    return jnp.sum(jnp.exp(_logits(queries, keys, row_scale) - log_sum_exp[:, None]), axis=1)


def _no_mass(row):
    return jnp.full_like(row, -jnp.inf), jnp.zeros_like(row)


LOG_SUM_EXP = BlockReduction(
    value=_peak_and_mass, combine=_merge, identity=_no_mass, finish=_log_sum_exp, share=_softmax_mass
)


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale",))
def clip_loss(zimg, ztxt, scale, *, axis_name=None, ring=False, block_size=None, label_smoothing=0.0,
              ring_dtype=None):
    """Symmetric InfoNCE of CLIP over the global batch of B pairs (Radford et al. 2021, Fig. 3).

    With logits l_ij = scale · zimg_i · ztxt_j, the loss is the mean of the image→text and
    text→image cross-entropies, whose targets put 1 - ε on the positive pair and ε/B on every
    column (the positive included), as in optax / PyTorch label smoothing:

        CE_i = logsumexp_j l_ij - (1 - ε) l_ii - (ε / B) Σ_j l_ij
        loss = (1 / 2B) Σ_i [CE_i(image→text) + CE_i(text→image)]

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array (see `jclip.losses.temperature`).
      ring: pass the other devices' embeddings around the ring (`lax.ppermute`) one device block at
        a time instead of all-gathering them, with a running log-sum-exp and the logits recomputed
        in the backward pass; memory per device grows linearly with B. Needs a device axis:
        `axis_name`, or global arrays sharded over a mesh.
      block_size: also split the columns each device scans into blocks of this many (online
        log-sum-exp, recomputation), so that even one device never holds `[b, B]` logits. Must
        divide the local batch with `ring`, the global batch without.
      label_smoothing: ε above, a Python float.
      ring_dtype: with `ring`, the type the embeddings travel in (e.g. "bfloat16": half the bytes
        passed between devices). Each direction's keys enter the logits rounded to it; queries,
        logits, sums and gradients stay float32. None: the embeddings' own type.

    Returns:
      The scalar loss of the global batch; the same value and gradients for every choice of
      devices, `ring` and `block_size` (with `ring_dtype`, those of the rounded keys).
    """
    zimg, ztxt, _, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=ring, block_size=block_size)
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    ring_dtype = ring_type(ring_dtype, ring)

    row_scale = jnp.broadcast_to(scale, zimg.shape[:1])
    log_sum_exps = reduce_both_ways(LOG_SUM_EXP, zimg, ztxt, row_scale, row_scale, axis_name=axis_name, ring=ring,
                                    block_size=block_size, ring_dtype=ring_dtype)
    positive = scale * jnp.sum(zimg * ztxt, axis=1)  # l_ii, the same in both directions
    local = jnp.sum(log_sum_exps[0] + log_sum_exps[1] - 2 * (1.0 - label_smoothing) * positive)
    if label_smoothing:
        for rows, columns in ((zimg, ztxt), (ztxt, zimg)):
            local -= label_smoothing * scale * jnp.sum(rows @ global_sum(jnp.sum(columns, axis=0), axis_name)) / batch
    return global_sum(local, axis_name) / (2 * batch)
