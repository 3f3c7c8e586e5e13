"""How a model's layers run, one frozen object that the model builds and hands to every layer."""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    """The options every layer of a model shares, built once by the model (CLIP, CoCa) for all its towers.

    They choose how the layers compute, not what: parameter names and shapes,
    and the function up to rounding, stay the same. What the layers compute
    (widths, depths, heads, activation, `norm_eps`) is each tower's own
    configuration.

    - `dtype`: the computation dtype (bfloat16 for mixed precision; parameters
      stay float32).
    - `matmul_dtype`: None, or the dtype the dense layers' matmuls take their
      inputs in, accumulating in float32 (`jclip.models.precision`).
    - `remat`: recompute each block's activations in the backward pass
      (gradient checkpointing).
    - `logical_axes`: create parameters boxed with logical axis names
      (`jclip.models.partitioning`).
    """

    dtype: Any = jnp.float32
    matmul_dtype: Optional[str] = None
    remat: bool = False
    logical_axes: bool = False
