"""Optimizer and learning-rate schedule built from `config.optimizer`.

    config.optimizer.name = "adamw"            # or "adafactor", "lamb", "muon"
    config.optimizer.schedule = "cosine"       # or "linear", "rsqrt", "constant" (all after linear warm-up)
    config.optimizer.frozen = ("image_tower",) # LiT (Zhai et al. 2022): a locked image tower
    config.optimizer.lr_multipliers = {"text_tower": 0.1}
    config.optimizer.layer_decay = 0.75        # layer-wise learning-rate decay in each tower (BEiT); None: off
    config.optimizer.skip_nonfinite = True     # skip updates whose gradients are not finite

Top-level parameter groups are the model's submodules and parameters
(`image_tower`, `text_tower`, `logit_scale`, `logit_bias`; CoCa's `text_decoder`).
A parameter's learning rate is the schedule's times its group's `lr_multipliers`
entry times its layer's decay multiplier (`layer_decay_multipliers`).
"""

import collections
import math
import operator
import re

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict
from optax.contrib import MuonDimensionNumbers

from jclip.parameter_layout import parameter_name

OPTIMIZERS = ("adamw", "lamb", "adafactor", "muon")
# Parameters that get no weight decay besides 1-D ones (biases, norms, scale, bias):
# learned position embeddings, the class token and register tokens.
NO_DECAY_PATTERN = re.compile(r"pos_embedding|cls_token|registers")
# A tower's layers, in order: its transformer blocks (CoCa's decoder pairs `block_i` with the cross-attention
# block `cross_i`) or a ResNet's residual blocks (`layer{stage}_{i}`).
TRANSFORMER_BLOCK = re.compile(r"(?:block|cross)_(\d+)")
RESIDUAL_BLOCK = re.compile(r"layer(\d+)_(\d+)")
# What a tower computes before its first layer (layer 0): patch or convolutional stems, class and register
# tokens, position and token embeddings, and the norm applied to them.
EMBEDDING = re.compile(r"patch_embed|conv_stem|stem_(?:conv|bn)\d+|cls_token|register\w*|pos_embedding"
                       r"|token_embedding|ln_pre")
# Muon's momentum (Nesterov), Jordan et al. 2024's and Moonlight's (Liu et al. 2025).
MUON_MOMENTUM = 0.95
# Muon's updates scaled to AdamW's RMS (Liu et al. 2025, arXiv 2502.16982), so that AdamW's learning rate and
# weight decay carry over.
MUON_UPDATE_RMS = 0.2


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


def _group_of(path) -> str:
    return str(getattr(path[0], "key", path[0]))


def _layer_of(keys: list[str]) -> tuple[int, ...] | None:
    """The indices of the layer (block) a parameter belongs to, from its path below its group; None outside layers."""
    for key in keys:
        match = TRANSFORMER_BLOCK.fullmatch(key) or RESIDUAL_BLOCK.fullmatch(key)
        if match:
            return tuple(int(index) for index in match.groups())
    return None


def layer_ids(params) -> tuple[dict, dict[str, int]]:
    """Each parameter's layer id in its tower, and each tower's number of layers L, as BEiT (Bao et al. 2022, arXiv
    2106.08254) numbers a ViT's: 0 for the embeddings (`EMBEDDING`: patch or convolutional stem, class and register
    tokens, position and token embeddings, `ln_pre`), i + 1 for the tower's i-th layer and L + 1 for the rest (final
    norms, pooling heads, projections). A tower's layers are its transformer blocks `block_i` (in CoCa's decoder,
    which has no embeddings, `block_i` and `cross_i` together), or, in a ResNet tower, its residual blocks
    `layer{stage}_{i}` in order, as timm numbers them. Groups without layers (`logit_scale`, `logit_bias`) have L = 0
    and id 1."""
    layers = collections.defaultdict(set)
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        group, *keys = parameter_name(path).split("/")
        layer = _layer_of(keys)
        if layer is not None:
            layers[group].add(layer)
    rank = {group: {layer: i for i, layer in enumerate(sorted(found), 1)} for group, found in layers.items()}
    num_layers = {group: len(rank.get(group, {})) for group in params}

    def layer_id(path, _):
        group, *keys = parameter_name(path).split("/")
        layer = _layer_of(keys)
        if layer is not None:
            return rank[group][layer]
        return 0 if keys and EMBEDDING.fullmatch(keys[0]) else num_layers[group] + 1

    return jax.tree_util.tree_map_with_path(layer_id, params), num_layers


