"""Writing converted parameters as a checkpoint that `jclip.evaluate` and `jclip.train` restore.

The checkpoint is the trainer's own layout (`jclip.checkpoint.Checkpointer`,
items "state" and "record") at step 0: a `TrainState` holding the converted
parameters and a fresh optimizer state. A fresh AdamW state (zero moments,
zero count) is the same for any hyperparameters, so the optimizer of any recipe
restores it; `config`, when given, supplies that recipe's optimizer.
"""

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jclip import models
from jclip.checkpoint import Checkpointer
from jclip.train.optimizer import build_optimizer
from jclip.train.state import TrainState

# Any valid optimizer section gives the same fresh state; these values never train anything.
FRESH_STATE_RECIPE = ConfigDict(dict(
    total_steps=1,
    optimizer=dict(learning_rate=0.0, end_learning_rate=0.0, warmup_steps=0, weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0),
))


def save_converted(params: Any, name: str, output: str, config: Optional[ConfigDict] = None,
                   source: str = "") -> str:
    """Save `params` of model `name` under `<output>/checkpoints/0`; returns that directory.

    The checkpoint's record names the model configuration `model_config(name)`,
    so evaluate it with a config whose `model` is that dict. `config`: the
    recipe to fine-tune or evaluate with (its `model` must be `name`'s); its
    optimizer builds the optimizer state.
    """
    model = models.model_config(name)
    if config is not None and config.model.to_dict() != model:
        raise ValueError(
            f"config.model is not model {name!r}'s configuration; pass a config for {name} "
            f"(or none: the checkpoint's optimizer state fits every recipe)"
        )
    optimizer = build_optimizer(config if config is not None else FRESH_STATE_RECIPE)
    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    checkpointer = Checkpointer(output, model, save_every=1, keep=1)
    if checkpointer.latest_step() is not None:
        raise FileExistsError(f"{checkpointer.directory} already holds checkpoints; choose a new --output")
    checkpointer.save(0, state, lambda: {"converted_from": source}, force=True)
    checkpointer.wait()
    checkpointer.close()
    return os.path.join(checkpointer.directory, "0")
