"""The training loop, in three stages: `set_up` builds a `Run` (data, model, state, step, writers);
`run_steps` steps it with the periodic actions between steps (logging, saving, evaluating); the end
saves the last step and evaluates. `train` runs the three.
"""

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm import tqdm

from jclip import models, parallel
from jclip.checkpoint import Checkpointer, read_params
from jclip.data import naflex, pipeline, preprocess
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.sources import build_source
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import evaluation_preprocess, make_evaluator
from jclip.evaluate.report import flatten, write_report
from jclip.evaluate.tasks import check_task_inputs, run_tasks
from jclip.models.summary import training_flops_per_pair
from jclip.train.metrics_writer import MetricsWriter
from jclip.train.init_from import ALL, pretrained_params
from jclip.train.optimizer import build_optimizer, learning_rate_schedule
from jclip.train.profiling import StepProfiler
from jclip.train.state import StateLayout, TrainState, create_train_state, state_layout, train_state_from_params
from jclip.train.step import make_train_step
from jclip.train.teacher import make_teacher
from jclip.train.throughput import ThroughputMeter, peak_flops_per_device
from jclip.train.workdir_lock import WorkdirLock


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


def patch_input_example(config: ConfigDict) -> Optional[dict[str, np.ndarray]]:
    """One all-padding patch input as the input pipeline hands NaFlex examples to the step (dtype included), or
    None where the config trains on images [image_size, image_size, 3]."""
    budget = preprocess.naflex_budget(config.data.preprocess)
    return naflex.example(*budget, preprocess.batch_image_dtype(config.data.preprocess)) if budget else None


def config_train_step(config: ConfigDict, layout: StateLayout):
    """The config's jitted train step: its losses, micro-batches, EMA and seed, and the per-pixel ops of its
    preprocessing, which the step applies to the input pipeline's images on the devices."""
    return make_train_step(layout, config.losses.to_dict(), config.micro_batches, config.ema_decay, config.seed,
                           preprocess.batch_op(config.data.preprocess), tuple(config.optimizer.get("frozen", ())))


def initial_state(config: ConfigDict, workdir: str, layout: StateLayout,
                  checkpointer: Checkpointer) -> tuple[TrainState, int]:
    """(state, this process's input position) to start from: the workdir's newest readable checkpoint
    (`Checkpointer.newest_readable`), or the parameters of a parameters-only checkpoint there (converted
    weights) with a fresh optimizer, or freshly initialised parameters, with the parts `config.init_from`
    names taken from pretrained ones."""
    if checkpointer.latest_step() is None:
        check_locked_parts_are_pretrained(config)
        state = create_train_state(layout, jax.random.key(config.seed))
        if config.init_from.path is None:
            return state, 0
        params = pretrained_params(config, layout, state.params)
        parts = ", ".join(config.init_from.parts)
        print(f"Starting from the parameters ({parts}) of {config.init_from.path}, with a fresh optimizer.")
        return train_state_from_params(layout, params), 0

    def read(step: int) -> tuple[TrainState, int, str]:
        record = checkpointer.read_record(step)
        if record.get("parameters_only"):
            checkpointer.check_model(record)
            params, _ = read_params(workdir, layout.abstract.params, step)
            return (train_state_from_params(layout, params), 0,
                    f"Starting from the parameters in {checkpointer.directory}/{step}, with a fresh optimizer.")
        state, record = checkpointer.restore(layout.abstract, step)
        return state, start_position(record, config), f"Resuming from {checkpointer.directory} at step {step}."

    state, position, message = checkpointer.newest_readable(read, strict=config.resume_strict)
    print(message)
    return state, position


SET_BY_CONFIG = ("logit_scale", "logit_bias")  # initialised from config.model (init_scale, init_bias), not at random


def check_locked_parts_are_pretrained(config: ConfigDict) -> None:
    """A new run that locks parameter groups (`optimizer.frozen`) must take them from `init_from`: locked at
    their random initialisation they would be useless. The scale and bias start where the config says, so
    locking them is a fixed temperature (and bias)."""
    parts = tuple(config.init_from.parts) if config.init_from.path is not None else ()
    random = [group for group in config.optimizer.frozen
              if group not in SET_BY_CONFIG and ALL not in parts and group not in parts]
    if random:
        raise ValueError(f"config.optimizer.frozen locks {random}, which this new run would keep at their random "
                         "initialisation: set config.init_from.path to pretrained weights (and config.init_from.parts "
                         "to include them)")


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


