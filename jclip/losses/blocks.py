"""Reductions of query rows over all key columns of the global batch, three ways.

A `BlockReduction` says what one block of columns contributes to each query row (a log-sum-exp for
the softmax loss, a sum of sigmoid terms for the sigmoid loss) and how two contributions combine.
`reduce_over_keys` applies it:

- gathered, untiled: this device's rows against the all-gathered keys in one matrix, differentiated
  by plain autodiff (the usual implementation; stores the `[b, B]` logits for the backward pass);
- gathered, `block_size`: the gathered columns in blocks of `block_size`, combined online;
- `ring`: this device's own key block, then the other devices' blocks as they arrive around the ring
  by `lax.ppermute` (the chunked scheme of SigLIP, Zhai et al. 2023, arXiv 2303.15343, Sec. 3.3),
  each optionally split in `block_size` columns.

The tiled forms have a custom VJP that keeps only the inputs and the per-row result and recomputes
each block's logits in the backward pass (Inf-CL, Cheng et al. 2024, arXiv 2410.17243), so memory
per device is one `[b, block]` tile plus O(b·dim), linear in the global batch. In the backward ring
each key block travels once more, collecting its key gradient from every device, until the N-th
`ppermute` brings it home. Every step, the first included, runs inside the loops (the N-th shift
of the keys in the forward ring only brings them home): a step peeled out of the loop would let
XLA schedule the two directions of the softmax loss side by side, two tiles at once.
"""

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import device_count, device_index, first_global_row, gather_rows


class BlockReduction(NamedTuple):
    """How the blocks of key columns make up a per-row result `total` (shape `[b]`).

    `value(queries, keys, params, first_row, first_column)`: the block's contribution per row (a
      pytree); `first_row` / `first_column` are the global indices of the first query row / key
      column, so that row i and column j are a positive pair iff `first_row + i == first_column + j`.
    `combine(a, b)`: merges two contributions (associative).
    `identity(row)`: the contribution of no columns, for a `[b]` array `row` of the queries' type.
    `finish(contribution)`: the per-row `total` from the contribution of all columns.
    `share(queries, keys, params, first_row, first_column, total)`: a per-row function whose
      derivative, at fixed `total`, equals the derivative of `total` restricted to this block's
      logits; its VJP gives the block's gradients without the other blocks.
    """

    value: Callable
    combine: Callable
    identity: Callable
    finish: Callable
    share: Callable


def reduce_over_keys(reduction, queries, keys, params, *, axis_name, ring, block_size):
    """Per-row `total` of local `queries` `[b, dim]` over the keys of all devices.

    `keys` are this device's `[b, dim]` key rows; `params` a pytree of per-row arrays passed to the
    block functions and differentiated like `queries`.
    """
    if ring:
        return _tiled(reduction, queries, keys, params, axis_name, True, block_size)
    keys = gather_rows(keys, axis_name)
    if block_size is None:
        first_row = first_global_row(queries.shape[0], axis_name)
        return reduction.finish(reduction.value(queries, keys, params, first_row, 0))
    return _tiled(reduction, queries, keys, params, axis_name, False, block_size)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def _tiled(reduction, queries, keys, params, axis_name, ring, block_size):
    return _tiled_forward(reduction, queries, keys, params, axis_name, ring, block_size)[0]


def _tiled_forward(reduction, queries, keys, params, axis_name, ring, block_size):
    first_row = first_global_row(queries.shape[0], axis_name)
    fold = partial(_fold_blocks, reduction, queries, params=params, first_row=first_row, block_size=block_size)
    if not ring:
        total = fold(keys, reduction.identity(queries[:, 0]), first_column=0)
    else:
        devices, device = device_count(axis_name), device_index(axis_name)

        def step(t, carry):
            total, keys = carry
            total = fold(keys, total, first_column=(device - t) % devices * keys.shape[0])
            return total, _to_next_device(keys, axis_name)

        total, _ = lax.fori_loop(0, devices, step, (reduction.identity(queries[:, 0]), keys))
    total = reduction.finish(total)
    return total, (queries, keys, params, total)


def _tiled_backward(reduction, axis_name, ring, block_size, residuals, cotangent):
    queries, keys, params, total = residuals
    first_row = first_global_row(queries.shape[0], axis_name)
    grads = partial(
        _block_grads, reduction, queries, params=params, first_row=first_row, total=total,
        cotangent=cotangent, block_size=block_size,
    )
    if not ring:
        return grads(keys, first_column=0)
    devices, device = device_count(axis_name), device_index(axis_name)

    def step(t, carry):
        keys, dkeys, dqueries, dparams = carry
        dqueries_t, dkeys_t, dparams_t = grads(keys, first_column=(device - t) % devices * keys.shape[0])
        return (
            _to_next_device(keys, axis_name),
            _to_next_device(dkeys + dkeys_t, axis_name),
            dqueries + dqueries_t,
            _add(dparams, dparams_t),
        )

    zeros = (jnp.zeros_like(keys), jnp.zeros_like(queries), jax.tree.map(jnp.zeros_like, params))
    _, dkeys, dqueries, dparams = lax.fori_loop(0, devices, step, (keys, *zeros))
    return dqueries, dkeys, dparams


_tiled.defvjp(_tiled_forward, _tiled_backward)


def _fold_blocks(reduction, queries, keys, total, *, params, first_row, first_column, block_size):
    """`total` combined with `reduction.value` over `keys` in blocks of `block_size` columns."""
    size = keys.shape[0] if block_size is None else block_size

    def step(c, total):
        block = lax.dynamic_slice_in_dim(keys, c * size, size)
        return reduction.combine(total, reduction.value(queries, block, params, first_row, first_column + c * size))

    return lax.fori_loop(0, keys.shape[0] // size, step, total)


def _block_grads(reduction, queries, keys, *, params, first_row, first_column, total, cotangent, block_size):
    """Gradients of `cotangent · total` through `keys`' columns, recomputing one block at a time."""
    size = keys.shape[0] if block_size is None else block_size

    def step(carry, c):
        dqueries, dparams = carry

        def share(queries, block, params):
            return reduction.share(queries, block, params, first_row, first_column + c * size, total)

        block = lax.dynamic_slice_in_dim(keys, c * size, size)
        dqueries_c, dblock, dparams_c = jax.vjp(share, queries, block, params)[1](cotangent)
        return (dqueries + dqueries_c, _add(dparams, dparams_c)), dblock

    zeros = (jnp.zeros_like(queries), jax.tree.map(jnp.zeros_like, params))
    (dqueries, dparams), dkeys = lax.scan(step, zeros, jnp.arange(keys.shape[0] // size))
    return dqueries, dkeys.reshape(keys.shape), dparams


def _to_next_device(x, axis_name):
    devices = device_count(axis_name)
    return lax.ppermute(x, axis_name, [(d, (d + 1) % devices) for d in range(devices)])


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)
