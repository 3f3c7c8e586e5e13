"""The pure, sharded train step: forward, contrastive loss, backward, update.

The forward and backward passes are per-device code under `jax.shard_map`: each
device embeds its shard of the batch and the losses gather the embeddings over
the `data` axis, so loss and gradients are those of the global batch. The
optimizer update runs on the global arrays under `jax.jit`, where XLA places
the collectives that global-norm clipping, LAMB's trust ratios or Adafactor's
factored moments need when parameters are sharded (FSDP).
"""

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jclip import losses, parallel
from jclip.models.partitioning import gather_on_use
from jclip.parallel import DATA_AXIS
from jclip.train.gradient_cache import cached_loss_and_gradients
from jclip.train.objective import HOW_TO_PROVIDE, embeds_negatives, make_objective
from jclip.train.state import StateLayout, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DEFAULT_LOSSES = {"clip": {"weight": 1.0}}


def _replicated_specs(params: Any) -> Any:
    return jax.tree.map(lambda _: P(), params)


def make_gradient_function(model: nn.Module, mesh: Mesh, param_specs: Any,
                           loss_spec: Optional[Mapping[str, Mapping[str, Any]]] = None, micro_batches: int = 1,
                           image_op: Optional[Callable[[jax.Array], jax.Array]] = None, frozen: Sequence[str] = ()):
    """`(params, batch, rng) -> (metrics, grads)` over `mesh`, for use under `jax.jit`.

    `params` and `grads` are laid out as `param_specs` say (replicated, or FSDP
    shards gathered per layer on use); `metrics` hold the global-batch loss and
    its terms, scale (and bias), in-batch accuracy and embedding geometry. With
    `micro_batches > 1` the same gradient comes from gradient caching, with one
    micro-batch's activation memory. `rng` drives patch dropout (each device and
    micro-batch folds in its own index) and the losses' random draws (the same key
    on every device). When a term needs them (`negclip`), the batch's
    `negative_tokens` [B, K, L] are embedded by the text tower as `negative_ztxt`.
    `image_op` maps each device's (micro-)batch of images before the model: the
    per-pixel ops the input pipeline leaves to the step (`preprocess.batch_op`).
    The `frozen` parameter groups (`optimizer.frozen`, top-level names such as
    "image_tower") get zero gradients without computing them: behind a stop-gradient
    their backward pass is dead code, so a LiT step pays only the locked tower's
    forward pass.
    """
    loss_spec = loss_spec or DEFAULT_LOSSES
    objective = make_objective(loss_spec, DATA_AXIS)
    model_inputs = ("image", "tokens", "negative_tokens") if embeds_negatives(loss_spec) else ("image", "tokens")

    def embed(params, inputs, rng):
        params = {name: lax.stop_gradient(value) if name in frozen else value for name, value in params.items()}
        variables = {"params": gather_on_use(params, param_specs, DATA_AXIS)}
        images = inputs["image"] if image_op is None else image_op(inputs["image"])
        out = model.apply(variables, images, inputs["tokens"], train=True, rngs={"patch_dropout": rng})
        if "negative_tokens" in inputs:  # [b, K, L] hard-negative captions, embedded by the text tower
            negatives = inputs["negative_tokens"]
            flat = model.apply(variables, negatives.reshape(-1, negatives.shape[-1]), method="encode_text")
            out["negative_ztxt"] = flat.reshape(*negatives.shape[:2], -1)
        return out

    def per_device(params, batch, rng):
        loss_rng, rng = rng, jax.random.fold_in(rng, lax.axis_index(DATA_AXIS))
        missing = [name for name in model_inputs if name not in batch]
        if missing:
            raise ValueError(f"the configured losses need batch field(s) {missing}; "
                             f"{HOW_TO_PROVIDE['negative_ztxt']}")
        inputs = {name: batch[name] for name in model_inputs}
        loss = lambda out: objective(out, batch, loss_rng)
        if micro_batches > 1:
            (value, (terms, out)), grads = cached_loss_and_gradients(embed, loss, params, inputs, rng, micro_batches)
        else:
            def total_loss(params):
                out = embed(params, inputs, rng)
                value, terms = loss(out)
                return value, (terms, out)

            (value, (terms, out)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
        accuracy = losses.top1_accuracy(out["zimg"], out["ztxt"], axis_name=DATA_AXIS)
        metrics = {
            "loss": value, **(terms if len(terms) > 1 else {}), "scale": out["scale"],
            **({"bias": out["bias"]} if "bias" in out else {}),
            **{f"accuracy_{direction}": v for direction, v in accuracy.items()},
            **losses.embedding_geometry(out["zimg"], out["ztxt"], axis_name=DATA_AXIS),
        }
        return metrics, grads

    return jax.shard_map(per_device, mesh=mesh, in_specs=(param_specs, P(DATA_AXIS), P()),
                         out_specs=(P(), param_specs))


def make_gradient_step(model: nn.Module, mesh: Mesh, loss_spec=None, micro_batches: int = 1,
                       param_specs: Any = None):
    """A jitted `(params, batch) -> (loss, grads)` over `mesh`: the global-batch loss and gradients.

    `param_specs` default to replicated parameters.
    """

    def step(params, batch):
        specs = _replicated_specs(params) if param_specs is None else param_specs
        gradients = make_gradient_function(model, mesh, specs, loss_spec, micro_batches)
        metrics, grads = gradients(params, batch, jax.random.key(0))
        return metrics["loss"], grads

    return jax.jit(step)


def make_train_step(
    layout: StateLayout, loss_spec: Optional[Mapping[str, Mapping[str, Any]]] = None, micro_batches: int = 1,
    ema_decay: float = 0.0, seed: int = 0, image_op: Optional[Callable[[jax.Array], jax.Array]] = None,
    frozen: Sequence[str] = (),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A jitted `(state, batch) -> (state, metrics)` for states laid out as `layout` says.

    `image_op` finishes the batch's images on the devices, and the `frozen`
    groups' gradients are not computed (see `make_gradient_function`; the
    optimizer must keep those groups fixed too, as `optimizer.frozen` does). After the update, `scale` is clamped at the
    model's `max_scale`, and the EMA of the parameters (when the state has one)
    moves by `1 - ema_decay` towards them. The state is donated: do not reuse
    the one passed in.
    """
    model, optimizer, mesh = layout.model, layout.optimizer, layout.mesh
    max_scale = getattr(model, "max_scale", None)
    gradients = make_gradient_function(model, mesh, layout.specs.params, loss_spec, micro_batches, image_op, frozen)

    def step(state: TrainState, batch: Batch):
        metrics, grads = gradients(state.params, batch, jax.random.fold_in(jax.random.key(seed), state.step))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if max_scale is not None:
            params = {**params, "logit_scale": losses.clamp_log_scale(params["logit_scale"], max_scale)}
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema_params, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics

    return jax.jit(step, in_shardings=(layout.shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(layout.shardings, parallel.replicated(mesh)), donate_argnums=0)
