"""CatLIP's multi-label classification loss (Mehta et al. 2024, arXiv 2404.15653)."""

import jax
import jax.numpy as jnp

from jclip.losses._device_axis import device_count, global_sum
from jclip.losses._global_arrays import over_batch_axes


@over_batch_axes(batch=("class_logits", "targets"))
def catlip_loss(class_logits, targets, *, axis_name=None):
    """Binary cross-entropy of CatLIP: image-text pre-training as multi-label classification.

    CatLIP (Mehta et al. 2024) turns each caption into the set of vocabulary nouns it contains
    (`jclip.data.vocabulary`) and trains the image model to predict that set with one sigmoid per
    class, which needs no pairwise image-text similarities and so no large global batch. With
    logits x_ic and targets y_ic over the global batch of B images and C classes:

        loss = (1/B) Σ_i Σ_c [softplus(x_ic) - y_ic x_ic]
             = -(1/B) Σ_i Σ_c [y_ic log σ(x_ic) + (1 - y_ic) log(1 - σ(x_ic))]

    summed over classes and averaged over images: the "batch_mean" reduction of CatLIP's
    configurations in Apple's CoreNet (not torch's default mean over batch and classes, which
    would divide by C as well). The 1/B is global, whatever the number of devices.

    Args:
      class_logits: `[b, C]` logits.
      targets: `[b, C]` multi-hot targets, 0 or 1 of any dtype (bool, integer or float; values
        in between act as soft labels).

    Returns:
      The scalar loss of the global batch.
    """
    if jnp.ndim(class_logits) != 2 or jnp.shape(class_logits) != jnp.shape(targets):
        raise ValueError(
            f"class_logits and targets must both be 2-D [batch, classes] of the same shape; got "
            f"class_logits {jnp.shape(class_logits)} and targets {jnp.shape(targets)}"
        )
    dtype = jnp.promote_types(jnp.result_type(class_logits), jnp.float32)
    logits = jnp.asarray(class_logits, dtype)
    terms = jax.nn.softplus(logits) - jnp.asarray(targets, dtype) * logits
    batch = class_logits.shape[0] * device_count(axis_name)
    return global_sum(jnp.sum(terms), axis_name) / batch
