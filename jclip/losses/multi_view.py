"""Contrastive losses over V ≥ 2 views of each sample: MV-InfoNCE, MV-DHEL and poly-view.

A batch `views` `[b, V, dim]` holds V embeddings of each sample (several augmentations of an
image, or an image and its captions); z_i^l is view l of sample i and every logit is
scale · ⟨z_i^l, z_j^m⟩. Summing two-view losses over the V(V-1)/2 pairs of views gives every
embedding several conflicting objectives; these losses instead give each sample (or each view of
each sample) one term that sees all its positives at once.
"""

import jax
import jax.numpy as jnp

from jclip.losses._device_axis import device_count, gather_rows, global_sum, own_columns
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar

AGGREGATIONS = ("geometric", "arithmetic")


def _prepare_views(views, scale, *, axis_name, needs_negatives):
    """Checked local views in (at least) float32, their global gather, the scale, and the
    mask `[b, B]` that is True where global column j is a different sample from local row i."""
    if jnp.ndim(views) != 3:
        raise ValueError(f"views must be 3-D [batch, views, dim]; got shape {jnp.shape(views)}")
    local_batch, view_count, _ = jnp.shape(views)
    if view_count < 2:
        raise ValueError(
            f"a multi-view loss needs at least 2 views per sample; got views of shape {jnp.shape(views)}"
        )
    batch = local_batch * device_count(axis_name)
    if needs_negatives and batch < 2:
        raise ValueError(
            f"this loss contrasts each sample with the others and needs a global batch of at least 2; "
            f"got {batch}"
        )
    views = views.astype(jnp.promote_types(views.dtype, jnp.float32))
    scale = as_scalar(scale, "scale").astype(views.dtype)
    return views, gather_rows(views, axis_name), scale, ~own_columns(local_batch, axis_name), batch


def _positive_logits(views, scale):
    """`[b, V, V]`: scale · ⟨z_i^l, z_i^m⟩ between the views of each local sample."""
    return scale * jnp.einsum("ild,imd->ilm", views, views)


def _other_views(view_count):
    return ~jnp.eye(view_count, dtype=bool)


@over_batch_axes(batch=("views",), replicated=("scale",))
def multi_view_infonce_loss(views, scale, *, axis_name=None):
    """MV-InfoNCE of Koromilas et al. 2025, "A Principled Framework for Multi-View Contrastive
    Learning" (arXiv 2507.06979): InfoNCE with one term per sample, whose numerator holds every
    pair of its views and whose denominator every pair of one of its views with another view of
    any sample of the batch.

    With l_{il,jm} = scale · ⟨z_i^l, z_j^m⟩ over the global batch of B samples and V views:

        loss = -(1/B) Σ_i log [ Σ_{l≠l'} exp(l_{il,il'}) / Σ_{l, m≠l} Σ_j exp(l_{il,jm}) ]

    l and l' (and l, m) run over ordered pairs of distinct views; j over all B samples, so the
    denominator holds the positives too, as in InfoNCE. This is the formula of the paper as its
    authors' repository (github.com/pakoromilas/Multi-View-CL) states it; their code's denominator
    also counts the same-view pairs (m = l, j ≠ i).

    Two views: with CLIP's logit matrix l_ij = scale · ⟨z_i^1, z_j^2⟩ the loss is
    (1/B) Σ_i [log(Σ_j exp l_ij + Σ_j exp l_ji) - log 2 - l_ii], one softmax over row i and
    column i together. By the concavity of log it is at least `clip_loss(z^1, z^2, scale)`, with
    equality when every row and its column have the same log-sum-exp (symmetric logits).

    Args:
      views: `[b, V, dim]` embeddings, V ≥ 2 views per sample (normalised by the model).
      scale: inverse temperature 1/τ, a one-element array.

    Returns:
      The scalar loss of the global batch.
    """
    views, all_views, scale, _, batch = _prepare_views(views, scale, axis_name=axis_name, needs_negatives=False)
    other_views = _other_views(views.shape[1])
    positive = jax.nn.logsumexp(_positive_logits(views, scale), axis=(1, 2), where=other_views)
    logits = scale * jnp.einsum("ild,jmd->iljm", views, all_views)
    energy = jax.nn.logsumexp(logits, axis=(1, 2, 3), where=other_views[None, :, None, :])
    return global_sum(jnp.sum(energy - positive), axis_name) / batch


