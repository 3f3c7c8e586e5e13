"""Cross-modal supervised contrastive loss with class labels (Khosla et al. 2020)."""

import jax.numpy as jnp

from jclip.losses._device_axis import gather_rows, global_sum
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, prepare_embeddings
from jclip.losses.soft_targets import soft_target_cross_entropy


@over_batch_axes(batch=("zimg", "ztxt", "labels"), replicated=("scale",))
def supervised_contrastive_loss(zimg, ztxt, scale, labels, *, axis_name=None):
    """Supervised contrastive loss between images and texts (Khosla et al. 2020, arXiv 2004.11362, Eq. 2).

    When the batch holds several pairs of one class, CLIP's loss pushes apart images and captions
    that belong together. Here every text of the image's class is a positive. With logits
    l_ij = scale · zimg_i · ztxt_j and P(i) = {j : labels_j = labels_i} in the global batch (the
    pair itself included), the paper's L_out form (the average of the log-probabilities outside
    the log, which it found better than L_in):

        L_i(image→text) = −(1 / |P(i)|) Σ_{p ∈ P(i)} log softmax_j(l_i·)[p]
        L_j(text→image) = −(1 / |P(j)|) Σ_{p ∈ P(j)} log softmax_i(l_·j)[p]
        loss = (1 / 2B) Σ [L(image→text) + L(text→image)]

    over the global batch of B pairs. The softmax runs over all B candidates of the other
    modality (cross-modal, so there is no anchor to leave out). With all labels distinct this is
    `clip_loss`.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array.
      labels: `[b]` integer class of each pair.

    Returns:
      The scalar loss of the global batch.
    """
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    if jnp.shape(labels) != (local_batch,) or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be a [batch] integer array, one class per pair; got shape {jnp.shape(labels)} "
                         f"and dtype {jnp.result_type(labels)} for embeddings {zimg.shape}")
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    positives = labels[:, None] == gather_rows(labels, axis_name)[None, :]
    targets = positives / jnp.sum(positives, axis=1, keepdims=True)
    image_to_text = scale * zimg @ gather_rows(ztxt, axis_name).T
    text_to_image = scale * ztxt @ gather_rows(zimg, axis_name).T
    local = soft_target_cross_entropy(image_to_text, targets) + soft_target_cross_entropy(text_to_image, targets)
    return global_sum(local, axis_name) / (2 * batch)
