"""Model FLOPs utilisation (MFU): model FLOPs per second over the devices' peak.

Model FLOPs count the forward and backward pass of both towers (3× the forward
pass, `jclip.models.summary.training_flops_per_pair`), not rematerialisation
or gradient caching's extra forward pass, so MFU compares recipes fairly
(Chowdhery et al. 2022, PaLM, appendix B).
"""

import time
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


class ThroughputMeter:
    """Samples/s, model TFLOP/s per device and MFU over the steps since the last reading."""

    def __init__(self, batch_size: int, flops_per_pair: float, devices: int, peak_flops: Optional[float]):
        self.batch_size, self.flops_per_pair = batch_size, flops_per_pair
        self.devices, self.peak_flops = devices, peak_flops
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        samples_per_second = self.steps * self.batch_size / (now - self.start)
        flops = samples_per_second * self.flops_per_pair / self.devices
        self.start, self.steps = now, 0
        out = {"samples_per_second": samples_per_second, "model_tflops_per_device": flops / 1e12}
        if self.peak_flops:
            out["mfu"] = flops / self.peak_flops
        return out
