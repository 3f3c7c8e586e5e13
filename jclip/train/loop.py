"""The training loop: data, model, sharded steps, logging, checkpoints, final evaluation."""

import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from jclip import models, parallel
from jclip.checkpoint import Checkpointer, read_params
from jclip.data import pipeline
from jclip.data.sources import build_source
from jclip.data.tokenizer import Tokenizer
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import make_evaluator
from jclip.evaluate.report import flatten, write_report
from jclip.evaluate.tasks import run_tasks, select_tasks
from jclip.models.summary import training_flops_per_pair
from jclip.train.metrics_writer import MetricsWriter
from jclip.train.optimizer import build_optimizer, learning_rate_schedule
from jclip.train.profiling import StepProfiler
from jclip.train.state import StateLayout, TrainState, create_train_state, state_layout, train_state_from_params
from jclip.train.step import make_train_step
from jclip.train.teacher import make_teacher
from jclip.train.throughput import ThroughputMeter, peak_flops_per_device


class StopRequested:
    """SIGTERM / SIGINT (preemption, Ctrl-C) as a stop that every process takes at the same step.

    One process: the signal handlers set a flag that the loop checks between steps. Several
    processes (`jax.distributed`): a signal reaches them at different moments, so JAX's preemption
    service catches SIGTERM on any of them and agrees on the step at which all stop
    (`multihost_utils.reached_preemption_sync_point`, no per-step collective); Ctrl-C is handed to
    it as a SIGTERM. A signal that comes while the stop checkpoint is written is only noted.
    """

    def __init__(self):
        self.several_processes = jax.process_count() > 1
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.several_processes else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.several_processes:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

    def reached(self, step: int) -> bool:
        """Whether to stop before `step`, the same answer on every process (ask at every step)."""
        if self.several_processes:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_vocabulary(config: ConfigDict, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set --config.model.text.vocab_size={tokenizer.vocab_size}"
        )


def train_state_layout(config: ConfigDict, model, optimizer, mesh) -> StateLayout:
    """How the config lays out the train state: data shapes, `parameter_sharding` and whether there is an EMA."""
    image_shape = (config.data.image_size, config.data.image_size, 3)
    return state_layout(model, optimizer, image_shape, config.data.text_length, mesh, config.parameter_sharding,
                        ema=config.ema_decay > 0)


def initial_state(config: ConfigDict, workdir: str, layout: StateLayout,
                  checkpointer: Checkpointer) -> tuple[TrainState, int]:
    """(state, this process's input position) to start from: the workdir's latest checkpoint, or the
    parameters of a parameters-only checkpoint there (converted weights) with a fresh optimizer, or
    freshly initialised parameters."""
    latest = checkpointer.latest_step()
    if latest is None:
        return create_train_state(layout, jax.random.key(config.seed)), 0
    record = checkpointer.read_record(latest)
    if record.get("parameters_only"):
        checkpointer.check_model(record)
        params, _ = read_params(workdir, layout.abstract.params, latest)
        print(f"Starting from the parameters in {checkpointer.directory}/{latest}, with a fresh optimizer.")
        return train_state_from_params(layout, params), 0
    state, record = checkpointer.restore(layout.abstract, latest)
    print(f"Resuming from {checkpointer.directory} at step {int(state.step)}.")
    return state, start_position(record, config)


def evaluation_params(state: TrainState):
    """The EMA of the parameters when the run keeps one, else the parameters."""
    return state.params if state.ema_params is None else state.ema_params


def start_position(record: dict, config: ConfigDict) -> int:
    """This process's input position from a checkpoint record, also after a change of process count.

    With the same number of processes every process continues exactly where it
    was. With another number, the examples drawn so far are split evenly over
    the new processes: the run continues, but the data order cannot be the one
    an uninterrupted run would have had, since each process reads its own slice.
    """
    positions = record["data_position"]
    if len(positions) == jax.process_count():
        return positions[jax.process_index()]
    if jax.process_index() == 0:
        print(f"The checkpoint was written by {len(positions)} processes and this run has {jax.process_count()}: "
              "parameters and optimizer state resume exactly; the input continues from an even split of the "
              "examples drawn so far.")
    return sum(positions) // jax.process_count()


