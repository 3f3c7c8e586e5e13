"""The training loop: data, model, sharded steps, logging, checkpoints, final evaluation."""

import json
import os
import signal
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.data import pipeline, shapes
from jclip.data.sources import build_source
from jclip.data.tokenizer import Tokenizer
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.shapes_benchmark import evaluate_and_report, evaluate_shapes, flatten
from jclip.train.optimizer import build_optimizer, learning_rate_schedule
from jclip.train.state import TrainState, abstract_train_state, create_train_state
from jclip.train.step import make_train_step


class StopRequested:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (preemption)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_vocabulary(config: ConfigDict, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set --config.model.text.vocab_size={tokenizer.vocab_size}"
        )


def write_config(config: ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def train(config: ConfigDict, workdir: str, *, evaluate_at_end: bool = True,
          stop_after: Optional[int] = None) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`) and return the final state.

    `stop_after` ends the run early after that many steps of this call, as a
    preemption would (a checkpoint is saved first).
    """
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    sources = [build_source(options, config.data.data_dir) for options in config.data.sources.values()]
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    check_vocabulary(config, tokenizer)
    evaluation_data = shapes.prepare(config.evaluate.dataset, config.data.data_dir)

    model = models.model_class(config.model)(**config.model)
    optimizer = build_optimizer(config)
    schedule = learning_rate_schedule(config)
    image_shape = (config.data.image_size, config.data.image_size, 3)
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints)
    if checkpointer.latest_step() is None:
        state = create_train_state(model, optimizer, jax.random.key(config.seed), image_shape,
                                   config.data.text_length, mesh)
        start_position = 0
    else:
        abstract = abstract_train_state(model, optimizer, image_shape, config.data.text_length, mesh)
        state, record = checkpointer.restore(abstract)
        start_position = record["data_position"][jax.process_index()]
        print(f"Resuming from {checkpointer.directory} at step {int(state.step)}.")
    start_step = int(state.step)

    batches = pipeline.TrainInput(
        sources, tokenizer, mesh, batch_size=config.batch_size, text_length=config.data.text_length,
        seed=config.seed, shuffle_buffer=config.data.shuffle_buffer, image_preprocess=config.data.preprocess,
        start_position=start_position, negative_kinds=config.data.negative_kinds,
        negative_attributes=config.data.negative_attributes,
    )
    train_step = make_train_step(model, optimizer, mesh, config.loss, config.micro_batches)
    end_step = config.total_steps if stop_after is None else min(config.total_steps, start_step + stop_after)

    def record():
        """What an exact resume needs besides the state: every process's input position."""
        positions = multihost_utils.process_allgather(np.int64(batches.position))
        return {"data_position": np.atleast_1d(positions).tolist(), "seed": config.seed}

    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def log(step, values):
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    run_start = time.perf_counter()
    with StopRequested() as stop, tqdm(
        total=config.total_steps, initial=start_step, desc="train", unit="step",
        disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0,
    ) as bar:
        step = start_step
        window_start, window_steps = time.perf_counter(), 0
        while step < end_step and not stop.requested:
            state, metrics = train_step(state, next(batches))
            step += 1
            window_steps += 1
            checkpointer.save(step, state, record)
            if step % config.log_every == 0 or step == end_step:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(metrics["loss"]) and not config.optimizer.skip_nonfinite:
                    raise FloatingPointError(
                        f"loss is {metrics['loss']} at step {step}; last good checkpoint: "
                        f"step {checkpointer.latest_step()} in {checkpointer.directory}"
                    )
                now = time.perf_counter()
                metrics["samples_per_second"] = window_steps * config.batch_size / (now - window_start)
                metrics["learning_rate"] = float(schedule(step - 1))
                metrics["seconds"] = now - run_start
                metrics["skipped_examples"] = batches.skipped
                window_start, window_steps = now, 0
                log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", samples_per_s=f"{metrics['samples_per_second']:.0f}")
            if config.evaluate.every_steps and step % config.evaluate.every_steps == 0 and step < config.total_steps:
                results = evaluate_shapes(model, state.params, evaluation_data, tokenizer, config, mesh)
                log(step, {"seconds": time.perf_counter() - run_start, **flatten(results, "eval")})
            bar.update(1)
    if checkpointer.latest_step() != step:
        checkpointer.save(step, state, record, force=True)
    checkpointer.wait()
    checkpointer.close()
    if stop.requested:
        print(f"Stopped at step {step} on request; checkpoint saved. Re-run the same command to resume.")
    elif evaluate_at_end and step == config.total_steps:
        evaluate_and_report(model, state.params, evaluation_data, tokenizer, config, workdir, mesh, step)
    return state
