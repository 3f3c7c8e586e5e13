"""The evaluation report: `results.json`, a printed table per task, and a PNG figure per task."""

import json
import os
from typing import Mapping

import jax

from jclip.evaluate.tasks import TaskResult


def flatten(metrics: Mapping, prefix: str) -> dict[str, float]:
    """The numeric leaves of `metrics` as {"prefix/a/b": value}, per-class accuracies left out (metric logs)."""
    flat = {}
    for key, value in metrics.items():
        if key == "per_class_accuracy":
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` whole or not at all: into a temporary file, then renamed over `path`."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(results: Mapping[str, TaskResult], workdir: str, step: int, title: str) -> dict:
    """Write `<workdir>/results.json` and `<workdir>/plots/<task>.png`, print the tables (process 0 only).

    Returns the JSON content: `{"step": step, "tasks": {name: metrics}}`.
    """
    report = {"step": step, "tasks": {name: result.metrics for name, result in results.items()}}
    if jax.process_index() != 0:
        return report
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "results.json")
    write_text(path, json.dumps(report, indent=2))
    figures = os.path.join(workdir, "plots")
    lines = [f"\n{title} (step {step})"]
    for name, result in results.items():
        lines += [f"\n{name}:", result.table]
        if result.plot is not None:
            os.makedirs(figures, exist_ok=True)
            result.plot(os.path.join(figures, f"{name}.png"))
            lines.append(f"Figure: {os.path.join(figures, name + '.png')}")
    print("\n".join(lines + [f"\nWritten to {path}"]), flush=True)
    return report
