"""One table of evaluation results across checkpoints and models, and its figure against training step.

Each row is (model, checkpoint, step, task, metric, value): `model` names the run (its directory), `checkpoint`
is the checkpoint's directory, `metric` a numeric leaf of the task's metrics ("top1", "image_to_text/R@5").
The table is a CSV file, or a JSON list of rows when its name ends in `.json`; `python -m jclip.evaluate`
appends to it and leaves out the (checkpoint, task) pairs it already holds, so a user can follow a long
run by evaluating its kept checkpoints again and again, or gather several models in one file.
"""

import csv
import io
import json
import os
from typing import Mapping

import numpy as np

from jclip.evaluate import plots
from jclip.evaluate.report import flatten, write_text

COLUMNS = ("model", "checkpoint", "step", "task", "metric", "value")
# The metrics the figure draws (those a reader of a task looks at first), where a task has them.
HEADLINE_METRICS = ("top1", "image_to_text/R@5", "text_to_image/R@5", "full/best", "mean",
                    "zero_shot/shape/all", "zero_shot/shape/held_out")


def read_table(path: str) -> list[dict]:
    """The rows of the table at `path` (none if it does not exist yet); steps as ints, values as floats."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = json.load(f) if path.endswith(".json") else list(csv.DictReader(f))
    if rows and set(rows[0]) != set(COLUMNS):
        raise ValueError(f"{path} is not a jclip results table (its columns are {sorted(rows[0])}, not "
                         f"{list(COLUMNS)}); give --table another file")
    return [{**row, "step": int(row["step"]), "value": float(row["value"])} for row in rows]


def evaluated_tasks(rows: list[dict], checkpoint: str) -> set[str]:
    """The tasks the table already holds for `checkpoint`."""
    return {row["task"] for row in rows if row["checkpoint"] == checkpoint}


def task_rows(model: str, checkpoint: str, step: int, task: str, metrics: Mapping) -> list[dict]:
    """The table's rows of one task's metrics (its numeric leaves; per-class accuracies left out)."""
    return [{"model": model, "checkpoint": checkpoint, "step": step, "task": task, "metric": name[len(task) + 1:],
             "value": value} for name, value in flatten(metrics, task).items()]


def write_table(path: str, rows: list[dict]) -> None:
    """Write all `rows` to `path` at once (a crash leaves the previous table whole)."""
    if path.endswith(".json"):
        write_text(path, json.dumps(rows, indent=1))
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def plot_against_step(path: str, rows: list[dict]) -> bool:
    """Draw each task's headline metric against training step, a line per model, into the PNG `path`;
    False (and no file) when the table has none."""
    curves = {}
    for row in rows:
        if row["metric"] in HEADLINE_METRICS:
            curves.setdefault((row["task"], row["metric"]), {}).setdefault(row["model"], []).append(
                (row["step"], row["value"]))
    if not curves:
        return False
    panels = []
    for (task, metric), models in sorted(curves.items()):
        lines = {model: np.array(sorted(set(points))) for model, points in sorted(models.items())}
        panels.append((f"{task}: {metric}", lines))
    plots.line_panels(path, panels, "training step", "Evaluation against training step")
    return True
