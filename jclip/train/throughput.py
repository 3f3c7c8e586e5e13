"""Model FLOPs utilisation (MFU): model FLOPs per second over the devices' peak.

Model FLOPs count the forward and backward pass of both towers (3× the forward
pass, `jclip.models.summary.training_flops_per_pair`), not rematerialisation
or gradient caching's extra forward pass, so MFU compares recipes fairly
(Chowdhery et al. 2022, PaLM, appendix B).
"""

from typing import Optional

import jax

# Dense bfloat16 peak FLOP/s per device (per chip for TPUs), by a substring of `device.device_kind`.
PEAK_FLOPS = {
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5": 197e12,  # v5e ("TPU v5 lite")
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
}


def peak_flops_per_device(override: Optional[float] = None) -> Optional[float]:
    """`override`, or the table's peak of this job's devices, or None (unknown, e.g. CPUs)."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None
