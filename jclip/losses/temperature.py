"""Initial values of the logit scale (inverse temperature) and bias.

CLIP (Radford et al. 2021, Sec. 2.5): scale = exp(t), t initialised at log(1/0.07), the scale
clipped at 100. SigLIP (Zhai et al. 2023, Sec. 3.2): t' = log 10, bias −10 (suits batches of
about 10–30k; smaller batches may prefer bias ≈ −log B). Keep t and the bias in float32 and out of
weight decay.
"""

import math

import jax.numpy as jnp

CLIP_INIT_SCALE = 1.0 / 0.07
CLIP_INIT_LOG_SCALE = math.log(CLIP_INIT_SCALE)
CLIP_MAX_SCALE = 100.0

SIGLIP_INIT_SCALE = 10.0
SIGLIP_INIT_LOG_SCALE = math.log(SIGLIP_INIT_SCALE)
SIGLIP_INIT_BIAS = -10.0


def scale_from_log(log_scale, max_scale=None):
    """exp(log_scale), clipped at `max_scale` (CLIP: `CLIP_MAX_SCALE`).

    Past the clip the gradient to `log_scale` is zero, so the parameter stays where it crossed,
    which is what clamping the parameter after each step achieves.
    """
    scale = jnp.exp(log_scale)
    return scale if max_scale is None else jnp.minimum(scale, max_scale)
