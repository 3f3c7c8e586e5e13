"""Where training metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files, from process 0.

    tensorboard --logdir <workdir>/tensorboard
"""

import json
import os
from typing import Mapping

import jax


class MetricsWriter:
    """Appends `{"step": ..., **values}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.summary = None
        if self.active and tensorboard:
            import tensorflow as tf

            self.summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.summary is not None:
            import tensorflow as tf

            with self.summary.as_default(step=step):
                for name, value in values.items():
                    if isinstance(value, (int, float)):
                        tf.summary.scalar(name, value)
            self.summary.flush()

    def close(self) -> None:
        if self.summary is not None:
            self.summary.close()
