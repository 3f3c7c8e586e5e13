"""Memory planner: per-device memory and FLOPs of a config's training step, for settings that trade memory.

The step is lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct`s: no data, no parameters
made), exactly as the trainer jits it, and XLA's compiled memory analysis gives its per-device memory:
arguments (the train state and the batch) + outputs not aliased to the donated state + temporaries.
The settings form a ladder, each adding one memory saver to the one before: the config as it is; the
contrastive losses in a ring with blocks (`ring`, `block_size`); rematerialised layers (`remat`); FSDP
(`parameter_sharding="fsdp"`); gradient caching (`micro_batches` 2, then 4). For each, memory grows
affinely with the batch, so two compiled batches give the largest that fits, which one more compile
confirms.
"""

import dataclasses
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.data import preprocess
from jclip.models.summary import training_flops_per_pair
from jclip.train.loop import config_train_step, patch_input_example, train_state_layout
from jclip.train.objective import LOSSES
from jclip.train.optimizer import build_optimizer

GiB = 2**30
RING_BLOCK = 512  # the block size of the ring setting (capped at the local batch, which it must divide)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named change of the config: {dotted path: value}."""

    name: str
    changes: tuple[tuple[str, object], ...] = ()


@dataclasses.dataclass
class Cost:
    """One compiled step: per-device bytes (total and its parts) and the model's FLOPs per step (forward and
    backward of both towers, `jclip.models.summary`; recomputation by remat not counted)."""

    batch: int
    bytes: int
    state_bytes: int
    temporary_bytes: int
    flops: float


def ladder(config: ConfigDict) -> list[Setting]:
    """The settings compared: each adds one memory saver to the one before (see the module docstring)."""
    ringable = [name for name in config.losses if "ring" in inspect.signature(LOSSES[name].function).parameters]
    changes, settings = [], [Setting("as configured")]
    if ringable:
        changes += [(f"losses.{name}.ring", True) for name in ringable]
        settings.append(Setting("+ ring losses with blocks", tuple(changes)))
    changes.append(("model.remat", True))
    settings.append(Setting("+ remat", tuple(changes)))
    changes.append(("parameter_sharding", "fsdp"))
    settings.append(Setting("+ FSDP", tuple(changes)))
    for micro_batches in (2, 4):
        settings.append(Setting(f"+ micro_batches={micro_batches}", (*changes, ("micro_batches", micro_batches))))
    return settings


def applied(config: ConfigDict, setting: Setting, batch: int, devices: int) -> ConfigDict:
    """`config` with `setting`'s changes and the global `batch`; ring blocks of `RING_BLOCK` rows or fewer."""
    config = ConfigDict(config.to_dict())
    config.batch_size = batch
    for path, value in setting.changes:
        *parents, leaf = path.split(".")
        target = config
        for key in parents:
            target = target[key]
        target[leaf] = value
    local = batch // devices // config.micro_batches
    for path, _ in setting.changes:
        if path.startswith("losses.") and path.endswith(".ring"):
            config.losses[path.split(".")[1]].block_size = math.gcd(local, RING_BLOCK)
    return config


def step_cost(config: ConfigDict, mesh) -> Cost:
    """The compiled training step of `config` on `mesh`: its per-device memory and its FLOPs."""
    if config.get("teacher"):
        raise ValueError("the planner does not compile a teacher's model: plan without config.teacher, then add "
                         "the teacher's parameters (replicated) to the result")
    parallel.check_batch_size(config.batch_size, mesh)
    model = models.model_class(config.model)(**config.model)
    layout = train_state_layout(config, model, build_optimizer(config), mesh)
    step = config_train_step(config, layout)
    sharding = parallel.batch_sharding(mesh)
    image_dtype = preprocess.batch_image_dtype(config.data.preprocess)
    patch_input = patch_input_example(config)
    images = (jax.tree.map(lambda x: jax.ShapeDtypeStruct((config.batch_size, *x.shape), x.dtype, sharding=sharding),
                           patch_input) if patch_input else
              jax.ShapeDtypeStruct((config.batch_size, *layout.image_shape), image_dtype, sharding=sharding))
    batch = {"image": images,
             "tokens": jax.ShapeDtypeStruct((config.batch_size, config.data.text_length), jnp.int32,
                                            sharding=sharding)}
    if config.data.get("negative_kinds"):
        batch["negative_tokens"] = jax.ShapeDtypeStruct(
            (config.batch_size, len(config.data.negative_kinds), config.data.text_length), jnp.int32, sharding=sharding)
    memory = step.lower(layout.abstract, batch).compile().memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    flops = training_flops_per_pair(model, layout.image_shape, config.data.text_length, patch_input,
                                    tuple(config.optimizer.get("frozen", ()))) * config.batch_size
    return Cost(config.batch_size, total, memory.argument_size_in_bytes, memory.temp_size_in_bytes, flops)


def largest_batch(config: ConfigDict, setting: Setting, mesh, memory_bytes: int,
                  first: Optional[Cost] = None) -> Optional[Cost]:
    """The cost of the largest global batch (a multiple of the devices × micro-batches) whose step fits in
    `memory_bytes` per device with `setting`, or None when not even the smallest does. `first`: the smallest
    batch's cost, where the caller has compiled it already."""
    devices = mesh.devices.size
    unit = devices * max(dict(setting.changes).get("micro_batches", config.micro_batches), 1)
    cost = lambda batch: step_cost(applied(config, setting, batch, devices), mesh)
    small, large = first or cost(unit), cost(unit * 8)
    if small.bytes > memory_bytes:
        return None
    per_pair = (large.bytes - small.bytes) / (large.batch - small.batch)
    estimate = small.batch if per_pair <= 0 else int(small.batch + (memory_bytes - small.bytes) / per_pair)
    batch = max(unit, estimate // unit * unit)
    while batch > unit:  # confirm by compiling; the fit is affine, so at most a step or two down
        fitted = cost(batch)
        if fitted.bytes <= memory_bytes:
            return fitted
        batch = max(unit, int(batch * memory_bytes / fitted.bytes) // unit * unit)
    return small
