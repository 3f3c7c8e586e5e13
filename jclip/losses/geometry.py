"""Alignment and uniformity on the sphere (Wang & Isola 2020) and the contrastive-gap loss (Fahim et al. 2024)."""

import jax
import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import device_count, gather_rows, global_sum, own_columns
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import prepare_embeddings
from jclip.losses.softmax import clip_loss


def _check_positive(value, name):
    if not value > 0:
        raise ValueError(f"{name} must be a positive Python float; got {name}={value}")


def _global_log_sum_exp(local, axis_name):
    """log Σ_devices exp(local): each device's log-sum-exp merged under one shared shift (the largest)."""
    if axis_name is None:
        return local
    peak = lax.pmax(lax.stop_gradient(local), axis_name)
    return peak + jnp.log(lax.psum(jnp.exp(local - peak), axis_name))


def _log_mean_kernel(rows, columns, t, axis_name):
    """log mean over the global pairs (i, j), i ≠ j, of exp(−t‖rows_i − columns_j‖²).

    `rows` and `columns` are this device's rows of two `[B, dim]` arrays whose row i belongs to
    global example i; pair (i, i) is left out. Computed as a log-sum-exp, so that no distance
    makes the mean underflow to 0 (exp(−t d²) is 0 in float32 once t·d² exceeds about 103).
    """
    _check_positive(t, "t")
    local_batch = rows.shape[0]
    batch = local_batch * device_count(axis_name)
    if batch < 2:
        raise ValueError(f"uniformity averages over pairs of distinct rows and needs a global batch of at least 2; "
                         f"got {batch}")
    everyone = gather_rows(columns, axis_name)
    squared = jnp.sum(rows**2, 1)[:, None] + jnp.sum(everyone**2, 1)[None, :] - 2 * rows @ everyone.T
    local = jax.nn.logsumexp(-t * jnp.maximum(squared, 0.0), where=~own_columns(local_batch, axis_name))
    return _global_log_sum_exp(local, axis_name) - jnp.log(batch * (batch - 1.0))


@over_batch_axes(batch=("zimg", "ztxt"))
def alignment_loss(zimg, ztxt, *, alpha=2.0, axis_name=None):
    """Alignment of the positive pairs (Wang & Isola 2020, arXiv 2005.10242).

    How far each image sits from its own caption; lower is better aligned:

        loss = (1/B) Σ_i ‖zimg_i − ztxt_i‖₂^α

    over the global batch of B pairs. Where a pair coincides the gradient is taken as 0.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      alpha: the exponent α, a positive Python float (the paper's default 2).

    Returns:
      The scalar alignment of the global batch.
    """
    _check_positive(alpha, "alpha")
    zimg, ztxt, _, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    squared = jnp.sum((zimg - ztxt) ** 2, axis=1)
    apart = squared > 0  # ‖·‖^α = (‖·‖²)^(α/2), kept away from 0 where its derivative is not finite
    distance = jnp.where(apart, jnp.where(apart, squared, 1.0) ** (alpha / 2), 0.0)
    return global_sum(jnp.sum(distance), axis_name) / batch


@over_batch_axes(batch=("z",))
def uniformity_loss(z, *, t=2.0, axis_name=None):
    """Uniformity of one modality's embeddings on the sphere (Wang & Isola 2020, arXiv 2005.10242).

    The log of the mean Gaussian potential between distinct embeddings; lower is more uniform:

        loss = log [ (1 / (B(B−1))) Σ_{i≠j} exp(−t ‖z_i − z_j‖²) ]

    over the ordered pairs of distinct rows of the global batch of B (the same mean as over the
    unordered pairs). Computed as a log-sum-exp, finite for any distances.

    Args:
      z: `[b, dim]` embeddings of one modality (normalised by the model).
      t: the potential's sharpness, a positive Python float (the paper's default 2).

    Returns:
      The scalar uniformity of the global batch.
    """
    if jnp.ndim(z) != 2:
        raise ValueError(f"z must be 2-D [batch, dim] embeddings of one modality; got shape {jnp.shape(z)}")
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    return _log_mean_kernel(z, z, t, axis_name)


@over_batch_axes(batch=("zimg", "ztxt"))
def cross_modal_uniformity_loss(zimg, ztxt, *, t=2.0, axis_name=None):
    """Uniformity across the modalities (Fahim et al. 2024, arXiv 2405.18570).

    Wang & Isola's potential between an image and every caption but its own: it pushes the
    image and text embeddings to spread over the same region of the sphere instead of two
    separated cones (the "contrastive gap"). Lower is more uniform:

        loss = log [ (1 / (B(B−1))) Σ_{i≠j} exp(−t ‖zimg_i − ztxt_j‖²) ]

    over the global batch of B pairs; the positive pairs (i = i) are left out. Computed as a
    log-sum-exp, finite for any distances.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      t: the potential's sharpness, a positive Python float (default 2, as in the paper).

    Returns:
      The scalar cross-modal uniformity of the global batch.
    """
    zimg, ztxt, _, _ = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    return _log_mean_kernel(zimg, ztxt, t, axis_name)


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale",))
def contrastive_gap_loss(zimg, ztxt, scale, *, alignment_weight=1.0, uniformity_weight=1.0, t=2.0, axis_name=None):
    """CLIP's loss with Fahim et al.'s alignment and uniformity terms (Fahim et al. 2024, arXiv 2405.18570).

    Fahim et al. find that CLIP's loss leaves image and text embeddings in two small, separated
    regions of the sphere (the contrastive gap) and close it by adding Wang & Isola's alignment
    and uniformity, the latter both within each modality and across them:

        L_Align    = alignment_loss(zimg, ztxt)                       (α = 2)
        L_Uniform  = ½ [uniformity_loss(zimg) + uniformity_loss(ztxt)]
        L_XUniform = cross_modal_uniformity_loss(zimg, ztxt)
        loss = clip_loss + alignment_weight · L_Align + uniformity_weight · ½ (L_Uniform + L_XUniform)

    With both weights 1 this is the paper's L_CUAXU, whose two uniformity terms share the weight
    that L_Uniform alone has in its L_CUA. Every term is a mean over the global batch of B pairs.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t) of `clip_loss`, a one-element array.
      alignment_weight, uniformity_weight: non-negative Python floats.
      t: the uniformity potential's sharpness, a positive Python float (default 2, as in the paper).

    Returns:
      The scalar loss of the global batch.
    """
    for name, weight in (("alignment_weight", alignment_weight), ("uniformity_weight", uniformity_weight)):
        if not weight >= 0:
            raise ValueError(f"{name} must be a non-negative Python float; got {name}={weight}")
    contrastive = clip_loss(zimg, ztxt, scale, axis_name=axis_name)
    in_modal = (uniformity_loss(zimg, t=t, axis_name=axis_name) + uniformity_loss(ztxt, t=t, axis_name=axis_name)) / 2
    cross_modal = cross_modal_uniformity_loss(zimg, ztxt, t=t, axis_name=axis_name)
    return (contrastive + alignment_weight * alignment_loss(zimg, ztxt, axis_name=axis_name)
            + uniformity_weight * (in_modal + cross_modal) / 2)
