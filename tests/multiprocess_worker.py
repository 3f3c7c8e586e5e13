"""One process of a multi-process (multi-host stand-in) training run on loopback, for tests.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR STEPS
"""

import os
import sys

process_id, num_processes, port, workdir, data_dir, steps = sys.argv[1:7]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                           process_id=int(process_id))

import numpy as np  # noqa: E402

from conftest import load_config  # noqa: E402
from jclip.models import model_config  # noqa: E402
from jclip.train.loop import train  # noqa: E402

config = load_config("shapes_tiny")
config.data.sources.shapes.config = "tiny"
config.data.tokenizer = "shapes/tiny"
config.data.data_dir = data_dir
config.evaluate.shapes_config = "tiny"
config.model = model_config("test-micro")
config.batch_size = 16
config.total_steps = int(steps)
config.log_every = 1
config.checkpoint_every = 3
state = train(config, workdir, evaluate_at_end=False)
if jax.process_index() == 0:
    leaves = jax.tree.leaves(jax.device_get(state.params))
    np.savez(os.path.join(workdir, f"params_step{int(state.step)}.npz"), *leaves)