@dataclasses.dataclass
class Run:
    """Everything a training run works with, built once by `set_up`; `state` is the current train state."""

    config: ConfigDict
    workdir: str
    mesh: Mesh
    model: nn.Module
    tokenizer: Tokenizer
    checkpointer: Checkpointer
    batches: pipeline.TrainInput
    teacher: Optional[Callable[[dict], dict]]
    train_step: Callable
    schedule: Callable[[int], Any]
    throughput: ThroughputMeter
    writer: MetricsWriter
    profiler: StepProfiler
    state: TrainState
    start_step: int
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def record(self) -> dict:
        """What an exact resume needs besides the state: every process's input position (a collective)."""
        positions = multihost_utils.process_allgather(np.int64(self.batches.position))
        return {"data_position": np.atleast_1d(positions).tolist(), "seed": self.config.seed}

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        """Stop profiling and making batches, complete pending saves (also after an error: they are of good
        states), close files."""
        self.profiler.stop()
        self.batches.close()
        self.checkpointer.wait()
        self.checkpointer.close()
        self.writer.close()


def set_up(config: ConfigDict, workdir: str) -> Run:
    """Stage 1: the run's mesh, data, model, state (resumed, started from parameters, or fresh), step and writers.
    Misconfigurations (batch size, vocabulary, evaluation tasks and their data) fail here, before any training."""
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    sources = [build_source(options, config.data.data_dir) for options in config.data.sources.values()]
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    check_vocabulary(config, tokenizer)
    check_task_inputs(config.evaluate.tasks, config.data.image_size, evaluation_preprocess(config), config.data.data_dir)

    model = models.model_class(config.model)(**config.model)
    layout = train_state_layout(config, model, build_optimizer(config), mesh)
    if config.checkpoint_failure not in ("stop", "retry"):
        raise ValueError(f"config.checkpoint_failure={config.checkpoint_failure!r}; use 'stop' (a failed save stops "
                         "the run) or 'retry' (train on and save again at the next checkpoint)")
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, keep_period=config.keep_checkpoint_every,
                                retry_failed_saves=config.checkpoint_failure == "retry")
    state, position = initial_state(config, workdir, layout, checkpointer)
    batches = pipeline.TrainInput(
        sources, tokenizer, mesh, batch_size=config.batch_size, text_length=config.data.text_length,
        seed=config.seed, shuffle_buffer=config.data.shuffle_buffer, image_preprocess=config.data.preprocess,
        start_position=position, negative_kinds=config.data.negative_kinds,
        negative_attributes=config.data.negative_attributes,
    )
    flops = training_flops_per_pair(model, layout.image_shape, config.data.text_length, patch_input_example(config),
                                    tuple(config.optimizer.get("frozen", ())))
    return Run(
        config=config, workdir=workdir, mesh=mesh, model=model, tokenizer=tokenizer, checkpointer=checkpointer,
        batches=batches, teacher=make_teacher(config, mesh, tokenizer),
        train_step=config_train_step(config, layout),
        schedule=learning_rate_schedule(config),
        throughput=ThroughputMeter(config.batch_size, flops, mesh.devices.size,
                                   peak_flops_per_device(config.peak_flops_per_device)),
        writer=MetricsWriter(workdir, tensorboard=config.tensorboard),
        profiler=StepProfiler(config.get("profile_steps"), os.path.join(workdir, "profile"), settle=batches.wait),
        state=state, start_step=int(state.step),
    )


def run_steps(run: Run, stop: StopRequested, bar: tqdm) -> tuple[int, Any]:
    """Stage 2: steps until `total_steps` or an agreed stop, with the periodic actions between them.

    On CPU devices a step is queued only once the step before is done (its next batch is drawn
    meanwhile), as XLA's CPU client allocates a step's temporary buffers when it is queued (see
    `jclip.host_memory.synchronous_cpu_dispatch`, which the entry points apply to one CPU device).
    Accelerators keep asynchronous dispatch.

    Returns the last step and its metrics (as the step returned them)."""
    config = run.config
    step, metrics = run.start_step, None
    host_computes = run.mesh.devices.flat[0].platform == "cpu"
    while step < config.total_steps and not stop.reached(step):
        batch = next(run.batches)
        if host_computes:
            jax.block_until_ready(metrics)
        if run.teacher is not None:
            batch.update(run.teacher(batch))
        run.profiler.before(step)
        run.state, metrics = run.train_step(run.state, batch)
        run.profiler.after(step, metrics)
        step += 1
        run.throughput.step()
        logging = step % config.log_every == 0 or step == config.total_steps
        saving = run.checkpointer.due(step) or (logging and time_to_save(run))
        if logging or saving:
            metrics = fetched(metrics)
            check_finite(run, metrics, step)  # before saving: a checkpoint is never of diverged parameters
        if saving:
            run.checkpointer.save(step, run.state, run.record, force=True)
        if logging:
            log_metrics(run, step, metrics, bar)
        if config.evaluate.every_steps and step % config.evaluate.every_steps == 0 and step < config.total_steps:
            evaluate_during_training(run, step)
        bar.update(1)
    return step, metrics


