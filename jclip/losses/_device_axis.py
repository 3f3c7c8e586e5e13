"""The device axis of a per-device (pmap / shard_map) loss; every helper is the identity when `axis_name` is None.

Device d holds global rows d·b .. d·b + b - 1 (b the local batch): `lax.all_gather(tiled=True)`,
`lax.axis_index` and the ring in `blocks.py` all use this one device order.
"""

import jax.numpy as jnp
from jax import lax


def device_count(axis_name):
    return 1 if axis_name is None else lax.axis_size(axis_name)


def device_index(axis_name):
    return 0 if axis_name is None else lax.axis_index(axis_name)


def global_sum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def gather_rows(x, axis_name):
    """The global `[B, ...]` array from each device's `[b, ...]` rows (differentiable)."""
    return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)


def first_global_row(local_batch, axis_name):
    """Global index of this device's first row: a local row i pairs with global column this + i."""
    return device_index(axis_name) * local_batch


def own_columns(local_batch, axis_name):
    """`[b, B]` bool: True where global column j is local row i's own pair (its positive)."""
    rows = first_global_row(local_batch, axis_name) + jnp.arange(local_batch)
    return rows[:, None] == jnp.arange(local_batch * device_count(axis_name))[None, :]
