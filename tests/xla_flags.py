"""XLA flags for the suite and the processes it starts; this module imports no JAX, so they come before it.

Tests check what is computed, not how fast: XLA's CPU back end compiles them without LLVM's optimizations
(`--xla_backend_optimization_level=0`), which takes the suite's compiles, most of its time, to about 60 %.
`JCLIP_TEST_XLA_FLAGS` overrides the flags (set it empty to test the optimized code).
"""

import os

SUITE_FLAGS = os.environ.setdefault("JCLIP_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")


def with_devices(devices: int) -> str:
    """The suite's XLA flags with `devices` simulated CPU devices."""
    return f"{SUITE_FLAGS} --xla_force_host_platform_device_count={devices}".strip()
