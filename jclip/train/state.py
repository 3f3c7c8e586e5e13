"""The train state: everything that changes from one step to the next."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jclip import parallel


@struct.dataclass
class TrainState:
    """Step counter, model parameters and optimizer state; a pytree."""

    step: jax.Array
    params: Any
    opt_state: Any


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
    image_shape: tuple[int, ...], text_length: int, mesh: Mesh,
) -> TrainState:
    """Freshly initialised state, replicated over `mesh`."""

    def init(rng):
        images = jnp.zeros((1, *image_shape), jnp.float32)
        tokens = jnp.zeros((1, text_length), jnp.int32)
        params = model.init(rng, images, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def abstract_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
    text_length: int, mesh: Mesh,
) -> TrainState:
    """Shapes, dtypes and shardings of `create_train_state`'s result, without computing it."""
    shapes = jax.eval_shape(
        lambda rng: create_train_state(model, optimizer, rng, image_shape, text_length, mesh),
        jax.random.key(0),
    )
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
