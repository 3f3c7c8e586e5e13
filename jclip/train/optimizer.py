"""Optimizer and learning-rate schedule built from `config.optimizer`."""

import re

import jax
import optax
from ml_collections import ConfigDict

# Parameters that get no weight decay besides 1-D ones (biases, norms, scale, bias):
# learned position embeddings and the class token.
NO_DECAY_PATTERN = re.compile(r"pos_embedding|cls_token")


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to `end_learning_rate` at `total_steps`."""
    opt = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(config.total_steps, opt.warmup_steps + 1), end_value=opt.end_learning_rate,
    )


def weight_decay_mask(params) -> dict:
    """True for the parameters weight decay applies to: kernels and token embeddings."""

    def decays(path, value):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        return value.ndim >= 2 and not NO_DECAY_PATTERN.search(name)

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW with the schedule and decay mask."""
    opt = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
            weight_decay=opt.weight_decay, mask=weight_decay_mask,
        ),
    )
