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
each block's logits in the backward pass (Inf-CL, Cheng et al. 2024, arXiv 2410.17243). With
`block_size`, the query rows are tiled too (`_query_tile`), so a tile's logits and query gradients are
small whatever the local batch; every tile's gradients are added in place. In the backward ring each
key block travels once more, collecting its key gradient from every device, until the N-th `ppermute`
brings it home; the keys and their gradients travel a block at a time, each block passed on once it is
used, so no second copy of them is in flight. `reduce_both_ways` runs the two directions of a symmetric
loss through one custom VJP that accumulates both directions' gradients in one buffer per input: per
device the ring then holds three `[b, dim]` arrays (the travelling keys, the two gradients) besides its
inputs, 0.8 GiB at a global batch of 1,048,576 × 512 over 8 devices. With `ring_dtype` (bfloat16) the
keys travel, and enter the logits, rounded to that type, while the queries, the logits, the sums and every
gradient stay float32: half the bytes on the ring for the keys, and a travelling key buffer of half the
size. Every step, the first included,
runs inside the loops (the N-th shift of the keys in the forward ring only brings them home): a step
peeled out of the loop would let XLA schedule two rings side by side.
"""

import math
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import device_count, device_index, first_global_row, gather_rows

# A tile of query rows spans at most this many blocks of `block_size` (`_query_tile`).
QUERY_TILE_BLOCKS = 16


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


def reduce_over_keys(reduction, queries, keys, params, *, axis_name, ring, block_size, ring_dtype=None):
    """Per-row `total` of local `queries` `[b, dim]` over the keys of all devices.

    `keys` are this device's `[b, dim]` key rows; `params` a pytree of per-row arrays passed to the
    block functions and differentiated like `queries`; `ring_dtype`: the keys' type on the ring (None:
    their own).
    """
    if ring:
        return _tiled(reduction, queries, keys, params, axis_name, True, block_size, ring_dtype)
    keys = gather_rows(keys, axis_name)
    if block_size is None:
        first_row = first_global_row(queries.shape[0], axis_name)
        return reduction.finish(reduction.value(queries, keys, params, first_row, 0))
    return _tiled(reduction, queries, keys, params, axis_name, False, block_size, None)


def reduce_both_ways(reduction, a, b, params_a, params_b, *, axis_name, ring, block_size, ring_dtype=None):
    """(`reduce_over_keys` of rows `a` over keys `b` with `params_a`, and of rows `b` over keys `a` with
    `params_b`): the two directions of a symmetric loss. In the ring, the two share one custom VJP whose
    backward pass adds both directions' gradients into one buffer per input and passes both directions' keys
    in one buffer, so that the pair needs no more memory than one direction."""
    if not ring:
        return tuple(reduce_over_keys(reduction, queries, keys, params, axis_name=axis_name, ring=ring,
                                      block_size=block_size)
                     for queries, keys, params in ((a, b, params_a), (b, a, params_b)))
    return _tiled_both(reduction, a, b, params_a, params_b, axis_name, ring, block_size, ring_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6, 7))
def _tiled(reduction, queries, keys, params, axis_name, ring, block_size, ring_dtype):
    return _forward_pass(reduction, queries, keys, params, axis_name, ring, block_size, ring_dtype)


def _tiled_forward(reduction, queries, keys, params, axis_name, ring, block_size, ring_dtype):
    total = _forward_pass(reduction, queries, keys, params, axis_name, ring, block_size, ring_dtype)
    return total, (queries, keys, params, total)


def _tiled_backward(reduction, axis_name, ring, block_size, ring_dtype, residuals, cotangent):
    queries, keys, params, total = residuals
    zeros = (jnp.zeros_like(queries), jnp.zeros_like(keys), jax.tree.map(jnp.zeros_like, params))
    return _backward_pass(reduction, queries, keys, params, total, cotangent, zeros, axis_name, ring, block_size,
                          ring_dtype)[1]


_tiled.defvjp(_tiled_forward, _tiled_backward)


@partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6, 7, 8))
def _tiled_both(reduction, a, b, params_a, params_b, axis_name, ring, block_size, ring_dtype):
    return (_forward_pass(reduction, a, b, params_a, axis_name, ring, block_size, ring_dtype),
            _forward_pass(reduction, b, a, params_b, axis_name, ring, block_size, ring_dtype))


def _tiled_both_forward(reduction, a, b, params_a, params_b, axis_name, ring, block_size, ring_dtype):
    totals = _tiled_both(reduction, a, b, params_a, params_b, axis_name, ring, block_size, ring_dtype)
    return totals, (a, b, params_a, params_b, totals)


def _tiled_both_backward(reduction, axis_name, ring, block_size, ring_dtype, residuals, cotangents):
    a, b, params_a, params_b, (total_a, total_b) = residuals
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    options = (axis_name, ring, block_size, ring_dtype)
    travelled, (da, db, dparams_a) = _backward_pass(reduction, a, b, params_a, total_a, cotangents[0],
                                                    (zeros(a), zeros(b), zeros(params_a)), *options)
    # The second ring's keys travel in the first ring's buffer, free once the first ring is done. Written
    # as a function of that buffer (`0 * travelled` is not folded away for floats), XLA cannot make the copy
    # early, which would hold a third [b, dim] buffer during the first ring.
    keys = _on_the_ring(a, ring_dtype) + 0 * travelled
    _, (db, da, dparams_b) = _backward_pass(reduction, b, a, params_b, total_b, cotangents[1],
                                            (db, da, zeros(params_b)), *options, travelling_keys=keys)
    return da, db, dparams_a, dparams_b


_tiled_both.defvjp(_tiled_both_forward, _tiled_both_backward)


def _on_the_ring(keys, ring_dtype):
    return keys if ring_dtype is None else keys.astype(ring_dtype)


def _forward_pass(reduction, queries, keys, params, axis_name, ring, block_size, ring_dtype):
    """Per-row `total` of `queries` over the keys: this device's (gathered) keys, or all devices' in turn."""
    first_row = first_global_row(queries.shape[0], axis_name)
    fold = partial(_fold_blocks, reduction, queries, params=params, first_row=first_row, block_size=block_size)
    if not ring:
        total, _ = fold(keys, reduction.identity(queries[:, 0]), first_column=0)
    else:
        devices, device = device_count(axis_name), device_index(axis_name)

        def step(t, carry):
            total, keys = carry
            return fold(keys, total, first_column=(device - t) % devices * keys.shape[0],
                        send=partial(_to_next_device, axis_name=axis_name))

        keys = _on_the_ring(keys, ring_dtype)
        total, _ = lax.fori_loop(0, devices, step, (reduction.identity(queries[:, 0]), keys))
    return reduction.finish(total)


def _backward_pass(reduction, queries, keys, params, total, cotangent, accumulated, axis_name, ring, block_size,
                   ring_dtype, travelling_keys=None):
    """`accumulated` (gradients of the queries, the keys and `params`) plus those of `cotangent · total`; in
    the ring each key block's gradient travels with it, collecting every device's part, until the N-th
    shift brings both home."""
    grads = partial(
        _block_grads, reduction, queries, params=params, first_row=first_global_row(queries.shape[0], axis_name),
        total=total, cotangent=cotangent, block_size=block_size,
    )
    if not ring:
        return grads(keys, accumulated, first_column=0)
    devices, device = device_count(axis_name), device_index(axis_name)

    def step(t, carry):
        keys, accumulated = carry
        return grads(keys, accumulated, first_column=(device - t) % devices * keys.shape[0],
                     send=partial(_to_next_device, axis_name=axis_name))

    keys = _on_the_ring(keys, ring_dtype) if travelling_keys is None else travelling_keys
    return lax.fori_loop(0, devices, step, (keys, accumulated))


def _query_tile(rows: int, block_size) -> int:
    """Query rows per tile: all of them without a block size, else up to `QUERY_TILE_BLOCKS` blocks' worth
    (a divisor of `rows`), so that a tile's logits and its query gradients stay small however large the
    local batch is."""
    if block_size is None:
        return rows
    return block_size * math.gcd(rows // block_size, QUERY_TILE_BLOCKS) if rows % block_size == 0 else rows


def _rows(tree, start, size):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size), tree)


def _put_rows(tree, rows, start):
    return jax.tree.map(lambda x, r: lax.dynamic_update_slice_in_dim(x, r, start, 0), tree, rows)


def _fold_blocks(reduction, queries, keys, total, *, params, first_row, first_column, block_size, send=None):
    """(`total` combined with `reduction.value` over `keys` in blocks of `block_size` columns, each block
    against the queries a tile of rows at a time (`_query_tile`); the keys, each block replaced by what
    `send(block)` returns once it is used, if `send` is given: the ring passes the keys on a block at a
    time, so that only one block is ever in flight besides the keys themselves)."""
    size = keys.shape[0] if block_size is None else block_size
    rows = _query_tile(queries.shape[0], block_size)

    def block_step(c, carry):
        total, keys = carry
        block = lax.dynamic_slice_in_dim(keys, c * size, size)

        def row_step(r, total):
            tile = reduction.value(lax.dynamic_slice_in_dim(queries, r * rows, rows), block.astype(queries.dtype),
                                   _rows(params, r * rows, rows), first_row + r * rows, first_column + c * size)
            return _put_rows(total, reduction.combine(_rows(total, r * rows, rows), tile), r * rows)

        total = lax.fori_loop(0, queries.shape[0] // rows, row_step, total)
        return total, keys if send is None else lax.dynamic_update_slice_in_dim(keys, send(block), c * size, 0)

    return lax.fori_loop(0, keys.shape[0] // size, block_step, (total, keys))


def _block_grads(reduction, queries, keys, accumulated, *, params, first_row, first_column, total, cotangent,
                 block_size, send=None):
    """(the keys, `accumulated` (query, key and params gradients) plus the gradients of `cotangent · total`
    through `keys`' columns), recomputing one tile of logits at a time and adding each tile's gradients in
    place; with `send`, each block of the keys and of their gradients is passed on once it is done, as in
    `_fold_blocks`."""
    size = keys.shape[0] if block_size is None else block_size
    rows = _query_tile(queries.shape[0], block_size)

    def block_step(c, carry):
        keys, (dqueries, dkeys, dparams) = carry
        block = lax.dynamic_slice_in_dim(keys, c * size, size)

        def row_step(r, carry):
            dqueries, dblock, dparams = carry

            def share(queries, block, params):
                return reduction.share(queries, block, params, first_row + r * rows, first_column + c * size,
                                       lax.dynamic_slice_in_dim(total, r * rows, rows))

            dqueries_r, dblock_r, dparams_r = jax.vjp(
                share, lax.dynamic_slice_in_dim(queries, r * rows, rows), block.astype(queries.dtype),
                _rows(params, r * rows, rows)
            )[1](lax.dynamic_slice_in_dim(cotangent, r * rows, rows))
            return (_put_rows(dqueries, _rows(dqueries, r * rows, rows) + dqueries_r, r * rows),
                    dblock + dblock_r,
                    _put_rows(dparams, _add(_rows(dparams, r * rows, rows), dparams_r), r * rows))

        dqueries, dblock, dparams = lax.fori_loop(0, queries.shape[0] // rows, row_step,
                                                  (dqueries, jnp.zeros_like(block, queries.dtype), dparams))
        dblock = lax.dynamic_slice_in_dim(dkeys, c * size, size) + dblock
        if send is not None:
            block, dblock = send(block), send(dblock)
            keys = lax.dynamic_update_slice_in_dim(keys, block, c * size, 0)
        dkeys = lax.dynamic_update_slice_in_dim(dkeys, dblock, c * size, 0)
        return keys, (dqueries, dkeys, dparams)

    return lax.fori_loop(0, keys.shape[0] // size, block_step, (keys, accumulated))


def _to_next_device(x, axis_name):
    devices = device_count(axis_name)
    return lax.ppermute(x, axis_name, [(d, (d + 1) % devices) for d in range(devices)])


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)