def write_config(config: ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def train(config: ConfigDict, workdir: str, *, evaluate_at_end: bool = True) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`) and return the final state."""
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    sources = [build_source(options, config.data.data_dir) for options in config.data.sources.values()]
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    check_vocabulary(config, tokenizer)
    select_tasks(config.evaluate.tasks)  # a misconfigured evaluation fails now, not after training

    model = models.model_class(config.model)(**config.model)
    optimizer = build_optimizer(config)
    schedule = learning_rate_schedule(config)
    image_shape = (config.data.image_size, config.data.image_size, 3)
    layout = train_state_layout(config, model, optimizer, mesh)
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, keep_period=config.keep_checkpoint_every)
    state, position = initial_state(config, workdir, layout, checkpointer)
    start_step = int(state.step)

    batches = pipeline.TrainInput(
        sources, tokenizer, mesh, batch_size=config.batch_size, text_length=config.data.text_length,
        seed=config.seed, shuffle_buffer=config.data.shuffle_buffer, image_preprocess=config.data.preprocess,
        start_position=position, negative_kinds=config.data.negative_kinds,
        negative_attributes=config.data.negative_attributes,
    )
    teacher = make_teacher(config, mesh, tokenizer)
    train_step = make_train_step(layout, config.losses.to_dict(), config.micro_batches, config.ema_decay, config.seed)
    throughput = ThroughputMeter(config.batch_size, training_flops_per_pair(model, image_shape, config.data.text_length),
                                 mesh.devices.size, peak_flops_per_device(config.peak_flops_per_device))

    def record():
        """What an exact resume needs besides the state: every process's input position."""
        positions = multihost_utils.process_allgather(np.int64(batches.position))
        return {"data_position": np.atleast_1d(positions).tolist(), "seed": config.seed}

    def time_to_save() -> bool:
        """Whether `checkpoint_every_minutes` have passed, as process 0's clock says (all agree)."""
        due = bool(config.checkpoint_every_minutes) and (
            checkpointer.minutes_since_save() >= config.checkpoint_every_minutes)
        return parallel.process_zero_decides(due)

    writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
    profiler = StepProfiler(config.get("profile_steps"), os.path.join(workdir, "profile"))

    def check_finite(metrics: dict, step: int) -> None:
        """Stop on a non-finite loss or gradient, unless the optimizer skips such updates."""
        if config.optimizer.skip_nonfinite or all(np.isfinite([metrics["loss"], metrics["grad_norm"]])):
            return
        raise FloatingPointError(
            f"loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step}; the last good "
            f"checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. Lower the learning "
            "rate, or set config.optimizer.skip_nonfinite=True to skip such updates."
        )
    try:  # pending saves of good states complete even when the run stops on an error
        run_start = time.perf_counter()
        with StopRequested() as stop, tqdm(
            total=config.total_steps, initial=start_step, desc="train", unit="step",
            disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0,
        ) as bar:
            step, stopping = start_step, False
            while step < config.total_steps and not (stopping := stop.reached(step)):
                batch = next(batches)
                if teacher is not None:
                    batch.update(teacher(batch))
                profiler.before(step)
                state, metrics = train_step(state, batch)
                profiler.after(step, metrics)
                step += 1
                throughput.step()
                logging = step % config.log_every == 0 or step == config.total_steps
                saving = checkpointer.due(step) or (logging and time_to_save())
                if logging or saving:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(metrics, step)  # before saving: a checkpoint is never of diverged params
                if saving:
                    checkpointer.save(step, state, record, force=True)
                if logging:
                    metrics.update(throughput.read(), learning_rate=float(schedule(step - 1)),
                                   seconds=time.perf_counter() - run_start, skipped_examples=batches.skipped,
                                   left_out_examples=batches.left_out)
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", samples_per_s=f"{metrics['samples_per_second']:.0f}")
                if config.evaluate.every_steps and step % config.evaluate.every_steps == 0 and step < config.total_steps:
                    evaluator = make_evaluator(config, model, evaluation_params(state), tokenizer, mesh)
                    results = {}
                    for name, result in run_tasks(evaluator, config.evaluate.tasks).items():
                        results.update(flatten(result.metrics, f"eval/{name}"))
                    writer.write(step, {"seconds": time.perf_counter() - run_start, **results})
                bar.update(1)
            # The last save, still under the handlers: a signal that comes now only sets the flag.
            if checkpointer.latest_step() != step:
                if step > start_step:
                    check_finite({k: float(v) for k, v in jax.device_get(metrics).items()}, step)
                checkpointer.save(step, state, record, force=True)
            checkpointer.wait()
    finally:
        profiler.stop()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    if stopping:
        print(f"Stopped at step {step} on request; checkpoint saved. Re-run the same command to resume.")
    elif evaluate_at_end and step == config.total_steps:
        evaluator = make_evaluator(config, model, evaluation_params(state), tokenizer, mesh)
        write_report(run_tasks(evaluator, config.evaluate.tasks), workdir, step, f"Evaluation of {workdir}")
    return state
