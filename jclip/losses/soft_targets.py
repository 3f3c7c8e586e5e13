"""Contrastive cross-entropies with soft targets: CWCL (Srinivasa et al. 2023) and distillation from a teacher CLIP."""

import jax
import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import gather_rows, global_sum
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, prepare_embeddings


def soft_target_cross_entropy(logits, targets):
    """Σ_rows −Σ_j targets_ij log softmax_j(logits_i), for targets whose rows sum to 1.

    `logits` and `targets` are `[b, B]`: this device's rows against the global batch's columns.
    """
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - jnp.sum(targets * logits, axis=1))


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale",))
def cwcl_loss(zimg, ztxt, scale, *, similarity_from="text", axis_name=None):
    """Continuously Weighted Contrastive Loss (Srinivasa et al. 2023, arXiv 2309.14580).

    CLIP's loss treats every pair but the positive one as equally wrong. CWCL instead weights each
    column by how similar the two examples are in a reference modality r (in the paper, the one
    whose encoder is pretrained and frozen), so that the trained modality inherits r's structure.
    With logits l_ij = scale · zimg_i · ztxt_j and weights

        w_ij = (1 + r_i · r_j) / 2       (in [0, 1] for unit-norm r; no gradient flows through w)

    each row's targets are w_ij / Σ_k w_ik, and

        CE_i(image→text) = −Σ_j (w_ij / Σ_k w_ik) log softmax_j(l_i·)
        CE_j(text→image) = −Σ_i (w_ji / Σ_k w_jk) log softmax_i(l_·j)
        loss = (1 / 2B) Σ [CE(image→text) + CE(text→image)]

    over the global batch of B pairs, both directions with the same (symmetric) W.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array.
      similarity_from: "text" (r = ztxt) or "image" (r = zimg).

    Returns:
      The scalar loss of the global batch.
    """
    if similarity_from not in ("text", "image"):
        raise ValueError(f'similarity_from must be "text" or "image" (the modality whose in-modal similarity '
                         f"weights the targets); got {similarity_from!r}")
    zimg, ztxt, _, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    reference = lax.stop_gradient(ztxt if similarity_from == "text" else zimg)
    weights = (1 + reference @ gather_rows(reference, axis_name).T) / 2
    targets = weights / jnp.sum(weights, axis=1, keepdims=True)
    image_to_text = scale * zimg @ gather_rows(ztxt, axis_name).T
    text_to_image = scale * ztxt @ gather_rows(zimg, axis_name).T
    local = soft_target_cross_entropy(image_to_text, targets) + soft_target_cross_entropy(text_to_image, targets)
    return global_sum(local, axis_name) / (2 * batch)


@over_batch_axes(batch=("zimg", "ztxt", "teacher_zimg", "teacher_ztxt"), replicated=("scale", "teacher_scale"))
def distillation_loss(zimg, ztxt, scale, teacher_zimg, teacher_ztxt, teacher_scale, *, axis_name=None):
    """Cross-entropy from a teacher CLIP's similarities to the student's (OpenCLIP's `DistillClipLoss`).

    The student matches, row by row, the teacher's softmax over the batch instead of one-hot
    targets. With student logits l_ij = scale · zimg_i · ztxt_j and teacher logits
    m_ij = teacher_scale · teacher_zimg_i · teacher_ztxt_j,

        CE_i(image→text) = −Σ_j softmax_j(m_i·) log softmax_j(l_i·)
        CE_j(text→image) = −Σ_i softmax_i(m_·j) log softmax_i(l_·j)
        loss = (1 / 2B) Σ [CE(image→text) + CE(text→image)]

    over the global batch of B pairs. It is a cross-entropy, not a KL divergence: its minimum,
    at student logits equal to the teacher's up to a constant per row, is the teacher's mean row
    entropy, not 0; the gradients are the KL divergence's. The teacher gets no gradient.

    Args:
      zimg, ztxt: `[b, dim]` student image and text embeddings (normalised by the model).
      scale: the student's inverse temperature, a one-element array.
      teacher_zimg, teacher_ztxt: `[b, teacher_dim]` teacher embeddings of the same examples;
        teacher_dim may differ from dim.
      teacher_scale: the teacher's inverse temperature, a one-element array.

    Returns:
      The scalar loss of the global batch.
    """
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    if jnp.ndim(teacher_zimg) != 2 or jnp.shape(teacher_zimg) != jnp.shape(teacher_ztxt):
        raise ValueError(f"teacher embeddings must be 2-D [batch, teacher_dim] of the same shape; got teacher_zimg "
                         f"{jnp.shape(teacher_zimg)} and teacher_ztxt {jnp.shape(teacher_ztxt)}")
    if jnp.shape(teacher_zimg)[0] != local_batch:
        raise ValueError(f"teacher embeddings must have one row per example, as the student's; got teacher "
                         f"{jnp.shape(teacher_zimg)} for student {zimg.shape}")
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    teacher_dtype = jnp.promote_types(jnp.result_type(teacher_zimg, teacher_ztxt), jnp.float32)
    teacher_zimg, teacher_ztxt = (lax.stop_gradient(z.astype(teacher_dtype)) for z in (teacher_zimg, teacher_ztxt))
    teacher_scale = lax.stop_gradient(as_scalar(teacher_scale, "teacher_scale").astype(teacher_dtype))

    def cross_entropy(rows, columns, teacher_rows, teacher_columns):
        student = scale * rows @ gather_rows(columns, axis_name).T
        teacher = teacher_scale * teacher_rows @ gather_rows(teacher_columns, axis_name).T
        return soft_target_cross_entropy(student, jax.nn.softmax(teacher, axis=1))

    local = (cross_entropy(zimg, ztxt, teacher_zimg, teacher_ztxt)
             + cross_entropy(ztxt, zimg, teacher_ztxt, teacher_zimg))
    return global_sum(local, axis_name) / (2 * batch)
