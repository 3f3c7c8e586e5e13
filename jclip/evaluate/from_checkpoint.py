"""Evaluating checkpoints, as `python -m jclip.evaluate` does: a run's own, or converted ones, one or many."""

import os

import jax
from typing import Optional, Sequence

from ml_collections import ConfigDict

from jclip import parallel
from jclip.checkpoint import kept_steps, load_model, locate, read_record, run_config
from jclip.data import preprocess
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate import results_table
from jclip.evaluate.report import write_report
from jclip.evaluate.tasks import Evaluator, run_tasks, select_tasks


def evaluation_preprocess(config: ConfigDict) -> str:
    """The evaluation tasks' default preprocessing: `config.evaluate.preprocess` where set, else the model's,
    derived from the training data settings (`preprocess.evaluation_spec`; a run's saved config may predate
    the field, and an evaluation-only config may have no training preprocessing). `config.evaluate.max_patches`,
    where set, is the token budget a NaFlex model is evaluated at (`preprocess.with_max_patches`)."""
    spec = config.evaluate.get("preprocess") or preprocess.evaluation_spec(config.data.image_size,
                                                                           config.data.get("preprocess") or "decode")
    max_patches = config.evaluate.get("max_patches")
    return preprocess.with_max_patches(spec, max_patches) if max_patches else spec


def make_evaluator(config: ConfigDict, model, params, tokenizer, mesh) -> Evaluator:
    """An `Evaluator` of `params` with the data settings and evaluation batch size of `config`."""
    return Evaluator(model, params, tokenizer, mesh, config.evaluate.batch_size, config.data.image_size,
                     config.data.text_length, evaluation_preprocess(config), config.data.data_dir)


def with_model_data_settings(config: ConfigDict, run_directory: str, record: dict) -> ConfigDict:
    """`config` with the data settings it leaves unset (None: image size, text length, tokenizer) taken from the
    checkpoint's own run, and with the image size, its evaluation preprocessing unless `config` sets one; so
    that one evaluation config (the benchmark suite's) fits every model."""
    unset = [key for key in ("image_size", "text_length", "tokenizer") if config.data.get(key) is None]
    if not unset:
        return config
    config = ConfigDict(config.to_dict())
    model_settings = run_config(run_directory, record)
    for key in unset:
        config.data[key] = model_settings.data[key]
    if not config.evaluate.get("preprocess") and "image_size" in unset:
        config.evaluate.preprocess = evaluation_preprocess(model_settings)
    return config


def checkpoints_to_evaluate(workdir: Optional[str], checkpoints: Sequence[str], step: Optional[int],
                            all_steps: bool) -> list[tuple[str, int]]:
    """(run directory, step) of each checkpoint: those of `checkpoints` (or `workdir`'s), the latest or `step`
    of each run directory, or with `all_steps` every checkpoint each run keeps."""
    located = [locate(workdir, checkpoint, step) for checkpoint in (checkpoints or [None])]
    if all_steps:
        if step is not None:
            raise ValueError("give --step or --all_steps, not both")
        return [(run, kept) for run, _ in located for kept in kept_steps(run)]
    return [(run, read_record(run, step)["step"]) for run, step in located]


def evaluate_checkpoint(config: ConfigDict, workdir: Optional[str] = None, step: Optional[int] = None, *,
                        checkpoint: Optional[str] = None, tasks: Optional[Sequence[str]] = None) -> dict:
    """Run `config.evaluate.tasks` (or the named `tasks`) on one checkpoint, the latest of `workdir` (or its
    `step`) or the one at `checkpoint`; write its report to `workdir`, by default the checkpoint's run
    directory; returns the report's content. See `evaluate_checkpoints` for the model and its settings."""
    names = list(select_tasks(config.evaluate.tasks, tasks))  # a bad task name fails before anything is loaded
    run_directory, step = locate(workdir, checkpoint, step)
    report, _ = _evaluate(config, run_directory, step, names, workdir or run_directory, parallel.make_mesh())
    return report


def _evaluate(config: ConfigDict, run_directory: str, step: Optional[int], names: Sequence[str], output: str, mesh):
    """(report, task results) of the tasks `names` on a run's checkpoint; the report written to `output`."""
    record = read_record(run_directory, step)
    settings = with_model_data_settings(config, run_directory, record)
    tokenizer = load_tokenizer(settings.data.tokenizer, settings.data.data_dir)
    model, params, record = load_model(settings, run_directory, record["step"], mesh, tokenizer)
    results = run_tasks(make_evaluator(settings, model, params, tokenizer, mesh), settings.evaluate.tasks, names,
                        skip_missing=bool(settings.evaluate.get("skip_missing", False)))
    checkpoint = os.path.join(run_directory, "checkpoints", str(record["step"]))
    return write_report(results, output, record["step"], f"Evaluation of {checkpoint}"), results


def evaluate_checkpoints(config: ConfigDict, workdir: Optional[str] = None, checkpoints: Sequence[str] = (),
                         step: Optional[int] = None, *, all_steps: bool = False,
                         tasks: Optional[Sequence[str]] = None, table: Optional[str] = None,
                         reevaluate: bool = False) -> list[dict]:
    """Run `config.evaluate.tasks` (or the named `tasks`) on each checkpoint; write a report per checkpoint
    and add its metrics to the results table; returns the reports of the checkpoints evaluated.

    The checkpoints are the latest of `workdir` (or its `step`, or with `all_steps` all it keeps), or those
    at `checkpoints` (run directories or `RUN/checkpoints/STEP`). The model is the one each checkpoint
    records, its EMA parameters when it has them; the config supplies the tasks and the data settings it
    sets (`with_model_data_settings`). Reports go to `workdir`, by default each checkpoint's run directory;
    the table (`jclip.evaluate.results_table`) to `table`, by default `evaluations.csv` there. Tasks the
    table already holds for a checkpoint are not run again (with `reevaluate`, they are, and their rows
    replaced); with `config.evaluate.skip_missing`, tasks whose data is absent are listed and skipped.
    """
    names = list(select_tasks(config.evaluate.tasks, tasks))  # a bad task name fails before anything is loaded
    mesh = parallel.make_mesh()
    reports = []
    for run_directory, checkpoint_step in checkpoints_to_evaluate(workdir, checkpoints, step, all_steps):
        output = workdir or run_directory
        table_path = table or os.path.join(output, "evaluations.csv")
        rows = results_table.read_table(table_path)
        checkpoint = os.path.join(os.path.abspath(run_directory), "checkpoints", str(checkpoint_step))
        done = set() if reevaluate else results_table.evaluated_tasks(rows, checkpoint)
        todo = [name for name in names if name not in done]
        if not todo:
            if jax.process_index() == 0:
                print(f"{checkpoint}: its {len(names)} task(s) are in {table_path} already", flush=True)
            continue
        report, results = _evaluate(config, run_directory, checkpoint_step, todo, output, mesh)
        reports.append(report)
        model_name = os.path.basename(os.path.abspath(run_directory))
        rows = [row for row in rows if not (row["checkpoint"] == checkpoint and row["task"] in todo)]
        for name, result in results.items():
            if not result.absent:
                rows += results_table.task_rows(model_name, checkpoint, checkpoint_step, name, result.metrics)
        if jax.process_index() == 0:
            results_table.write_table(table_path, rows)
            figure = os.path.splitext(table_path)[0] + ".png"
            drawn = results_table.plot_against_step(figure, rows)
            print(f"Table: {table_path}" + (f"\nFigure: {figure}" if drawn else ""), flush=True)
    return reports
