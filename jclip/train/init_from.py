"""Starting a new run from pretrained weights (`config.init_from`): chosen parts of another model's
parameters, the rest freshly initialised.

    config.init_from.path = "runs/vit_b32"     # a run (its latest checkpoint), RUN/checkpoints/STEP, a converted
                                               # checkpoint, or an OpenAI / OpenCLIP weight file
    config.init_from.model = "ViT-B-32"        # a weight file's model (checkpoints record their own)
    config.init_from.parts = ("image_tower",)  # top-level parameter groups to take, or ("all",)

The run starts at step 0 with a fresh optimizer; a run that resumes from its own checkpoint ignores
`init_from`. A taken parameter must have the run's shape, except a ViT's position embeddings made for
another image size, which are resized as the model resizes them for other inputs (bicubic, class token
kept); anything else that does not fit is refused with the parameter named. This is what LiT needs (a
pretrained image tower, locked with `optimizer.frozen`, and a text tower trained from scratch) and
what fine-tuning needs (all parts).
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from jclip.checkpoint import locate, read_stored_params
from jclip.convert.open_clip import from_open_clip
from jclip.convert.state_dict_files import load_state_dict
from jclip.models.vision import resize_positions
from jclip.parameter_layout import parameter_name
from jclip.train.state import StateLayout

ALL = "all"


def _source_params(config: ConfigDict, layout: StateLayout) -> Any:
    """The parameters `config.init_from` names: converted from a weight file, or restored from a checkpoint
    with the shapes they were stored with (its EMA parameters when it keeps them)."""
    path, model = config.init_from.path, config.init_from.model
    if path.endswith((".safetensors", ".pt", ".pth", ".bin")):
        if model is None:
            raise ValueError(f"config.init_from.path={path!r} is a weight file: name its model with "
                             "config.init_from.model (e.g. 'ViT-B-32')")
        return from_open_clip(load_state_dict(path), model)
    run_directory, step = locate(None, path, None)
    params, _ = read_stored_params(run_directory, step, NamedSharding(layout.mesh, PartitionSpec()))
    return params


def _prefix(count: int) -> Optional[int]:
    """How many of `count` image position embeddings lie off the square patch grid (1: a class token), or None."""
    return next((prefix for prefix in (1, 0) if math.isqrt(count - prefix) ** 2 == count - prefix), None)


def _fitted(name: str, source: np.ndarray, target: jax.ShapeDtypeStruct, origin: str) -> Any:
    """`source` as the parameter `name` of shape `target`: as it is, or a ViT's position embeddings resized."""
    if source.shape == target.shape:
        return jnp.asarray(source, target.dtype)
    if (name.endswith("image_tower/pos_embedding") and source.ndim == target.ndim == 3
            and source.shape[-1] == target.shape[-1] and _prefix(source.shape[1]) is not None
            and _prefix(source.shape[1]) == _prefix(target.shape[1])):
        prefix = _prefix(target.shape[1])
        side = math.isqrt(target.shape[1] - prefix)
        return resize_positions(jnp.asarray(source, target.dtype), prefix, (side, side))
    raise ValueError(f"config.init_from: parameter {name} has shape {tuple(source.shape)} in {origin} but "
                     f"{tuple(target.shape)} in this run's model; take only parts of the same architecture "
                     "(config.init_from.parts), or change config.model to fit")


def pretrained_params(config: ConfigDict, layout: StateLayout, fresh: Any) -> Any:
    """`fresh` parameters (the run's initialisation) with the parts `config.init_from.parts` names replaced by
    those of `config.init_from.path`, fitted to the run's shapes."""
    source = _source_params(config, layout)
    parts = tuple(config.init_from.parts)
    parts = tuple(fresh) if ALL in parts else parts
    path = config.init_from.path
    unknown = [part for part in parts if part not in fresh]
    if unknown:
        raise ValueError(f"config.init_from.parts names {unknown}, which this run's model has no parameters of; "
                         f"its parts are {sorted(fresh)} (or 'all')")
    missing = [part for part in parts if part not in source]
    if missing:
        raise ValueError(f"{path} has no {missing} parameters (its parts are {sorted(source)}); "
                         "leave them out of config.init_from.parts")
    params = dict(fresh)
    for part in parts:
        source_leaves = {parameter_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path({part: source[part]})}
        target = layout.abstract.params[part]
        target_leaves = {parameter_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path({part: target})}
        if set(source_leaves) != set(target_leaves):
            extra, absent = sorted(set(source_leaves) - set(target_leaves)), sorted(set(target_leaves) - set(source_leaves))
            raise ValueError(f"config.init_from: the {part} of {path} is another architecture than this run's "
                             f"({'it has ' + extra[0] if extra else 'it lacks ' + absent[0]}, and "
                             f"{len(extra) + len(absent)} such differences); take parts of the same architecture")
        fitted = {name: _fitted(name, np.asarray(jax.device_get(leaf)), target_leaves[name], path)
                  for name, leaf in source_leaves.items()}
        params[part] = jax.tree_util.tree_map_with_path(lambda p, _: fitted[parameter_name(p)], {part: target})[part]
    return params
