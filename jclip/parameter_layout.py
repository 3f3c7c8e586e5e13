"""How a model's parameters lie on a mesh: their shapes, dtypes and shardings, computed without any values.

Parameters are either replicated on every device (plain data parallelism) or, with
`parameter_sharding="fsdp"`, split over the `data` axis along their `embed` dimension
(`jclip.models.partitioning`). Checkpoints restore parameters into this layout, and the trainer
builds its state on it.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jclip.models.partitioning import fsdp_param_specs

PARAMETER_SHARDINGS = ("replicated", "fsdp")


def parameter_name(path) -> str:
    """A parameter's name from its path in the parameter tree: "image_tower/encoder/block_0/mlp/fc/kernel"."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def example_inputs(image_shape: tuple[int, ...], text_length: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """A batch of one image and one caption, abstractly: what the model is initialised and traced with."""
    return (jax.ShapeDtypeStruct((1, *image_shape), jnp.float32), jax.ShapeDtypeStruct((1, text_length), jnp.int32))


def init_params(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...], text_length: int) -> Any:
    """Freshly initialised parameters (plain arrays, partitioning annotations removed)."""
    images, tokens = (jnp.zeros(x.shape, x.dtype) for x in example_inputs(image_shape, text_length))
    return meta.unbox(model.init(rng, images, tokens)["params"])


def parameter_shapes(model: nn.Module, image_shape: tuple[int, ...], text_length: int) -> Any:
    """The parameters' shapes and dtypes (`jax.ShapeDtypeStruct`s), without computing them."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_shape, text_length))


def parameter_specs(model: nn.Module, parameter_sharding: str, mesh: Optional[Mesh], image_shape: tuple[int, ...],
                    text_length: int, shapes: Any = None) -> Any:
    """The PartitionSpec of every parameter under `parameter_sharding` ("replicated", or "fsdp", which needs `mesh`).
    `shapes`: the `parameter_shapes`, when the caller has them already."""
    if parameter_sharding == "fsdp":
        return fsdp_param_specs(model.clone(logical_axes=True), mesh, *example_inputs(image_shape, text_length))
    if parameter_sharding == "replicated":
        shapes = parameter_shapes(model, image_shape, text_length) if shapes is None else shapes
        return jax.tree.map(lambda _: P(), shapes)
    raise ValueError(f"unknown parameter_sharding {parameter_sharding!r}; use one of {PARAMETER_SHARDINGS}")


def abstract_params(model: nn.Module, parameter_sharding: str, mesh: Mesh, image_shape: tuple[int, ...],
                    text_length: int) -> Any:
    """Shapes, dtypes and shardings of the model's parameters laid out by `parameter_sharding`."""
    shapes = parameter_shapes(model, image_shape, text_length)
    specs = parameter_specs(model, parameter_sharding, mesh, image_shape, text_length, shapes)
    return with_shardings(shapes, named(specs, mesh))


def named(specs: Any, mesh: Mesh) -> Any:
    """PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `shapes` carrying the matching leaf of `shardings`."""
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes, shardings)
