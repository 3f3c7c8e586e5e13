"""Writing converted parameters as a parameters-only checkpoint, which `jclip.evaluate` reads and
`jclip.train` starts from (with a fresh optimizer)."""

from typing import Any

import jax
import jax.numpy as jnp

from jclip import models
from jclip.checkpoint import save_parameters_only
from jclip.convert.open_clip import data_settings


def save_converted(params: Any, name: str, output: str, source: str = "") -> str:
    """Save `params` of model `name` under `<output>/checkpoints/0`; returns that directory.

    The checkpoint's record names the model configuration `model_config(name)`, which evaluation
    builds (a run trained from it needs a config whose `model` is that dict), and the inputs the model
    takes as OpenCLIP gives them (`data_settings`), which `jclip.load` uses.
    """
    config = models.model_config(name)
    record = {"converted_from": source, "model_name": name}
    if config["vision"].get("image_size"):  # all of OpenCLIP's models; not jclip's test models
        record["data"] = data_settings(name)
    return save_parameters_only(jax.tree.map(jnp.asarray, params), config, output, record)
