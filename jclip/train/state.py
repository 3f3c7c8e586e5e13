"""The train state (everything that changes from one step to the next) and how it is laid out.

Parameters are either replicated on every device (plain data parallelism) or,
with `parameter_sharding="fsdp"`, split over the `data` axis along their
`embed` dimension (`jclip.models.partitioning`). Optimizer state follows its
parameter: a moment with the parameter's path and shape gets the parameter's
sharding; anything else (counts, Adafactor's factored moments) is replicated.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jclip.models.partitioning import fsdp_param_specs

PARAMETER_SHARDINGS = ("replicated", "fsdp")


@struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state and, when enabled, the EMA of the parameters."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Optional[Any] = None


def _example_inputs(image_shape: tuple[int, ...], text_length: int):
    return (jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
            jax.ShapeDtypeStruct((1, text_length), jnp.int32))


def _init_params(model: nn.Module, rng: jax.Array, image_shape, text_length):
    images = jnp.zeros((1, *image_shape), jnp.float32)
    tokens = jnp.zeros((1, text_length), jnp.int32)
    return meta.unbox(model.init(rng, images, tokens)["params"])


def parameter_specs(model: nn.Module, parameter_sharding: str, mesh: Optional[Mesh], image_shape: tuple[int, ...],
                    text_length: int) -> Any:
    """The PartitionSpec of every parameter under `parameter_sharding` ("replicated" or "fsdp", which needs `mesh`)."""
    if parameter_sharding == "fsdp":
        return fsdp_param_specs(model.clone(logical_axes=True), mesh, *_example_inputs(image_shape, text_length))
    if parameter_sharding == "replicated":
        return jax.tree.map(lambda _: P(), jax.eval_shape(
            lambda: _init_params(model, jax.random.key(0), image_shape, text_length)))
    raise ValueError(f"unknown parameter_sharding {parameter_sharding!r}; use one of {PARAMETER_SHARDINGS}")


def abstract_params(model: nn.Module, parameter_sharding: str, mesh: Mesh, image_shape: tuple[int, ...],
                    text_length: int) -> Any:
    """Shapes, dtypes and shardings of the model's parameters laid out by `parameter_sharding`."""
    shapes = jax.eval_shape(lambda: _init_params(model, jax.random.key(0), image_shape, text_length))
    shardings = named(parameter_specs(model, parameter_sharding, mesh, image_shape, text_length), mesh)
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes, shardings)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _follow_parameters(tree_shapes: Any, param_shapes: Any, param_specs: Any) -> Any:
    """Specs for `tree_shapes` (optimizer state): a leaf whose path ends with a parameter's path and
    that has the parameter's shape takes the parameter's spec; other leaves are replicated."""
    by_path = {}
    for (path, shape), spec in zip(jax.tree_util.tree_leaves_with_path(param_shapes),
                                   jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))):
        by_path[_keys(path)] = (shape.shape, spec)

    def spec_of(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, tree_shapes)


def state_specs(model: nn.Module, optimizer: optax.GradientTransformation, param_specs: Any,
                image_shape: tuple[int, ...], text_length: int, ema: bool) -> TrainState:
    """PartitionSpecs of every leaf of the train state."""
    params = jax.eval_shape(lambda: _init_params(model, jax.random.key(0), image_shape, text_length))
    opt_state = jax.eval_shape(optimizer.init, params)
    return TrainState(step=P(), params=param_specs, opt_state=_follow_parameters(opt_state, params, param_specs),
                      ema_params=param_specs if ema else None)


def named(specs: Any, mesh: Mesh) -> Any:
    """PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def replicated_state_specs(model: nn.Module, optimizer: optax.GradientTransformation,
                           image_shape: tuple[int, ...], text_length: int) -> TrainState:
    """Specs of a plain data-parallel state without EMA: everything replicated."""
    params = parameter_specs(model, "replicated", None, image_shape, text_length)
    return state_specs(model, optimizer, params, image_shape, text_length, ema=False)


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...], text_length: int, mesh: Mesh,
                       specs: Optional[TrainState] = None) -> TrainState:
    """Freshly initialised state, laid out on `mesh` as `specs` (from `state_specs`; default replicated) say."""
    if specs is None:
        specs = replicated_state_specs(model, optimizer, image_shape, text_length)

    def init(rng):
        params = _init_params(model, rng, image_shape, text_length)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          ema_params=params if specs.ema_params is not None else None)

    return jax.jit(init, out_shardings=named(specs, mesh))(rng)


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
                         text_length: int, mesh: Mesh, specs: Optional[TrainState] = None) -> TrainState:
    """Shapes, dtypes and shardings of `create_train_state`'s result, without computing it."""
    if specs is None:
        specs = replicated_state_specs(model, optimizer, image_shape, text_length)
    shapes = jax.eval_shape(
        lambda rng: create_train_state(model, optimizer, rng, image_shape, text_length, mesh, specs),
        jax.random.key(0),
    )
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes, named(specs, mesh))
