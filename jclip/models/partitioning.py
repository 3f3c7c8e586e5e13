"""Logical axis names on parameters, and their mapping to the mesh for FSDP.

Every kernel and embedding of jclip's models is created through `initializer`,
which, when the model is built with `logical_axes=True`, wraps the initializer
in `nn.with_logical_partitioning`: `model.init` then returns `nn.Partitioned`
boxes carrying names such as ("embed", "mlp"). With the default
`logical_axes=False` the same code returns plain arrays, which is what the
data-parallel trainer keeps in its state.

The names used:

    embed   the residual-stream width of a tower (and conv output channels)
    mlp     the hidden width of an MLP block
    heads   attention heads;  kv: the per-head width
    vocab   the token vocabulary
    conv_in / conv_h / conv_w   convolution input channels and spatial taps
    proj    a tower's output (the shared embedding space)
    seq     positions (position embeddings, latent queries)

`FSDP_RULES` maps them onto the single `data` mesh axis of `jclip.parallel`:
each parameter is split along its `embed` dimension over all devices (fully
sharded data parallelism, as in ZeRO-3 / PaLM's FSDP), everything else
replicated. `fsdp_param_specs` turns a model into those partition specs.

Inside per-device code (`jax.shard_map`) each device holds its shard of such a
parameter; `gather_on_use` boxes the shards so that a layer all-gathers its
parameter when it reads it. Gathering happens per layer, at the point of use
(and again in the backward pass of a rematerialised block), and the gradient of
the all-gather is a reduce-scatter: every device receives the summed gradient
of its own shard only.

The models also run on a global batch sharded over an explicit mesh, where JAX
must know every result's sharding: `repeat_over_batch` (learned tokens and
masks joined to the batch), `Embed` (token lookups) and `Conv` / `batch_conv`
(convolutions and their kernel gradients) give it. Elsewhere they are the
plain operations.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.core import meta
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Initializer = Callable[..., jax.Array]

FSDP_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "data"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("proj", None),
    ("seq", None),
)


def initializer(init: Initializer, axes: Sequence[str], logical_axes: bool) -> Initializer:
    """`init`, annotated with the logical `axes` of its parameter when `logical_axes` is set."""
    return nn.with_logical_partitioning(init, tuple(axes)) if logical_axes else init


def _is_spec(x) -> bool:
    return isinstance(x, P)


def fsdp_param_specs(model: nn.Module, mesh: Mesh, *example_inputs: Any, rules=FSDP_RULES) -> Any:
    """Mesh PartitionSpecs of `model.init(rng, *example_inputs)["params"]` under `rules`.

    `model` must be built with `logical_axes=True`. Parameters without names
    (scalars, norms, biases) are replicated, and so is a parameter whose sharded
    dimension does not divide by the number of devices on its mesh axis.
    """
    abstract = jax.eval_shape(lambda *inputs: model.init(jax.random.key(0), *inputs)["params"], *example_inputs)
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)

    def divisible(spec, shape):
        fits = all(axis is None or shape.shape[dim] % mesh.shape[axis] == 0 for dim, axis in enumerate(spec))
        return spec if fits else P()

    return jax.tree.map(divisible, specs, meta.unbox(abstract), is_leaf=_is_spec)


def fsdp_param_shardings(model: nn.Module, mesh: Mesh, *example_inputs: Any, rules=FSDP_RULES) -> Any:
    """`fsdp_param_specs` as NamedShardings on `mesh`."""
    specs = fsdp_param_specs(model, mesh, *example_inputs, rules=rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


@struct.dataclass
class GatherOnUse(meta.AxisMetadata):
    """A device's shard of a parameter, all-gathered along `dim` over `axis_name` when a layer reads it."""

    value: Any
    dim: int = struct.field(pytree_node=False)
    axis_name: str = struct.field(pytree_node=False)

    def unbox(self) -> jax.Array:
        return lax.all_gather(self.value, self.axis_name, axis=self.dim, tiled=True)

    def replace_boxed(self, val: Any) -> "GatherOnUse":
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict) -> "GatherOnUse":
        return self.replace(dim=self.dim + (index <= self.dim))

    def remove_axis(self, index: int, params: dict) -> "GatherOnUse":
        return self.replace(dim=self.dim - (index < self.dim))


def gather_on_use(params: Any, specs: Any, axis_name: str) -> Any:
    """Per-device `params` (shards where `specs` split a dimension over `axis_name`) for `model.apply`.

    Sharded parameters are boxed in `GatherOnUse`; replicated ones pass through.
    """

    def box(spec, value):
        dims = [dim for dim, axis in enumerate(spec) if axis == axis_name]
        return GatherOnUse(value, dims[0], axis_name) if dims else value

    return jax.tree.map(box, specs, params, is_leaf=_is_spec)


def vary_alike(*arrays):
    """Under `jax.shard_map`, mark each array as varying over every mesh axis any of them varies over.

    A replicated parameter applied to a per-device input has a per-device
    gradient; a custom VJP must see the parameter as per-device too, and the
    cast's transpose then sums the gradient over the axis, as plain autodiff
    would. Outside `shard_map` nothing varies and the arrays come back as they are.
    """
    axes = set().union(*(jax.typeof(x).mat.varying for x in arrays))
    return tuple(lax.pcast(x, tuple(sorted(axes - jax.typeof(x).mat.varying)), to="varying")
                 if axes - jax.typeof(x).mat.varying else x for x in arrays)


def repeat_over_batch(value: jax.Array, like: jax.Array) -> jax.Array:
    """`value` [1, ...] (a learned token, a mask of ones) repeated over the batch of `like` [B, ...].

    The result is sharded as `like` along the batch: under an explicit mesh, a
    replicated parameter broadcast to [B, ...] stays replicated, and joining it
    to a batch-sharded array (a concatenation, an attention) is a sharding error.
    """
    batch_zeros = jnp.zeros_like(like[(slice(None),) + (0,) * (like.ndim - 1)], dtype=value.dtype)
    return value + jnp.expand_dims(batch_zeros, tuple(range(1, value.ndim)))


def _explicit(sharding) -> bool:
    return AxisType.Explicit in getattr(sharding.mesh, "axis_types", ())


def batch_conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` of a batch `lhs` [B, ...] (batch first, as NHWC), for `nn.Conv` too.

    Under an explicit mesh JAX cannot type the kernel's gradient, a sum over the
    sharded batch; the convolution then runs with automatic sharding, its output
    sharded as the batch.
    """
    batch_spec = jax.typeof(lhs).sharding.spec[0] if _explicit(jax.typeof(lhs).sharding) else None
    if batch_spec is None:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    convolve = lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    return jax.sharding.auto_axes(convolve, out_sharding=P(batch_spec))(lhs, rhs)


class Conv(nn.Conv):
    """`nn.Conv` (the same parameters) whose convolution works on batches sharded over an explicit mesh."""

    conv_general_dilated: Callable = batch_conv


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]`: rows of a replicated table (a token embedding) at integer `ids` [...] -> [..., width].

    Under an explicit mesh the gather's output sharding is ambiguous, and JAX
    asks for one: the rows are sharded as `ids` are.
    """
    sharding = jax.typeof(ids).sharding
    if not _explicit(sharding):
        return jnp.take(table, ids, axis=0)
    return table.at[ids].get(out_sharding=P(*sharding.spec, None))


class Embed(nn.Embed):
    """`nn.Embed` (the same parameter) whose lookup works on batches sharded over an explicit mesh."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers; got {inputs.dtype}")
        return take_rows(jnp.asarray(self.embedding, self.dtype), inputs)
