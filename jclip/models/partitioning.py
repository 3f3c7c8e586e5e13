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
replicated. `fsdp_param_shardings` turns a model into those shardings.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh

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


def fsdp_param_shardings(model: nn.Module, mesh: Mesh, *example_inputs: Any, rules=FSDP_RULES) -> Any:
    """NamedShardings of `model.init(rng, *example_inputs)["params"]` under `rules`.

    `model` must be built with `logical_axes=True`; parameters without names
    (scalars, norms, biases) are replicated.
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs)["params"])
    specs = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
