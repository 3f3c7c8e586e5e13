"""Fine-tuning without forgetting: WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models").

    python -m jclip.wise_ft --config configs/shapes_tiny.py --pretrained runs/pretrained \
        --finetuned runs/finetuned --workdir runs/mixed [--alphas 0,0.25,0.5,0.75,1] [--tasks a,b] \
        [--select TASK/METRIC]

A model fine-tuned from a pretrained one gains on the fine-tuning distribution and often loses on others.
WiSE-FT evaluates the weight-space mixtures (1 - α) θ_pretrained + α θ_finetuned (every parameter, the scale
included) for each α, with the evaluation tasks of CONFIG (`config.evaluate.tasks`, or those `--tasks` names)
run as `python -m jclip.evaluate` runs them, and keeps the best: the mixture of two models fine-tuned one from
the other lies in one basin of the loss, so it is a good model too, often better than both ends.

--pretrained and --finetuned are checkpoints of one architecture: run directories (their latest checkpoint),
`RUN/checkpoints/STEP` directories or converted checkpoints (their EMA parameters when they keep one).
Writes to the workdir: `wise_ft.json` (each α's metrics), `wise_ft.md` (a table, rows α, columns the
headline metrics of the tasks, also printed), `plots/wise_ft.png` (the headline metrics against α), and the
mixture of the α with the best `--select` metric (default: the first task's first headline metric) as a
parameters-only checkpoint with a `config.json`, which `jclip.load(WORKDIR)`, `python -m jclip.evaluate
--workdir WORKDIR` and `python -m jclip.train --workdir WORKDIR` (a fresh optimizer) read.
"""

import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.checkpoint import load_model, locate, read_record, save_parameters_only, stored_parameter_shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate import plots
from jclip.evaluate.from_checkpoint import make_evaluator
from jclip.evaluate.report import flatten, write_text
from jclip.evaluate.tasks import run_tasks, select_tasks
from jclip.parameter_layout import parameter_name

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)

# The metrics of each task kind that the table and the figure show (paths in the task's metrics); a
# `compositionality` task shows the accuracy of each perturbation kind it measured.
HEADLINE_METRICS = {
    "shapes": tuple(f"zero_shot/{attribute}/{subset}" for attribute in ("shape", "colour")
                    for subset in ("all", "seen", "held_out")),
    "zero_shot": ("top1",),
    "retrieval": ("image_to_text/R@1", "text_to_image/R@1"),
    "linear_probe": ("full/best",),
}


# -- the mixtures ---------------------------------------------------------------------------------------------

@jax.jit
def _mix(pretrained: Any, finetuned: Any, alpha: jax.Array) -> Any:
    def mix(a, b):
        mixed = (1 - alpha) * a.astype(jnp.float32) + alpha * b.astype(jnp.float32)
        return mixed.astype(a.dtype)
    return jax.tree.map(mix, pretrained, finetuned)


def interpolate(pretrained: Any, finetuned: Any, alpha: float) -> Any:
    """(1 - α) · `pretrained` + α · `finetuned`, parameter by parameter (computed in float32, stored in each
    parameter's dtype), laid out as `pretrained` is (replicated or FSDP). α = 0 gives `pretrained` and α = 1
    `finetuned` exactly."""
    check_alphas([alpha])
    if jax.tree.structure(pretrained) != jax.tree.structure(finetuned):
        raise ValueError("the two parameter trees differ in structure; mix parameters of one architecture")
    mixed = _mix(pretrained, finetuned, jnp.float32(alpha))
    # In `pretrained`'s own layout: jit may spell an equal sharding otherwise (P('data') for P('data', None)).
    return jax.tree.map(lambda leaf, like: jax.device_put(leaf, like.sharding) if isinstance(like, jax.Array)
                        else leaf, mixed, pretrained)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The mixing coefficients as floats, each in [0, 1], none twice."""
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("--alphas is empty; give mixing coefficients in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    bad = [a for a in alphas if not 0 <= a <= 1]  # NaN fails too
    if bad:
        raise ValueError(f"--alphas: {bad[0]:g} is outside [0, 1] (0: the pretrained model, 1: the fine-tuned one)")
    twice = sorted({a for a in alphas if alphas.count(a) > 1})
    if twice:
        raise ValueError(f"--alphas lists {twice[0]:g} twice")
    return alphas


def parse_alphas(values: Sequence[str]) -> list[float]:
    """`--alphas` (strings) as floats in [0, 1]."""
    alphas = []
    for value in values:
        try:
            alphas.append(float(value))
        except ValueError:
            raise ValueError(f"--alphas: {value!r} is not a number; give mixing coefficients in [0, 1], "
                             "e.g. 0,0.25,0.5,0.75,1") from None
    return check_alphas(alphas)


# -- the two checkpoints ----------------------------------------------------------------------------------------

def _stored_shapes(run_directory: str, record: dict) -> dict[str, tuple]:
    """{parameter name: shape} of the parameters a checkpoint stores (its EMA when it keeps one)."""
    leaves = jax.tree_util.tree_leaves_with_path(stored_parameter_shapes(run_directory, record))
    return {parameter_name(path): tuple(leaf.shape) for path, leaf in leaves}


def check_same_architecture(pretrained: tuple[str, dict], finetuned: tuple[str, dict]) -> None:
    """Refuse two checkpoints ((run directory, record) each) of different architectures or parameter shapes,
    naming the first difference."""
    differences = models.architecture_differences(pretrained[1].get("model"), finetuned[1].get("model"))
    if differences:
        field, a, b = differences[0]
        raise ValueError(f"the pretrained and fine-tuned checkpoints are different architectures: model.{field} is "
                         f"{a!r} in the pretrained one and {b!r} in the fine-tuned one ({len(differences)} "
                         "difference(s)); mix a model with one fine-tuned from it")
    a, b = (_stored_shapes(*checkpoint) for checkpoint in (pretrained, finetuned))
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            shape = lambda shapes: "absent" if name not in shapes else f"of shape {shapes[name]}"
            raise ValueError(f"the pretrained and fine-tuned checkpoints differ in parameter {name}: {shape(a)} in "
                             f"the pretrained one, {shape(b)} in the fine-tuned one; mix a model with one "
                             "fine-tuned from it")


def _locate(flag: str, path: str) -> tuple[str, int, dict]:
    """(run directory, step, record) of the checkpoint `path` (`--flag`)."""
    try:
        run_directory, step = locate(None, path, None)
        record = read_record(run_directory, step)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--{flag}: {error}") from None
    return run_directory, record["step"], record


def holds_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a committed checkpoint (`checkpoints/<step>`)."""
    checkpoints = os.path.join(directory, "checkpoints")
    return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))


