"""Decoupled contrastive loss, DCL and DCLW (Yeh et al. 2022, arXiv 2110.06848)."""

import jax
import jax.numpy as jnp

from jclip.losses._device_axis import gather_rows, global_sum, own_columns
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, check_has_negatives, prepare_embeddings


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale",))
def dcl_loss(zimg, ztxt, scale, *, weight_sigma=None, axis_name=None):
    """Decoupled contrastive loss over the global batch of B pairs (Yeh et al. 2022, Eq. 6).

    InfoNCE with the positive pair removed from the denominator: the paper shows that the
    positive term there scales each pair's gradient by a factor that shrinks when the positive is
    easy or the negatives are few (negative-positive coupling), which makes small batches learn
    slowly. With logits l_ij = scale · zimg_i · ztxt_j:

        image→text:  L_i = -w_i l_ii + logsumexp_{j≠i} l_ij
        text→image:  L'_i = -w_i l_ii + logsumexp_{j≠i} l_ji
        loss = (1 / 2B) Σ_i (L_i + L'_i)

    Only cross-modal negatives: the paper's SimCLR form also contrasts each view with the other
    embeddings of its own view, which CLIP's image-text batches do not have. Unlike `clip_loss`,
    the loss can be negative.

    Without weighting (DCL) w_i = 1. With `weight_sigma` = σ (DCLW), the negative von
    Mises-Fisher weight of the paper gives more weight to the positives that are far apart:

        w_i = 2 - exp(s_ii / σ) / ((1 / B) Σ_k exp(s_kk / σ)),    s_ii = zimg_i · ztxt_i,

    the cosine similarity of the pair for unit embeddings, and the mean over the global batch.
    The paper does not say whether the weight is differentiated. Here it is, as in the reference
    implementation (github.com/raminnakhli/Decoupled-Contrastive-Learning; lightly's `DCLWLoss`
    detaches it instead): the gradient flows through w_i, and so through every pair's s_kk, as
    well as through l_ii.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array (see `jclip.losses.temperature`).
      weight_sigma: None for DCL; σ > 0 for DCLW (a Python float; 0.5 in the reference
        implementation).

    Returns:
      The scalar loss of the global batch, the same for every number of devices.
    """
    if weight_sigma is not None and not weight_sigma > 0:
        raise ValueError(f"weight_sigma must be a positive number (e.g. 0.5), or None for DCL; got {weight_sigma}")
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    check_has_negatives(batch, "dcl_loss")
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    is_positive = own_columns(local_batch, axis_name)

    def negatives_log_sum_exp(rows, columns):
        logit = scale * rows @ gather_rows(columns, axis_name).T
        return jax.nn.logsumexp(jnp.where(is_positive, -jnp.inf, logit), axis=1)

    similarity = jnp.sum(zimg * ztxt, axis=1)
    if weight_sigma is None:
        weight = 1.0
    else:
        # exp(s_ii/σ) / mean_k exp(s_kk/σ) = B · softmax over the global batch, without overflow.
        log_mean = jax.nn.logsumexp(gather_rows(similarity, axis_name) / weight_sigma) - jnp.log(batch)
        weight = 2.0 - jnp.exp(similarity / weight_sigma - log_mean)
    local = jnp.sum(
        negatives_log_sum_exp(zimg, ztxt) + negatives_log_sum_exp(ztxt, zimg) - 2.0 * weight * scale * similarity
    )
    return global_sum(local, axis_name) / (2 * batch)
