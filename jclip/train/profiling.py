"""A JAX profiler trace of chosen training steps (`--config.profile_steps=a:b`).

The trace (TensorBoard's profile plugin, Perfetto or XProf read it) shows
where a step's time goes: each XLA operation on each device or CPU thread,
the host's input pipeline and the gaps between steps.
"""

import os
from typing import Any, Callable, Optional

import jax


def parse_step_range(spec: str) -> tuple[int, int]:
    """"a:b" -> (a, b), the steps a, a+1, ..., b-1 (counted from 0, as a Python slice)."""
    start, separator, stop = str(spec).partition(":")
    try:
        first, end = int(start), int(stop)
    except ValueError:
        first, end = -1, -1
    if not separator or not 0 <= first < end:
        raise ValueError(f"profile_steps={spec!r}: use 'a:b' with 0 <= a < b, e.g. --config.profile_steps=10:15 "
                         "traces the steps 10 to 14")
    return first, end


class StepProfiler:
    """Starts a trace before step `a` and writes it after step `b - 1` (`spec` "a:b"; None: no trace).

    `settle` is called just before the trace starts and stops, to finish the caller's JAX work in other
    threads (the next batch being made): the profiler then starts and stops beside no transfer of ours."""

    def __init__(self, spec: Optional[str], directory: str, settle: Callable[[], None] = lambda: None):
        self.range = parse_step_range(spec) if spec else None
        self.directory, self.settle = directory, settle
        self.active = False

    def before(self, step: int) -> None:
        if self.range and step == self.range[0]:
            os.makedirs(self.directory, exist_ok=True)
            self.settle()
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Call with the step's outputs; the trace ends once they are computed."""
        if self.active and step + 1 >= self.range[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.settle()
            jax.profiler.stop_trace()
            self.active = False
            if jax.process_index() == 0:
                print(f"Wrote a profile of steps {self.range[0]} to {self.range[1] - 1} to {self.directory}")
