"""One process of a training job on a given topology, for tests: train steps on fixed batches.

    python tests/topology_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS WORKDIR END_STEP SHARDING \
        [MIDDLE_STEP]

Resumes from the checkpoint in WORKDIR if there is one, trains to END_STEP on the
global batches `random_batch(16, seed=step)` (each process feeding its rows),
saves a checkpoint at MIDDLE_STEP (if given) and END_STEP, and process 0 writes
the parameters of each to WORKDIR/params_STEP.npz.
"""

import os
import sys

import xla_flags

process_id, num_processes, port, devices, workdir, end_step, sharding = sys.argv[1:8]
save_steps = {int(step) for step in (end_step, *sys.argv[8:9])}
os.environ["XLA_FLAGS"] = xla_flags.with_devices(int(devices))

import jax  # noqa: E402  (after XLA_FLAGS)

if int(num_processes) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                               process_id=int(process_id))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from batches import random_batch  # noqa: E402
from conftest import load_config  # noqa: E402
from jclip import models, parallel  # noqa: E402
from jclip.checkpoint import Checkpointer  # noqa: E402
from jclip.train.optimizer import build_optimizer  # noqa: E402
from jclip.train.state import create_train_state, state_layout  # noqa: E402
from jclip.train.step import make_train_step  # noqa: E402

IMAGE_SHAPE, LENGTH, BATCH = (32, 32, 3), 16, 16
config = load_config("shapes_tiny")
config.optimizer.warmup_steps = 1
model = models.create("test-micro")
optimizer = build_optimizer(config)
mesh = parallel.make_mesh()
assert mesh.devices.size == int(num_processes) * int(devices), mesh
layout = state_layout(model, optimizer, IMAGE_SHAPE, LENGTH, mesh, sharding)
checkpointer = Checkpointer(workdir, dict(model_config="test-micro"), save_every=1)
if checkpointer.latest_step() is None:
    state = create_train_state(layout, jax.random.key(0))
else:
    state, _ = checkpointer.restore(layout.abstract)
train_step = make_train_step(layout)
rows = BATCH // jax.process_count()
for step in range(int(state.step), int(end_step)):
    batch = random_batch(BATCH, seed=step)
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}
    state, _ = train_step(state, parallel.global_batch(local, mesh))
    if step + 1 in save_steps:
        checkpointer.save(step + 1, state, lambda: {"data_position": [0] * jax.process_count()}, force=True)
        params = multihost_utils.process_allgather(state.params, tiled=True)
        if jax.process_index() == 0:
            np.savez(os.path.join(workdir, f"params_{step + 1}.npz"), *jax.tree.leaves(params))
checkpointer.wait()
checkpointer.close()
