"""Evaluating a checkpoint, as `python -m jclip.evaluate` does: a run's own, or a converted one."""

import os
from typing import Any, Optional, Sequence

from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.report import write_report
from jclip.evaluate.tasks import Evaluator, run_tasks, select_tasks
from jclip.train.state import abstract_params


def make_evaluator(config: ConfigDict, model, params, tokenizer, mesh) -> Evaluator:
    """An `Evaluator` of `params` with the data settings and evaluation batch size of `config`."""
    return Evaluator(model, params, tokenizer, mesh, config.evaluate.batch_size, config.data.image_size,
                     config.data.text_length, config.data.data_dir)


def locate(workdir: Optional[str], checkpoint: Optional[str], step: Optional[int]) -> tuple[str, Optional[int]]:
    """(run directory, step) of the checkpoint to evaluate."""
    if checkpoint is None:
        if workdir is None:
            raise ValueError("give --workdir (its latest checkpoint) or --checkpoint PATH")
        return workdir, step
    checkpoint = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a run directory: its latest (or --step)
        return checkpoint, step
    parent = os.path.dirname(checkpoint)
    if not (os.path.isdir(checkpoint) and os.path.basename(parent) == "checkpoints"
            and os.path.basename(checkpoint).isdigit()):
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: give a RUN/checkpoints/STEP directory "
                                "(as jclip.train and jclip.convert write) or a run directory")
    return os.path.dirname(parent), int(os.path.basename(checkpoint))


def load_checkpoint_model(config: ConfigDict, run_directory: str, step: Optional[int], mesh, tokenizer, *,
                          verbose: bool = True) -> tuple[Any, Any, dict]:
    """(model, params, record) of a run's checkpoint (default: latest): the model the checkpoint records,
    its EMA parameters when it has them, laid out for `config.parameter_sharding` over `mesh`.

    The config supplies the data shapes (image size, text length), which the parameters must fit.
    """
    if not os.path.isdir(os.path.join(run_directory, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {run_directory}")
    checkpointer = Checkpointer(run_directory, {}, save_every=1)
    try:
        record = checkpointer.read_record(step)
        model_config = ConfigDict(record["model"])
        if verbose and model_config.to_dict() != config.model.to_dict():
            print(f"Using the checkpoint's own model ({record['model']}), not config.model.")
        model = models.model_class(model_config)(**model_config)
        if tokenizer.vocab_size > model_config.text.vocab_size:
            raise ValueError(f"the tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more than "
                             f"the checkpoint's model ({model_config.text.vocab_size}); set config.data.tokenizer to "
                             "its own")
        image_shape = (config.data.image_size, config.data.image_size, 3)
        target = abstract_params(model, config.parameter_sharding, mesh, image_shape, config.data.text_length)
        try:
            params, record = checkpointer.restore_params(target, step)
        except ValueError as error:
            raise ValueError(f"the checkpoint's parameters do not fit config.data.image_size={config.data.image_size}"
                             f" and text_length={config.data.text_length} ({str(error).splitlines()[0]})") from None
    finally:
        checkpointer.close()
    return model, params, record


def evaluate_checkpoint(config: ConfigDict, workdir: Optional[str] = None, step: Optional[int] = None, *,
                        checkpoint: Optional[str] = None, tasks: Optional[Sequence[str]] = None) -> dict:
    """Run `config.evaluate.tasks` (or the named `tasks`) on a checkpoint; write the report.

    The checkpoint is the latest of `workdir` (or its `step`), or the one at `checkpoint`.
    The model is the one the checkpoint records, and its EMA parameters are used
    when it has them; the config supplies the data settings and the tasks. The
    report goes to `workdir`, by default the checkpoint's run directory.
    """
    select_tasks(config.evaluate.tasks, tasks)  # a bad task name fails before anything is loaded
    run_directory, step = locate(workdir, checkpoint, step)
    mesh = parallel.make_mesh()
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    model, params, record = load_checkpoint_model(config, run_directory, step, mesh, tokenizer)
    results = run_tasks(make_evaluator(config, model, params, tokenizer, mesh), config.evaluate.tasks, tasks)
    return write_report(results, workdir or run_directory, record["step"],
                        f"Evaluation of {os.path.join(run_directory, 'checkpoints', str(record['step']))}")