def time_to_save(run: Run) -> bool:
    """Whether `checkpoint_every_minutes` have passed, as process 0's clock says (all processes agree)."""
    minutes = run.config.checkpoint_every_minutes
    return parallel.process_zero_decides(bool(minutes) and run.checkpointer.minutes_since_save() >= minutes)


def fetched(metrics: Any) -> dict[str, float]:
    """A step's metrics on the host, as floats (waits for the step)."""
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def check_finite(run: Run, metrics: dict[str, float], step: int) -> None:
    """Stop on a non-finite loss or gradient, unless the optimizer skips such updates."""
    if run.config.optimizer.skip_nonfinite or all(np.isfinite([metrics["loss"], metrics["grad_norm"]])):
        return
    raise FloatingPointError(
        f"loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step}; the last good "
        f"checkpoint is step {run.checkpointer.latest_step()} in {run.checkpointer.directory}. Lower the learning "
        "rate, or set config.optimizer.skip_nonfinite=True to skip such updates."
    )


def log_metrics(run: Run, step: int, metrics: dict[str, float], bar: tqdm) -> None:
    """The step's metrics with throughput, learning rate and input counts, to metrics.jsonl, TensorBoard and the bar.

    `skipped_examples` counts this process's draws skipped since the run began, resumes included: its position
    less the examples its batches held."""
    skipped = run.batches.position - step * (run.config.batch_size // jax.process_count())
    metrics = {**metrics, **run.throughput.read(), "learning_rate": float(run.schedule(step - 1)),
               "seconds": run.seconds(), "skipped_examples": skipped, "left_out_examples": run.batches.left_out}
    run.writer.write(step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", samples_per_s=f"{metrics['samples_per_second']:.0f}")


def evaluate(run: Run):
    """The config's evaluation tasks on the run's current (EMA) parameters."""
    evaluator = make_evaluator(run.config, run.model, evaluation_params(run.state), run.tokenizer, run.mesh)
    return run_tasks(evaluator, run.config.evaluate.tasks)


def evaluate_during_training(run: Run, step: int) -> None:
    results = {}
    for name, result in evaluate(run).items():
        results.update(flatten(result.metrics, f"eval/{name}"))
    run.writer.write(step, {"seconds": run.seconds(), **results})


def save_at_end(run: Run, step: int, metrics: Any) -> None:
    """Stage 3, first part: the last step saved (unless it already is), checked for finite values first."""
    if run.checkpointer.latest_step() != step:
        if step > run.start_step:
            check_finite(run, fetched(metrics), step)
        run.checkpointer.save(step, run.state, run.record, force=True)
    run.checkpointer.wait()


def progress_bar(run: Run) -> tqdm:
    return tqdm(total=run.config.total_steps, initial=run.start_step, desc="train", unit="step",
                disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0)


def train(config: ConfigDict, workdir: str, *, evaluate_at_end: bool = True) -> TrainState:
    """Train (resuming from the newest readable checkpoint in `workdir`), evaluate at the end, return the
    final state; the workdir is locked against other trainers meanwhile."""
    with WorkdirLock(workdir, config.lock_stale_minutes):
        run = set_up(config, workdir)
        try:
            with StopRequested() as stop, progress_bar(run) as bar:
                step, metrics = run_steps(run, stop, bar)
                save_at_end(run, step, metrics)  # still under the handlers: a signal that comes now only sets the flag
        finally:
            run.close()
        if step < config.total_steps:
            print(f"Stopped at step {step} on request; checkpoint saved. Re-run the same command to resume.")
        elif evaluate_at_end and step == config.total_steps:
            write_report(evaluate(run), workdir, step, f"Evaluation of {workdir}")
    return run.state
