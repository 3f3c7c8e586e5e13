"""The captioning loss of CoCa (Yu et al. 2022, arXiv 2205.01917)."""

import jax
import jax.numpy as jnp

from jclip.losses._device_axis import global_sum
from jclip.losses._global_arrays import over_batch_axes


@over_batch_axes(batch=("caption_logits", "tokens"))
def caption_loss(caption_logits, tokens, *, pad_id=0, label_smoothing=0.0, axis_name=None):
    """Next-token cross-entropy of CoCa's captioner, the mean over the global batch's caption tokens.

    CoCa trains its multimodal decoder to predict each caption token from the image and the
    tokens before it (Yu et al. 2022, Sec. 3.1, L_Cap). `caption_logits[:, t]` scores token t + 1
    (see `jclip.models.coca.CoCa`), so position t < L - 1 has the target y_t = tokens[:, t + 1]
    and the last position none. Targets equal to `pad_id` are ignored. With p = softmax of the
    logits, ε the label smoothing and K the vocabulary size:

        CE_{i,t} = -(1 - ε) log p_{i,t}(y_{i,t}) - (ε / K) Σ_k log p_{i,t}(k)
        loss = Σ_{i,t: y_{i,t} ≠ pad} CE_{i,t} / #{(i, t): y_{i,t} ≠ pad}

    both sums over the global batch: every real token weighs the same whatever the device holding
    it and however many pads its neighbours have. (OpenCLIP's CoCa loss averages over each device's
    tokens and then over devices, which weighs tokens on devices with more padding more.) A global
    batch without any target token gives 0.

    Args:
      caption_logits: `[b, L, K]` next-token logits.
      tokens: `[b, L]` integer token ids in [0, K) (a larger target id makes the loss NaN), the
        caption the logits were computed from (start token first, padded with `pad_id` after the
        end).
      pad_id: the padding token id, a Python int.
      label_smoothing: ε above, a Python float in [0, 1]: 1 - ε on the target and ε / K on every
        class (the target included), as in optax and PyTorch.

    Returns:
      The scalar loss of the global batch.
    """
    if jnp.ndim(caption_logits) != 3 or jnp.ndim(tokens) != 2:
        raise ValueError(
            f"caption_logits must be 3-D [batch, length, vocab] and tokens 2-D [batch, length]; got "
            f"caption_logits {jnp.shape(caption_logits)} and tokens {jnp.shape(tokens)}"
        )
    if jnp.shape(caption_logits)[:2] != jnp.shape(tokens):
        raise ValueError(
            f"caption_logits and tokens must agree in batch and length; got caption_logits "
            f"{jnp.shape(caption_logits)} and tokens {jnp.shape(tokens)}"
        )
    if jnp.shape(tokens)[1] < 2:
        raise ValueError(f"captions need at least 2 tokens (a token and its target); got tokens {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integer token ids; got dtype {jnp.result_type(tokens)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}")
    dtype = jnp.promote_types(jnp.result_type(caption_logits), jnp.float32)
    log_probs = jax.nn.log_softmax(caption_logits[:, :-1].astype(dtype), axis=-1)
    targets = tokens[:, 1:]
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    cross_entropy = -(1.0 - label_smoothing) * target_log_prob
    if label_smoothing:
        cross_entropy -= label_smoothing * jnp.mean(log_probs, axis=-1)
    real = targets != pad_id
    total = global_sum(jnp.sum(jnp.where(real, cross_entropy, 0.0)), axis_name)
    count = global_sum(jnp.sum(real), axis_name)
    return total / jnp.maximum(count, 1).astype(dtype)
