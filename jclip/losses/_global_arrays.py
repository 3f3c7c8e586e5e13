"""Losses on global arrays laid out over a mesh: the per-device form, run by `jax.shard_map`.

With `axis_name=None` under `jax.jit`, arrays sharded over a mesh are partitioned by JAX: under an
explicit mesh (this JAX's default) a product of two batch-sharded arrays has no legal sharding, and
under an auto mesh XLA picks the intermediates' layouts itself. `over_batch_axes` makes the choice
instead: the loss runs per device over the mesh axes that shard the batch, as written for `pmap`,
so each device keeps its own rows as queries and gathers the key columns, and holds at most its
`[B/N, B]` rows of logits (its `[B/N, block]` tile with `block_size`; `ring=True` works too). The
value and gradients are those of the whole batch; gradients come back sharded like their inputs.

The batch axes: under an explicit mesh, those that shard the batch dimension of the first batch
input; under an auto mesh, which does not record it, every axis of the mesh (XLA moves the
O(B·dim) inputs, cheap next to the O(B²) logits). The loss runs on the arrays as they are when
they are on no mesh, inside `pmap` / `shard_map` (manual axes: the arrays are the local shard), on
an explicit mesh that replicates the batch, or on an auto mesh whose devices do not divide it.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def over_batch_axes(*, batch, replicated=(), sharded_output=False):
    """Decorates a per-device loss so that, with `axis_name=None`, it runs per device on global arrays.

    `batch` names the array arguments whose leading axis is the batch, `replicated` the other
    array arguments (scale, bias, PRNG keys); everything else is a static option. The output is
    replicated, or, with `sharded_output`, sharded over the batch axes like the batch inputs.
    """

    def decorate(loss):
        signature = inspect.signature(loss)

        @functools.wraps(loss)
        def run(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            if arguments.get("axis_name") is not None:
                return loss(**arguments)
            arrays = {name: arguments[name] for name in (*batch, *replicated) if arguments.get(name) is not None}
            layout = _batch_layout([arrays[name] for name in batch if name in arrays])
            if layout is None:
                return loss(**arguments)
            mesh, axis, explicit = layout
            options = {name: value for name, value in arguments.items() if name not in (*arrays, "axis_name")}
            # Input errors name the global shapes the caller passed, not the per-device ones (checked
            # as on one device, where a ring is no ring and has no type of its own).
            whole = {**options, "ring": False} if "ring" in options else options
            whole = {**whole, "ring_dtype": None} if "ring_dtype" in whole else whole
            jax.eval_shape(lambda values: loss(**whole, **values), jax.tree.map(_abstract, arrays))
            specs = {name: P(axis) if name in batch else P() for name in arrays}
            values = {name: _place(arrays[name], NamedSharding(mesh, specs[name]), explicit) for name in arrays}
            per_device = jax.shard_map(
                lambda values: loss(**options, **values, axis_name=axis), mesh=mesh, in_specs=(specs,),
                out_specs=P(axis) if sharded_output else P(),
            )
            return per_device(values)

        return run

    return decorate


def _batch_layout(batch_arrays):
    """(mesh, batch axis name or tuple of names, whether the mesh is explicit) to run per device over, or None
    to run on the arrays as they are."""
    types = [jax.typeof(x) for x in batch_arrays]
    if not types or len({t.shape[:1] for t in types}) != 1 or not types[0].shape:
        return None  # the loss's own checks explain a mismatch
    mesh = types[0].sharding.mesh
    if mesh.empty or AxisType.Manual in mesh.axis_types:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    explicit = AxisType.Explicit in mesh.axis_types
    if explicit:
        axes = next((t.sharding.spec[0] for t in types if t.sharding.spec and t.sharding.spec[0] is not None), None)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    else:
        axes = tuple(name for name in mesh.axis_names if sizes[name] > 1)
    devices = math.prod(sizes[name] for name in axes)
    if devices == 1 or types[0].shape[0] % devices:
        return None
    return mesh, axes[0] if len(axes) == 1 else axes, explicit


def _abstract(x):
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _place(x, sharding, explicit):
    """`x` as a JAX array; under an explicit mesh, resharded to what `shard_map` expects."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    return jax.sharding.reshard(x, sharding) if explicit else x