def layer_decay_multipliers(params, layer_decay: float) -> dict:
    """Each parameter's learning-rate multiplier `layer_decay ** (L + 1 - layer_id)` (BEiT, Bao et al. 2022), each
    tower decayed over its own depth L (`layer_ids`): the embeddings get `layer_decay ** (L + 1)`, what follows the
    last layer and `logit_scale` / `logit_bias` the full rate."""
    ids, num_layers = layer_ids(params)
    return jax.tree_util.tree_map_with_path(
        lambda path, layer: layer_decay ** (num_layers[_group_of(path)] + 1 - layer), ids)


def with_layer_decay(optimizer: optax.GradientTransformation, layer_decay: float) -> optax.GradientTransformation:
    """`optimizer` with its updates times their parameter's `layer_decay_multipliers`: the same as scaling its
    learning rate, weight decay included (timm, OpenCLIP), since every optimizer here ends by scaling by the learning
    rate. Its state is `optimizer`'s, no larger and of the same structure, so a run resumes with or without decay."""
    def update(updates, state, params=None):
        updates, state = optimizer.update(updates, state, params)
        return jax.tree.map(operator.mul, updates, layer_decay_multipliers(updates, layer_decay)), state
    return optax.GradientTransformation(optimizer.init, update)


def _muon_matrix(path, value) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter as a matrix (reduction axes x output axes), or None where AdamW trains it."""
    keys = parameter_name(path).split("/")
    if keys[-1] != "kernel" or not any(TRANSFORMER_BLOCK.fullmatch(key) for key in keys):
        return None
    if value.ndim == 2:
        return MuonDimensionNumbers((0,), (1,))
    if value.ndim == 3 and keys[-2] in ("query", "key", "value"):  # [embed, heads, head_dim]
        return MuonDimensionNumbers((0,), (1, 2))
    if value.ndim == 3 and keys[-2] == "out":  # [heads, head_dim, embed]
        return MuonDimensionNumbers((0, 1), (2,))
    return None


def muon_dimension_numbers(params) -> dict:
    """Muon's matrices: the kernels of the transformer blocks (dense 2-D ones; attention's 3-D query, key and value
    kernels as [embed, heads x head_dim], its output kernel as [heads x head_dim, embed]); None for everything AdamW
    trains: embeddings, class tokens, convolutions, norms, biases, the pooling heads and projections after the
    blocks, `logit_scale` and `logit_bias` (Jordan et al. 2024: embeddings and output heads train with AdamW)."""
    return jax.tree_util.tree_map_with_path(_muon_matrix, params)


def _scale_to_adamw_rms(update: jax.Array, matrix: MuonDimensionNumbers) -> jax.Array:
    """An orthogonalised update scaled to AdamW's RMS: times 0.2 * sqrt(max(fan_in, fan_out)) (Liu et al. 2025)."""
    fan_in, fan_out = (math.prod(update.shape[axis] for axis in axes) for axes in matrix)
    return update * (MUON_UPDATE_RMS * math.sqrt(max(fan_in, fan_out)))


def _muon(opt: ConfigDict, learning_rate) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024) for `muon_dimension_numbers`' matrices, AdamW (`b1`, `b2`, `eps`) for the rest; both
    at `learning_rate` with decoupled weight decay under `weight_decay_mask`."""
    muon = optax.chain(
        optax.contrib.scale_by_muon(beta=MUON_MOMENTUM, weight_dimension_numbers=muon_dimension_numbers),
        optax.stateless(lambda updates, params: jax.tree.map(_scale_to_adamw_rms, updates,
                                                             muon_dimension_numbers(updates))),
        optax.add_decayed_weights(opt.weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))
    adamw = optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=weight_decay_mask)
    return optax.partition({"muon": muon, "adamw": adamw}, lambda params: jax.tree_util.tree_map_with_path(
        lambda path, value: "adamw" if _muon_matrix(path, value) is None else "muon", params))


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
    if name == "muon":
        return _muon(opt, learning_rate)
    raise ValueError(f"unknown optimizer {name!r} (config.optimizer.name); use one of {OPTIMIZERS}")


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
    """Global-norm clipping of the trained groups, then the optimizer, with frozen groups, per-group rates, layer
    decay and finite checks."""
    opt = config.optimizer
    layer_decay = opt.get("layer_decay")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"config.optimizer.layer_decay must be in (0, 1], e.g. 0.75 (each layer trains at 0.75 times "
                         f"the rate of the one above it), or None for no decay; got {layer_decay}")
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
    if layer_decay is not None:
        optimizer = with_layer_decay(optimizer, layer_decay)
    if opt.get("skip_nonfinite", False):
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=opt.get("max_consecutive_nonfinite", 5))
    return optimizer
