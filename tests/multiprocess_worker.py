"""One process of a multi-process (multi-host stand-in) training run on loopback, for tests.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR STEPS [SIGTERM_AFTER]

Trains `worker_config` with `train()` (resuming from WORKDIR's checkpoint if there
is one); process 0 writes the final parameters to WORKDIR/params_stepSTEP.npz.
SIGTERM_AFTER, one step per process ("4,5"), is a preemption reaching the
processes at different moments: process i sends itself SIGTERM once its step
SIGTERM_AFTER[i] has run or, if the run stops before that, as it starts saving
the stop checkpoint (the signal that comes a little late).
"""

import os
import sys

import xla_flags


def worker_config(data_dir: str, steps: int):
    """The run every worker trains (also resumed in the tests' own process)."""
    from conftest import load_config
    from jclip.models import model_config

    config = load_config("shapes_tiny")
    config.data.sources.shapes.config = "tiny"
    config.data.tokenizer = "shapes/tiny"
    config.data.data_dir = data_dir
    config.evaluate.shapes_config = "tiny"
    config.model = model_config("test-micro")
    config.batch_size = 16
    config.total_steps = steps
    config.log_every = 1
    config.checkpoint_every = 3
    config.keep_checkpoints = 3  # 3, 6 and the end: the tests resume from step 3
    return config


def send_sigterm_after(steps: list[int]) -> None:
    """This process receives SIGTERM after its step `steps[process]`, or at a stop save before that."""
    import signal

    import jax

    from jclip.checkpoint import Checkpointer
    from jclip.train import loop

    sent = []

    def sigterm(when: str):
        if not sent:
            sent.append(True)
            print(f"SIGTERM {when}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    make_train_step = loop.make_train_step

    def make_signalled_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def signalled_train_step(state, batch):
            state, metrics = train_step(state, batch)
            if int(state.step) == steps[jax.process_index()]:
                sigterm(f"after step {int(state.step)}")
            return state, metrics
        return signalled_train_step

    save = Checkpointer.save

    def signalled_save(self, step, *args, **kwargs):
        if step >= min(steps):  # another process's signal stopped the run first: this one's comes now
            sigterm(f"while saving step {step}")
        return save(self, step, *args, **kwargs)

    loop.make_train_step = make_signalled_train_step
    Checkpointer.save = signalled_save


if __name__ == "__main__":
    process_id, num_processes, port, workdir, data_dir, steps = sys.argv[1:7]
    os.environ["XLA_FLAGS"] = xla_flags.with_devices(2)

    import jax  # (after XLA_FLAGS)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                               process_id=int(process_id))

    import numpy as np

    from jclip.train.loop import train

    if len(sys.argv) > 7:
        send_sigterm_after([int(step) for step in sys.argv[7].split(",")])
    state = train(worker_config(data_dir, int(steps)), workdir, evaluate_at_end=False)
    if jax.process_index() == 0:
        leaves = jax.tree.leaves(jax.device_get(state.params))
        np.savez(os.path.join(workdir, f"params_step{int(state.step)}.npz"), *leaves)
