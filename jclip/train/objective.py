"""The training objective: a weighted sum of `jclip.losses` losses, chosen in the config.

    config.losses.clip = dict(weight=1.0)                       # Radford et al. 2021
    config.losses.siglip = dict(weight=1.0, ring=True)          # Zhai et al. 2023, memory-linear
    config.losses.clip = dict(weight=1.0, block_size=1024, label_smoothing=0.1)

Each entry names a loss and gives its weight; the other keys are the loss's own
keyword arguments (`ring`, `block_size`, `label_smoothing`, ...). The sigmoid
loss needs a model with a bias (`init_bias` in the model config).
"""

from typing import Any, Callable, Mapping

import jax

from jclip import losses

Outputs = dict[str, jax.Array]

# name -> the loss as a function of the model outputs and the loss's keyword options.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    "clip": lambda out, **options: losses.clip_loss(out["zimg"], out["ztxt"], out["scale"], **options),
    "siglip": lambda out, **options: losses.siglip_loss(out["zimg"], out["ztxt"], out["scale"], out["bias"],
                                                        **options),
}
NEEDS_BIAS = ("siglip",)


def make_objective(spec: Mapping[str, Mapping[str, Any]], axis_name: str, has_bias: bool,
                   ) -> Callable[[Outputs], tuple[jax.Array, dict[str, jax.Array]]]:
    """`outputs -> (total loss, {"loss_<name>": term})` for the weighted losses of `spec`.

    Called per device inside `shard_map`: every loss gathers over `axis_name`, so
    the total is that of the global batch.
    """
    if not spec:
        raise ValueError("config.losses is empty; add one, e.g. config.losses.clip = dict(weight=1.0)")
    terms = {}
    for name, options in spec.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in config.losses; use one of {sorted(LOSSES)}")
        if name in NEEDS_BIAS and not has_bias:
            raise ValueError(f"the {name!r} loss needs a learnable bias: set config.model.init_bias (e.g. -10)")
        options = dict(options)
        weight = float(options.pop("weight", 1.0))
        terms[name] = (weight, options)

    def objective(out: Outputs):
        values = {name: LOSSES[name](out, axis_name=axis_name, **options) for name, (_, options) in terms.items()}
        total = sum(weight * values[name] for name, (weight, _) in terms.items())
        return total, {f"loss_{name}": value for name, value in values.items()}

    return objective
