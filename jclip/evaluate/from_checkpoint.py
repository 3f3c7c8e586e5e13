"""Evaluating a checkpoint, as `python -m jclip.evaluate` does: a run's own, or a converted one."""

import os
from typing import Optional, Sequence

from ml_collections import ConfigDict

from jclip import parallel
from jclip.checkpoint import load_model, locate
from jclip.data import preprocess
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.report import write_report
from jclip.evaluate.tasks import Evaluator, run_tasks, select_tasks


def evaluation_preprocess(config: ConfigDict) -> str:
    """The evaluation tasks' default preprocessing: `config.evaluate.preprocess` where set, else the model's,
    derived from the training data settings (`preprocess.evaluation_spec`; a run's saved config may predate
    the field, and an evaluation-only config may have no training preprocessing)."""
    if config.evaluate.get("preprocess"):
        return config.evaluate.preprocess
    return preprocess.evaluation_spec(config.data.image_size, config.data.get("preprocess") or "decode")


def make_evaluator(config: ConfigDict, model, params, tokenizer, mesh) -> Evaluator:
    """An `Evaluator` of `params` with the data settings and evaluation batch size of `config`."""
    return Evaluator(model, params, tokenizer, mesh, config.evaluate.batch_size, config.data.image_size,
                     config.data.text_length, evaluation_preprocess(config), config.data.data_dir)


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
    model, params, record = load_model(config, run_directory, step, mesh, tokenizer)
    results = run_tasks(make_evaluator(config, model, params, tokenizer, mesh), config.evaluate.tasks, tasks)
    return write_report(results, workdir or run_directory, record["step"],
                        f"Evaluation of {os.path.join(run_directory, 'checkpoints', str(record['step']))}")
