"""One process of a multi-process evaluation on loopback, for tests: every task kind of `evaluation_tasks`, or
the tasks TASKS_JSON gives, with the micro model's evaluator (of batch size BATCH_SIZE).

    python tests/evaluation_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUTPUT_JSON [TASKS_JSON [BATCH_SIZE]]
"""

import json
import os
import sys

import xla_flags

process_id, num_processes, port, data_dir, output = sys.argv[1:6]
tasks = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
batch_size = int(sys.argv[7]) if len(sys.argv) > 7 else 48
os.environ["XLA_FLAGS"] = xla_flags.with_devices(2)

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                           process_id=int(process_id))

from evaluation_tasks import TASKS, micro_evaluator  # noqa: E402
from jclip import parallel  # noqa: E402
from jclip.evaluate.tasks import run_tasks  # noqa: E402

results = run_tasks(micro_evaluator(data_dir, parallel.make_mesh(), batch_size), tasks or TASKS)
if jax.process_index() == 0:
    with open(output, "w") as f:
        json.dump({name: result.metrics for name, result in results.items()}, f)
