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


def clamp_log_scale(log_scale, max_scale=CLIP_MAX_SCALE):
    """The learnable t = log(scale) clipped to [0, log(max_scale)]; apply after every update.

    This is CLIP's clamp of the parameter itself. Clipping exp(t) in the forward pass instead
    would zero the gradient once t passed the bound, so t could never come back down.
    """
    return jnp.clip(log_scale, 0.0, math.log(max_scale))
