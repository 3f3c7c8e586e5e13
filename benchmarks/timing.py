"""Timing a jitted train step as the benchmarks do: compiled and warmed up, then steps back to back."""

import time


def seconds_per_step(step, state, batch, steps: int, warmup: int = 1) -> float:
    """Mean wall seconds of `state, metrics = step(state, batch)` over `steps` calls after `warmup` calls.

    The first warm-up call compiles. Only the last step's metrics are waited
    for, so the steps queue as they do in a training loop.
    """
    import jax

    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps
