"""The pure, sharded train step: forward, contrastive loss, backward, update."""

from typing import Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jclip import losses
from jclip.parallel import DATA_AXIS
from jclip.train.gradient_cache import cached_loss_and_gradients
from jclip.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def contrastive_loss(name: str) -> Callable[[dict, str], jax.Array]:
    """The loss `name` as a function of the model outputs and the mesh axis."""
    if name == "clip":
        return lambda out, axis: losses.clip_loss(out["zimg"], out["ztxt"], out["scale"], axis_name=axis)
    if name == "siglip":
        return lambda out, axis: losses.siglip_loss(
            out["zimg"], out["ztxt"], out["scale"], out["bias"], axis_name=axis
        )
    raise ValueError(f"unknown loss {name!r}; use 'clip' or 'siglip'")


def _loss_and_gradients(model: nn.Module, loss: str, micro_batches: int = 1):
    """Per-device `(params, batch) -> ((loss, outputs), grads)` for use under shard_map.

    The loss gathers the embeddings over the `data` axis, so its value is that of
    the global batch; with replicated params, shard_map's replication checking
    makes the gradient the global one too (the transpose of the implicit
    broadcast of the params sums the per-device contributions). With
    `micro_batches > 1` the same gradient is computed by gradient caching, with
    the activation memory of one micro-batch.
    """
    loss_fn = contrastive_loss(loss)

    def embed(params, images, tokens):
        return model.apply({"params": params}, images, tokens)

    if micro_batches > 1:
        return lambda params, batch: cached_loss_and_gradients(
            embed, lambda out: loss_fn(out, DATA_AXIS), params, batch["image"], batch["tokens"], micro_batches
        )

    def objective(params, batch):
        out = embed(params, batch["image"], batch["tokens"])
        return loss_fn(out, DATA_AXIS), out

    return jax.value_and_grad(objective, has_aux=True)


def make_gradient_step(model: nn.Module, mesh: Mesh, loss: str = "clip", micro_batches: int = 1):
    """A jitted `(params, batch) -> (loss, grads)` over `mesh`: the global-batch loss and gradients."""
    gradients = _loss_and_gradients(model, loss, micro_batches)

    def per_device(params, batch):
        (value, _), grads = gradients(params, batch)
        return value, grads

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P())))


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, loss: str = "clip",
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A jitted `(state, batch) -> (state, metrics)` that is data-parallel over `mesh`.

    `micro_batches > 1` computes the same gradient by gradient caching. The
    state is donated: do not reuse the one passed in.
    """
    gradients = _loss_and_gradients(model, loss, micro_batches)

    def per_device(state: TrainState, batch: Batch):
        (value, out), grads = gradients(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if model.max_scale is not None:
            params = {**params, "logit_scale": losses.clamp_log_scale(params["logit_scale"], model.max_scale)}
        metrics = {
            "loss": value,
            "scale": out["scale"],
            "grad_norm": optax.tree.norm(grads),
            **{f"accuracy_{direction}": value for direction, value in
               losses.top1_accuracy(out["zimg"], out["ztxt"], axis_name=DATA_AXIS).items()},
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)