@over_batch_axes(batch=("views",), replicated=("scale",))
def multi_view_dhel_loss(views, scale, *, axis_name=None):
    """MV-DHEL of Koromilas et al. 2025, "A Principled Framework for Multi-View Contrastive
    Learning" (arXiv 2507.06979): the decoupled hyperspherical energy loss (DHEL, Koromilas et al.
    2024, arXiv 2405.18045) for V views. The numerator aligns all views of a sample; the
    denominator is the product over views of each view's own energy against the other samples,
    so alignment and uniformity do not compete and the cost grows as B²V, not B²V².

        loss = -(1/B) Σ_i log [ Σ_{l≠l'} exp(l_{il,il'}) / Π_l Σ_{j≠i} exp(l_{il,jl}) ]

    with l_{il,jm} = scale · ⟨z_i^l, z_j^m⟩ over the global batch of B samples and V views; l, l'
    run over ordered pairs of distinct views, as in the formula of the authors' repository
    (github.com/pakoromilas/Multi-View-CL). That formula's energy sums run over all j; like DHEL
    and the authors' code, this one leaves out j = i, a sample's similarity to itself, which is
    no interaction (and, for unit vectors, the constant exp(scale)).

    Two views: DHEL with both views' energies, minus log 2 (the two ordered pairs):
    (1/B) Σ_i [log Σ_{j≠i} exp l_{i1,j1} + log Σ_{j≠i} exp l_{i2,j2} - l_{i1,i2}] - log 2.
    There are no cross-view negatives, so no relation to `clip_loss`.

    Args:
      views: `[b, V, dim]` embeddings, V ≥ 2 views per sample (normalised by the model). The
        global batch must hold at least 2 samples.
      scale: inverse temperature 1/τ, a one-element array.

    Returns:
      The scalar loss of the global batch.
    """
    views, all_views, scale, other_sample, batch = _prepare_views(
        views, scale, axis_name=axis_name, needs_negatives=True
    )
    positive = jax.nn.logsumexp(
        _positive_logits(views, scale), axis=(1, 2), where=_other_views(views.shape[1])
    )
    same_view = scale * jnp.einsum("ild,jld->ilj", views, all_views)
    energy = jax.nn.logsumexp(same_view, axis=2, where=other_sample[:, None, :])
    return global_sum(jnp.sum(jnp.sum(energy, axis=1) - positive), axis_name) / batch


@over_batch_axes(batch=("views",), replicated=("scale",))
def poly_view_loss(views, scale, *, aggregation="geometric", axis_name=None):
    """Poly-view contrastive loss of Shidani et al. 2024, "Poly-View Contrastive Learning"
    (arXiv 2403.05490): each view of a sample against each of its other views in turn, with the
    views of all other samples as negatives, aggregated over the other views.

    With l_{il,jm} = scale · ⟨z_i^l, z_j^m⟩, the one-vs-rest likelihood of view β given view α
    of sample i is a softmax over the positive and the negatives, every view γ of every other
    sample j (the other views of sample i are left out):

        ℓ_{i,α,β} = exp(l_{iα,iβ}) / [exp(l_{iα,iβ}) + Σ_{j≠i} Σ_γ exp(l_{iα,jγ})]

        geometric:  loss = -(1 / BV) Σ_i Σ_α (1/(V-1)) Σ_{β≠α} log ℓ_{i,α,β}
        arithmetic: loss = -(1 / BV) Σ_i Σ_α log[(1/(V-1)) Σ_{β≠α} ℓ_{i,α,β}]

    (the paper's Geometric and Arithmetic PVC: the geometric or arithmetic mean over β of the
    pairwise likelihoods). The mean runs over the B·V anchors (i, α) of the global batch.
    Arithmetic ≤ geometric by Jensen's inequality. The paper's full text was not at hand to check
    against: the negatives and the geometric form follow its pseudocode as reproduced by
    Koromilas et al. (github.com/pakoromilas/Multi-View-CL, `PVCLoss`); the arithmetic form is the
    mean of likelihoods above (that reproduction's arithmetic branch, log-sum-exp of batch-mean
    cross-entropies minus log B, is not).

    Two views: both aggregations are SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709) over
    the 2B anchors, i.e. `clip_loss(z^1, z^2, scale)` with the same-view negatives
    exp(l_{iα,jα}), j ≠ i, added to each denominator, so never below `clip_loss`.

    Args:
      views: `[b, V, dim]` embeddings, V ≥ 2 views per sample (normalised by the model). The
        global batch must hold at least 2 samples.
      scale: inverse temperature 1/τ, a one-element array.
      aggregation: "geometric" or "arithmetic".

    Returns:
      The scalar loss of the global batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
    views, all_views, scale, other_sample, batch = _prepare_views(
        views, scale, axis_name=axis_name, needs_negatives=True
    )
    view_count = views.shape[1]
    logits = scale * jnp.einsum("ild,jmd->iljm", views, all_views)
    negatives = jax.nn.logsumexp(logits, axis=(2, 3), where=other_sample[:, None, :, None])  # [b, V]
    positive = _positive_logits(views, scale)  # [b, α, β]
    log_likelihood = positive - jnp.logaddexp(positive, negatives[:, :, None])
    other_views = _other_views(view_count)
    if aggregation == "geometric":
        per_anchor = -jnp.sum(jnp.where(other_views, log_likelihood, 0.0), axis=2) / (view_count - 1)
    else:
        per_anchor = jnp.log(view_count - 1.0) - jax.nn.logsumexp(log_likelihood, axis=2, where=other_views)
    return global_sum(jnp.sum(per_anchor), axis_name) / (batch * view_count)
