"""Optimizer and learning-rate schedule built from `config.optimizer`.

    config.optimizer.name = "adamw"            # or "adafactor", "lamb"
    config.optimizer.schedule = "cosine"       # or "linear", "rsqrt", "constant" (all after linear warm-up)
    config.optimizer.frozen = ("image_tower",) # LiT (Zhai et al. 2022): a locked image tower
    config.optimizer.lr_multipliers = {"text_tower": 0.1}
    config.optimizer.skip_nonfinite = True     # skip updates whose gradients are not finite

Top-level parameter groups are the model's submodules and parameters
(`image_tower`, `text_tower`, `logit_scale`, `logit_bias`).
"""

import re

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jclip.parameter_layout import parameter_name

# Parameters that get no weight decay besides 1-D ones (biases, norms, scale, bias):
# learned position embeddings and the class token.
NO_DECAY_PATTERN = re.compile(r"pos_embedding|cls_token")


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then `schedule` towards `end_learning_rate` at `total_steps`."""
    opt = config.optimizer
    peak, warmup = opt.learning_rate, opt.warmup_steps
    decay_steps = max(config.total_steps - warmup, 1)
    name = opt.get("schedule", "cosine")
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps, opt.end_learning_rate)
    if name == "linear":
        after = optax.linear_schedule(peak, opt.end_learning_rate, decay_steps)
    elif name == "rsqrt":
        scale = max(warmup, 1)  # 1/sqrt decay in units of the warm-up, continuous at its end
        after = lambda step: peak * jax.lax.rsqrt(1.0 + jnp.maximum(step, 0) / scale)
    elif name == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {name!r}; use 'cosine', 'linear', 'rsqrt' or 'constant'")
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(params) -> dict:
    """True for the parameters weight decay applies to: kernels and token embeddings."""

    def decays(path, value):
        return value.ndim >= 2 and not NO_DECAY_PATTERN.search(parameter_name(path))

    return jax.tree_util.tree_map_with_path(decays, params)


def _base_optimizer(opt: ConfigDict, learning_rate) -> optax.GradientTransformation:
    name = opt.get("name", "adamw")
    if name == "adamw":
        return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=weight_decay_mask)
    if name == "lamb":
        return optax.lamb(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                          mask=weight_decay_mask)
    if name == "adafactor":  # weight decay scaled by the learning rate, as in AdamW and LAMB
        return optax.chain(optax.adafactor(None, decay_rate=opt.b2, eps=opt.eps, weight_decay_rate=opt.weight_decay,
                                           weight_decay_mask=weight_decay_mask),
                           optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    raise ValueError(f"unknown optimizer {name!r}; use 'adamw', 'lamb' or 'adafactor'")


def _group_of(path) -> str:
    return str(getattr(path[0], "key", path[0]))


def clip_trained_by_global_norm(max_norm: float, frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` of the gradients of the groups that train: a frozen group's gradient (set to
    zero after) neither counts in the norm nor is scaled, as in big_vision. Its state is optax's (empty), so
    checkpoints keep their structure."""
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm({group: value for group, value in updates.items() if group not in frozen})
        trigger = jnp.squeeze(norm < max_norm)
        clipped = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates)
        return clipped, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping of the trained groups, then the optimizer, with frozen groups, per-group rates and
    finite checks."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    frozen = tuple(opt.get("frozen", ()))
    multipliers = dict(opt.get("lr_multipliers", {}))
    groups = {"frozen": optax.set_to_zero(), "train": _base_optimizer(opt, schedule)}
    for group, multiplier in multipliers.items():
        groups[f"x{group}"] = _base_optimizer(opt, lambda step, m=multiplier: m * schedule(step))

    def labels(params):
        unknown = (set(frozen) | set(multipliers)) - set(params)
        if unknown:
            raise ValueError(f"config.optimizer names unknown parameter groups {sorted(unknown)}; "
                             f"the groups are {sorted(params)}")
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if _group_of(path) in frozen
            else f"x{_group_of(path)}" if _group_of(path) in multipliers else "train", params)

    optimizer = optax.chain(clip_trained_by_global_norm(opt.grad_clip_norm, frozen), optax.multi_transform(groups, labels))
    if opt.get("skip_nonfinite", False):
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=opt.get("max_consecutive_nonfinite", 5))
    return optimizer
