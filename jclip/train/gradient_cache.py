"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", arXiv 2101.06983): the full-batch contrastive gradient with the activation memory
of one micro-batch.

Naive gradient accumulation computes the loss per micro-batch, so each sees only its own
negatives: a different, weaker objective. Gradient caching instead

1. embeds every micro-batch without keeping activations (a forward pass only),
2. takes the loss over the whole (global) batch of embeddings and its gradient with respect to
   the embeddings, scale and bias (cheap: no tower is involved),
3. re-runs each micro-batch's forward pass and back-propagates that micro-batch's slice of the
   embedding gradient through it, summing the parameter gradients.

The result equals the gradient of the full-batch loss, at the cost of one extra forward pass.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Outputs = dict[str, jax.Array]  # {"zimg", "ztxt", "scale"[, "bias"], other per-example outputs}
SHARED_OUTPUTS = ("scale", "bias")  # one value for the whole batch; every other output has a row per example


def cached_loss_and_gradients(
    embed: Callable[[dict, dict[str, jax.Array], jax.Array], Outputs],
    loss: Callable[[Outputs], tuple[jax.Array, Any]],
    params: dict, inputs: dict[str, jax.Array], rng: jax.Array, micro_batches: int,
) -> tuple[tuple[jax.Array, tuple[Any, Outputs]], dict]:
    """`((loss, (aux, outputs)), grads)` of `loss(embed(params, inputs, rng))`, `micro_batches` at a time.

    `inputs` are the model's per-example inputs (images, tokens, ...); `embed` is the model's
    forward pass (`rng` for its stochastic parts: micro-batch m gets `fold_in(rng, m)` in both
    passes); `loss` maps the outputs of the whole batch to the scalar loss and auxiliary values
    (it may gather over a device axis). Per-example outputs are returned whole; scale and bias once.
    """
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if batch % micro_batches:
        raise ValueError(f"the per-device batch ({batch}) is not divisible by micro_batches={micro_batches}")

    def split(x):
        return x.reshape(micro_batches, batch // micro_batches, *x.shape[1:])

    inputs = jax.tree.map(split, inputs)
    keys = jax.vmap(lambda index: jax.random.fold_in(rng, index))(jnp.arange(micro_batches))
    outputs = lax.map(lambda xs: embed(params, *xs), (inputs, keys))
    per_example = {k: v.reshape(batch, *v.shape[2:]) for k, v in outputs.items() if k not in SHARED_OUTPUTS}
    shared = {k: v[0] for k, v in outputs.items() if k in SHARED_OUTPUTS}  # the same in each micro-batch
    (value, aux), output_grads = jax.value_and_grad(loss, has_aux=True)({**per_example, **shared})

    def backward(grads, xs):
        index, micro_inputs, key = xs
        cotangent = {k: split(output_grads[k])[index] for k in per_example}
        # Scale and bias take their gradient once, with the first micro-batch.
        cotangent.update({k: jnp.where(index == 0, output_grads[k], 0.0) for k in shared})
        _, pullback = jax.vjp(lambda p: embed(p, micro_inputs, key), params)
        return jax.tree.map(jnp.add, grads, pullback(cotangent)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = lax.scan(backward, zeros, (jnp.arange(micro_batches), inputs, keys))
    return (value, (aux, {**per_example, **shared})), grads
