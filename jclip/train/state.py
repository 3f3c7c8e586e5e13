"""The train state (everything that changes from one step to the next) and how it is laid out.

A `StateLayout` is computed once per run: the model, optimizer and input shapes the state is made
for, and the state's PartitionSpecs and abstract value (shapes, dtypes, shardings). Creating,
restoring and stepping the state all take it. Parameters lie as `jclip.parameter_layout` says;
optimizer state follows its parameter: a moment with the parameter's path and shape gets the
parameter's sharding, anything else (counts, Adafactor's factored moments) is replicated.
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from jclip.parameter_layout import init_params, named, parameter_shapes, parameter_specs, with_shardings


@struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state and, when enabled, the EMA of the parameters."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Optional[Any] = None


class StateLayout(NamedTuple):
    """What a train state is made for (model, optimizer, input shapes, mesh) and how it lies on the mesh.

    `specs`: a `TrainState` of PartitionSpecs; `abstract`: a `TrainState` of `jax.ShapeDtypeStruct`s with
    their shardings, the target of a restore.
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    image_shape: tuple[int, ...]
    text_length: int
    mesh: Mesh
    specs: TrainState
    abstract: TrainState

    @property
    def shardings(self) -> TrainState:
        return named(self.specs, self.mesh)


def state_layout(model: nn.Module, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
                 text_length: int, mesh: Mesh, parameter_sharding: str = "replicated",
                 ema: bool = False) -> StateLayout:
    """The layout of the state of `model` trained by `optimizer`, parameters laid out by `parameter_sharding`
    ("replicated" or "fsdp"), with an EMA of the parameters if `ema`."""
    params = parameter_shapes(model, image_shape, text_length)
    param_specs = parameter_specs(model, parameter_sharding, mesh, image_shape, text_length, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    specs = TrainState(step=P(), params=param_specs, opt_state=_follow_parameters(opt_state, params, param_specs),
                       ema_params=param_specs if ema else None)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                        ema_params=params if ema else None)
    return StateLayout(model, optimizer, tuple(image_shape), text_length, mesh, specs,
                       with_shardings(shapes, named(specs, mesh)))


def create_train_state(layout: StateLayout, rng: jax.Array) -> TrainState:
    """A freshly initialised state at step 0, made directly in the layout's shardings."""
    init = lambda rng: _start(layout, init_params(layout.model, rng, layout.image_shape, layout.text_length))
    return jax.jit(init, out_shardings=layout.shardings)(rng)


def train_state_from_params(layout: StateLayout, params: Any) -> TrainState:
    """A state at step 0 that starts from `params` (a parameters-only checkpoint) with a fresh optimizer."""
    return jax.jit(lambda params: _start(layout, params), out_shardings=layout.shardings)(params)


def _start(layout: StateLayout, params: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=layout.optimizer.init(params),
                      ema_params=params if layout.specs.ema_params is not None else None)


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