# -- the report -------------------------------------------------------------------------------------------------

def headline(name: str, kind: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """{"TASK/METRIC": value} of a task's headline metrics (`HEADLINE_METRICS`) that it reports."""
    flat = flatten(metrics, name)
    if kind == "compositionality":
        paths = [f"{k}/accuracy" for k, v in metrics.items() if isinstance(v, Mapping) and v.get("count")]
    else:
        paths = HEADLINE_METRICS.get(kind, ())
    found = {f"{name}/{path}": flat[f"{name}/{path}"] for path in paths if f"{name}/{path}" in flat}
    return found or flat  # a task without headline metrics shows all its numbers


def _label(alpha: float) -> str:
    return f"{alpha:g}" + {0.0: " (pretrained)", 1.0: " (fine-tuned)"}.get(alpha, "")


def format_table(alphas: Sequence[float], headlines: Sequence[Mapping[str, float]], chosen: float) -> str:
    """A Markdown table: a row per α, a column per headline metric, in percent; the chosen α marked."""
    columns = list(dict.fromkeys(key for row in headlines for key in row))
    lines = ["| α | " + " | ".join(f"{column} (%)" for column in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for alpha, row in zip(alphas, headlines):
        label = _label(alpha) + (" **chosen**" if alpha == chosen else "")
        cells = [f"{100 * row[c]:.1f}" if c in row else "-" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path: str, alphas: Sequence[float], headlines: Sequence[Mapping[str, float]], chosen: float) -> None:
    """The headline metrics against α, a panel per task with a line per metric, the chosen α marked (the
    style of `jclip.evaluate.plots`)."""
    order = np.argsort(alphas, kind="stable")
    xs = np.asarray(alphas, float)[order]
    columns = list(dict.fromkeys(key for row in headlines for key in row))
    tasks = list(dict.fromkeys(column.split("/", 1)[0] for column in columns))
    figure, panels = plots.plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 0.6, 3.8), squeeze=False)
    for task, axes in zip(tasks, panels[0]):
        for column in (c for c in columns if c.split("/", 1)[0] == task):
            ys = np.array([headlines[i].get(column, np.nan) for i in order], float)
            axes.plot(xs, 100 * ys, marker="o", linewidth=1.5, label=column.split("/", 1)[1])
        axes.axvline(chosen, color="grey", linestyle="--", linewidth=1, label=f"chosen α = {chosen:g}")
        axes.set_xlabel("α  (0: pretrained, 1: fine-tuned)")
        axes.set_ylabel("%")
        axes.set_title(task, fontsize=10)
        axes.legend(fontsize=7, loc="best")
    figure.suptitle("WiSE-FT: (1 − α) · θ_pretrained + α · θ_fine-tuned", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plots.plt.close(figure)


def _best(alphas: Sequence[float], results: Sequence[Mapping[str, Mapping]], select: str) -> tuple[float, float]:
    """(α, value) of the highest `select` metric ("TASK/METRIC"), the first listed α on ties."""
    task = select.split("/", 1)[0]
    values = [flatten(result[task], task).get(select) for result in results]
    if values[0] is None:
        known = sorted(flatten(results[0][task], task))
        raise ValueError(f"--select {select}: task {task!r} reports no such metric; it reports {', '.join(known)}")
    ranked = [v if v is not None and np.isfinite(v) else -np.inf for v in values]
    index = max(range(len(values)), key=lambda i: (ranked[i], -i))
    return alphas[index], values[index]


# -- WiSE-FT ----------------------------------------------------------------------------------------------------

def wise_ft(config: ConfigDict, pretrained: str, finetuned: str, workdir: str,
            alphas: Sequence[float] = DEFAULT_ALPHAS, tasks: Optional[Sequence[str]] = None,
            select: Optional[str] = None) -> dict:
    """Evaluate the mixtures of `pretrained` and `finetuned` for each α with `config.evaluate.tasks` (or the
    named `tasks`), save the best by `select` ("TASK/METRIC") in `workdir` and write the report there;
    returns the content of `wise_ft.json`."""
    alphas = check_alphas(alphas)
    selected = select_tasks(config.evaluate.tasks, tasks)  # a bad task name fails before anything is loaded
    names = list(selected)
    if select is not None and select.split("/", 1)[0] not in selected:
        raise ValueError(f"--select {select}: name a metric of an evaluated task as TASK/METRIC; the tasks are "
                         f"{', '.join(names)}")
    if holds_checkpoint(workdir):
        raise ValueError(f"{workdir} already holds a checkpoint; give a new --workdir for the mixture")
    sources = {"pretrained": _locate("pretrained", pretrained), "finetuned": _locate("finetuned", finetuned)}
    check_same_architecture(*((directory, record) for directory, _, record in sources.values()))

    mesh = parallel.make_mesh()
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    model, pretrained_params, record = load_model(config, sources["pretrained"][0], sources["pretrained"][1], mesh,
                                                  tokenizer)
    _, finetuned_params, _ = load_model(config, sources["finetuned"][0], sources["finetuned"][1], mesh, tokenizer,
                                        verbose=False)
    report_to_console = jax.process_index() == 0
    paths = {role: os.path.join(os.path.abspath(directory), "checkpoints", str(step))
             for role, (directory, step, _) in sources.items()}
    if report_to_console:
        print(f"WiSE-FT of {paths['pretrained']} (α = 0) and {paths['finetuned']} (α = 1)", flush=True)

    results, headlines = [], []
    for alpha in alphas:
        evaluator = make_evaluator(config, model, interpolate(pretrained_params, finetuned_params, alpha), tokenizer,
                                   mesh)
        metrics = {name: result.metrics for name, result in run_tasks(evaluator, config.evaluate.tasks, names).items()}
        results.append(metrics)
        headlines.append({k: v for name in names for k, v in headline(name, selected[name][0], metrics[name]).items()})
        if select is None:
            select = next(iter(headlines[0]))
        if len(results) == 1:
            _best(alphas[:1], results, select)  # an unknown --select metric stops after the first evaluation
        if report_to_console:
            print(f"α = {alpha:g}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in headlines[-1].items()), flush=True)

    chosen, value = _best(alphas, results, select)
    table = format_table(alphas, headlines, chosen)
    model_config = record["model"]
    checkpoint = save_parameters_only(
        interpolate(pretrained_params, finetuned_params, chosen), model_config, workdir,
        {"wise_ft": {"alpha": chosen, "pretrained": paths["pretrained"], "finetuned": paths["finetuned"],
                     "select": select, "value": value}})
    report = {
        "pretrained": paths["pretrained"], "finetuned": paths["finetuned"], "tasks": names, "select": select,
        "chosen": {"alpha": chosen, "value": value, "checkpoint": checkpoint},
        "headline": {f"{a:g}": row for a, row in zip(alphas, headlines)},
        "alphas": {f"{a:g}": metrics for a, metrics in zip(alphas, results)},
    }
    if not report_to_console:
        return report
    write_text(os.path.join(workdir, "config.json"), _run_config(config, record).to_json_best_effort(indent=2))
    write_text(os.path.join(workdir, "wise_ft.json"), json.dumps(report, indent=2))
    write_text(os.path.join(workdir, "wise_ft.md"), table + "\n")
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    figure = os.path.join(workdir, "plots", "wise_ft.png")
    plot_curves(figure, alphas, headlines, chosen)
    print(f"\n{table}\n\nChosen: α = {chosen:g} ({select} {100 * value:.1f} %), saved to {checkpoint}\n"
          f"Figure: {figure}\nWritten to {os.path.join(workdir, 'wise_ft.json')}", flush=True)
    return report


def _run_config(config: ConfigDict, record: dict) -> ConfigDict:
    """The config to save beside the mixture (what `jclip.load` reads): `config`'s data and evaluation settings,
    with the checkpoints' model (and its name where known)."""
    saved = config.to_dict()
    if models.architecture_differences(saved["model"], record["model"]):
        saved["model_name"] = record.get("model_name")
    saved["model"] = record["model"]
    return ConfigDict(saved)
