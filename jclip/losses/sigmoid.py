"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023, arXiv 2303.15343)."""

import jax
import jax.numpy as jnp

from jclip.losses._device_axis import global_sum
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, prepare_embeddings, ring_type
from jclip.losses.blocks import BlockReduction, reduce_over_keys


def _sigmoid_terms(queries, keys, row_bias, first_row, first_column):
    # -log σ(z l) = softplus(-z l), z = +1 on the positive pair and -1 elsewhere.
    rows = first_row + jnp.arange(queries.shape[0])
    columns = first_column + jnp.arange(keys.shape[0])
    labels = jnp.where(rows[:, None] == columns[None, :], 1.0, -1.0)
    return jnp.sum(jax.nn.softplus(-labels * (queries @ keys.T + row_bias[:, None])), axis=1)


def _sigmoid_share(queries, keys, row_bias, first_row, first_column, total):
    return _sigmoid_terms(queries, keys, row_bias, first_row, first_column)


SIGMOID_SUM = BlockReduction(
    value=_sigmoid_terms, combine=jnp.add, identity=jnp.zeros_like, finish=lambda terms: terms,
    share=_sigmoid_share,
)


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale", "bias"))
def siglip_loss(zimg, ztxt, scale, bias, *, axis_name=None, ring=False, block_size=None, ring_dtype=None):
    """Sigmoid loss of SigLIP over the global batch of B pairs (Zhai et al. 2023, Eq. 1).

        loss = -(1/B) Σ_i Σ_j log σ(z_ij (scale · zimg_i · ztxt_j + bias)),

    z_ij = 1 for the positive pair (i = j) and -1 otherwise; the sum runs over all B² pairs of
    the global batch and the normalisation is 1/B whatever the number of devices.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: exp(t'), a one-element array; bias: b, a one-element array (initial values in
        `jclip.losses.temperature`).
      ring: instead of all-gathering the texts, pass them around the ring (`lax.ppermute`) one
        device block at a time, as in the paper's chunked implementation (Sec. 3.3), recomputing
        each block in the backward pass; memory per device grows linearly with B. Needs
        a device axis: `axis_name`, or global arrays sharded over a mesh.
      block_size: also split the columns each device scans into blocks of this many, with
        recomputation, so that even one device never holds `[b, B]` logits. Must divide the
        local batch with `ring`, the global batch without.
      ring_dtype: with `ring`, the type the texts travel in (e.g. "bfloat16": half the bytes
        passed between devices). They enter the logits rounded to it; the images, logits, sums
        and gradients stay float32. None: the embeddings' own type.

    Returns:
      The scalar loss of the global batch; the same value and gradients for every choice of
      devices, `ring` and `block_size` (with `ring_dtype`, those of the rounded texts).
    """
    zimg, ztxt, _, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=ring, block_size=block_size)
    scale, bias = as_scalar(scale, "scale"), as_scalar(bias, "bias")
    ring_dtype = ring_type(ring_dtype, ring)
    dtype = zimg.dtype
    queries = scale.astype(dtype) * zimg
    # One copy of the bias per local row, typed like the queries (device-varying under shard_map),
    # so that the tiled custom VJP returns its gradient per device and autodiff sums it.
    row_bias = bias.astype(dtype) + jnp.zeros_like(queries[:, 0])
    terms = reduce_over_keys(
        SIGMOID_SUM, queries, ztxt, row_bias, axis_name=axis_name, ring=ring, block_size=block_size,
        ring_dtype=ring_dtype,
    )
    return global_sum(jnp.sum(terms), axis_name) / batch
