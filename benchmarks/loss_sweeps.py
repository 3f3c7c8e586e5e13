"""Three published claims about contrastive losses, measured on the built-in data with seeds and error bars.

- **DCL at small batch** (Yeh et al. 2022, arXiv 2110.06848): taking the positive out of the softmax's
  denominator helps most when the batch is small. `clip` against `dcl` at batch 16, 32, 64 and 128, both
  at a fixed temperature as in the paper (`--dcl-temperature`): without the positive in the denominator
  the loss falls without bound as the scale grows, so a learned scale runs to its clamp.
- **SigLIP at small batch** (Zhai et al. 2023, arXiv 2303.15343): the sigmoid loss is at least as good
  as the softmax one below 16k pairs, and better at small batches. `clip` against `siglip`, same sweep.
- **Temperature trades uniformity for tolerance** (Wang & Liu 2021, arXiv 2012.09740): a lower fixed
  temperature spreads the embeddings more uniformly and brings semantically close samples less close.
  `clip` with the scale fixed at 1/τ (`optimizer.frozen=("logit_scale",)`) for several τ.

Every run trains the demo recipe (`configs/shapes_tiny.py`) on the same number of examples, so a smaller
batch takes more steps; warm-up is a tenth of the steps and everything else is the recipe's. A seed sets the
initialisation and the data order, the same for every loss, so differences between losses are paired by
seed. SigLIP starts from its paper's scale 10 and bias -10 without a scale clamp. After training each run
measures zero-shot shape accuracy (all single-object test images, and the held-out shape-colour
combinations), compositionality, the embedding geometry of the test split (`jclip.losses.embedding_geometry`)
and the tolerance (the mean cosine similarity of two test images of the same shape).

Each run is a subprocess writing `<workdir>/<run>/sweep_result.json`; a second call skips finished runs
and resumes a half-finished one from its checkpoint. The tables (mean ± standard error over seeds) go to
stdout and `<workdir>/tables.md`, one figure per claim to `<workdir>/figures/`.

    python benchmarks/loss_sweeps.py                 # 54 runs, about 75 minutes on 2 CPU cores
    python benchmarks/loss_sweeps.py --claims temperature --seeds 5
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from jclip import models
from jclip.data import shapes
from loss_effects import geometry, load_config, test_embeddings

CLAIMS = ("dcl", "siglip", "temperature")
SIGLIP_INIT = dict(init_scale=10.0, init_bias=-10.0, max_scale=None)  # Zhai et al. 2023, Sec. 3.2


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: a loss at a batch size (and, for the temperature sweep, a fixed τ)."""

    loss: str
    batch: int
    seed: int
    temperature: float | None = None  # None: learned scale

    @property
    def name(self) -> str:
        if self.temperature is None:
            return f"{self.loss}_batch{self.batch}_seed{self.seed}"
        return f"{self.loss}_tau{self.temperature:g}_batch{self.batch}_seed{self.seed}"


def compared_temperature(loss: str, args) -> float | None:
    """The fixed temperature of the batch sweep of `loss` and its clip baseline; None: learned."""
    return args.dcl_temperature if loss == "dcl" else None


def planned_runs(args) -> list[Run]:
    """The runs the chosen claims need, seed by seed (so a half-done sweep has every cell at a few seeds)."""
    runs = []
    for seed in range(args.seeds):
        for loss in ("dcl", "siglip"):
            if loss in args.claims:
                t = compared_temperature(loss, args)
                runs += [Run(name, batch, seed, t) for batch in args.batches for name in ("clip", loss)]
        if "temperature" in args.claims:
            runs += [Run("clip", args.temperature_batch, seed, t) for t in args.temperatures]
            runs.append(Run("clip", args.temperature_batch, seed))  # the learned scale, for reference
    return list(dict.fromkeys(runs))


def configure(run: Run, args):
    steps = max(1, args.examples // run.batch)
    config = load_config(steps, args.shapes_config)
    if args.model != config.model_name:
        config.model_name, config.model = args.model, ConfigDict(models.model_config(args.model))
    config.seed = run.seed
    config.batch_size = run.batch
    config.optimizer.warmup_steps = max(1, steps // 10)
    config.checkpoint_every = max(1, steps // 2)
    config.losses = ConfigDict({run.loss: dict(weight=1.0)})
    if run.loss == "siglip":
        config.model.update(SIGLIP_INIT)
    if run.temperature is not None:
        config.model.init_scale = 1 / run.temperature
        config.optimizer.frozen = ("logit_scale",)
    return config


def tolerance(zimg: np.ndarray, data: dict) -> float:
    """Mean cosine similarity of two different single-object test images of the same shape (Wang & Liu 2021)."""
    single = data["shape2"] == len(shapes.SHAPES)  # the "none" second object
    pairs, total = 0, 0.0
    for shape in np.unique(data["shape"][single]):
        z = np.asarray(zimg, np.float64)[single & (data["shape"] == shape)]
        n = len(z)
        total += float(np.sum(z.sum(0) ** 2) - np.sum(z * z))  # Σ_{i≠j} z_i · z_j
        pairs += n * (n - 1)
    return total / pairs


def train_and_measure(run: Run, args) -> None:
    """The subprocess's work: train one run (resuming), measure it, write its sweep_result.json."""
    from jclip.host_memory import prepare_host
    from jclip.train.loop import evaluation_params, train

    prepare_host()
    config = configure(run, args)
    workdir = os.path.join(args.workdir, run.name)
    state = train(config, workdir)
    params = evaluation_params(state)
    with open(os.path.join(workdir, "results.json")) as f:
        tasks = json.load(f)["tasks"]
    zimg, ztxt, data = test_embeddings(config, models.model_class(config.model)(**config.model), params)
    shape = tasks["shapes"]["zero_shot"]["shape"]
    result = {
        "shape_accuracy": shape["all"],
        "shape_accuracy_held_out": shape["held_out"],
        **{f"compositionality_{kind}": v["accuracy"] for kind, v in tasks["compositionality"].items()
           if isinstance(v, dict) and v.get("count")},
        **geometry(zimg, ztxt),
        "tolerance": tolerance(zimg, data),
        "scale": float(np.exp(np.asarray(params["logit_scale"]))),
    }
    temporary = os.path.join(workdir, "sweep_result.json.tmp")
    with open(temporary, "w") as f:
        json.dump({"run": dataclasses.asdict(run), "setting": setting(args), "result": result}, f, indent=1)
    os.replace(temporary, os.path.join(workdir, "sweep_result.json"))


def setting(args) -> dict:
    """What every run of a sweep shares besides its `Run` fields; a workdir holds runs of one setting."""
    return {"examples": args.examples, "shapes_config": args.shapes_config, "model": args.model}


def result_path(run: Run, args) -> str:
    return os.path.join(args.workdir, run.name, "sweep_result.json")


def run_all(runs: list[Run], args) -> None:
    """Each unfinished run in a subprocess, `args.parallel` at a time, under a progress bar over runs."""
    todo = [run for run in runs if not os.path.exists(result_path(run, args))]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", desc="sweep", dynamic_ncols=True)
    running: dict[subprocess.Popen, tuple[Run, str]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < args.parallel:
            run = todo.pop(0)
            os.makedirs(os.path.join(args.workdir, run.name), exist_ok=True)
            log = os.path.join(args.workdir, run.name, "log.txt")
            command = [sys.executable, os.path.abspath(__file__), "--one-run", json.dumps(dataclasses.asdict(run)),
                       *forwarded_arguments(args)]
            with open(log, "a") as out:
                running[subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)] = (run, log)
            bar.set_postfix_str(", ".join(r.name for r, _ in running.values()))
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            run, log = running.pop(process)
            if process.returncode != 0 or not os.path.exists(result_path(run, args)):
                failed.append((run, log))
                tail = open(log, errors="replace").read().splitlines()[-15:]
                bar.write(f"run {run.name} failed (exit {process.returncode}); the end of {log}:\n  "
                          + "\n  ".join(tail))
            bar.update(1)
    bar.close()
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: {', '.join(r.name for r, _ in failed)}; their logs are "
                 "named above. Fix the cause and run the same command again: finished runs are kept.")


def forwarded_arguments(args) -> list[str]:
    return ["--examples", str(args.examples), "--shapes-config", args.shapes_config, "--model", args.model,
            "--workdir", args.workdir]


def mean_and_error(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (nan for one value) and count."""
    values = np.asarray(values, float)
    error = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), float(error), len(values)


def cell(values: list[float], percent: bool = False, digits: int = 3) -> str:
    if not values:
        return "-"
    mean, error, n = mean_and_error(values)
    scale, digits = (100, 1) if percent else (1, digits)
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * error:.{digits}f}" if n > 1 else " (1 seed)")


def collect(runs: list[Run], args) -> dict[Run, dict]:
    """The finished runs' results; an error if one was trained with another setting (another --examples)."""
    results = {}
    for run in runs:
        if os.path.exists(result_path(run, args)):
            with open(result_path(run, args)) as f:
                saved = json.load(f)
            if saved["setting"] != setting(args):
                sys.exit(f"error: {result_path(run, args)} was trained with {saved['setting']}, not "
                         f"{setting(args)}: use another --workdir for another setting")
            results[run] = saved["result"]
    return results


def seeds_of(results, metric, **match) -> dict[int, float]:
    """{seed: value of metric} of the runs whose fields equal `match`."""
    return {run.seed: r[metric] for run, r in results.items()
            if all(getattr(run, k) == v for k, v in match.items())}


def paired_difference(results, metric, loss, batch, temperature) -> list[float]:
    """loss − clip of each seed that has both runs at this batch (the same initialisation and data order)."""
    ours = seeds_of(results, metric, loss=loss, batch=batch, temperature=temperature)
    clip = seeds_of(results, metric, loss="clip", batch=batch, temperature=temperature)
    return [ours[s] - clip[s] for s in sorted(ours) if s in clip]


def batch_table(results, loss: str, args) -> str:
    metrics = (("shape_accuracy", "shape accuracy, all"), ("shape_accuracy_held_out", "held-out combinations"),
               ("compositionality_swap_attributes", "swapped attributes"))
    header = "| batch (steps) | " + " | ".join(f"{label}: clip / {loss} / difference" for _, label in metrics) + " |"
    lines = [header, "|---|" + "---|" * len(metrics)]
    for batch in args.batches:
        cells = []
        for metric, _ in metrics:
            t = compared_temperature(loss, args)
            clip = list(seeds_of(results, metric, loss="clip", batch=batch, temperature=t).values())
            ours = list(seeds_of(results, metric, loss=loss, batch=batch, temperature=t).values())
            difference = paired_difference(results, metric, loss, batch, t)
            cells.append(f"{cell(clip, True)} / {cell(ours, True)} / **{signed(cell(difference, True))}**")
        lines.append(f"| {batch} ({args.examples // batch}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signed(text: str) -> str:
    return text if text.startswith("-") else "+" + text


TEMPERATURE_METRICS = (("uniformity_image", "uniformity (image)", False),
                       ("tolerance", "tolerance", False),
                       ("alignment", "alignment", False),
                       ("modality_gap", "modality gap", False),
                       ("shape_accuracy", "shape accuracy, all", True),
                       ("shape_accuracy_held_out", "held-out combinations", True))


def temperature_table(results, args) -> str:
    lines = ["| τ (scale) | " + " | ".join(label for _, label, _ in TEMPERATURE_METRICS) + " |",
             "|---|" + "---:|" * len(TEMPERATURE_METRICS)]
    rows = [(t, f"{t:g} ({1 / t:.3g})") for t in sorted(args.temperatures)]
    learned = seeds_of(results, "scale", loss="clip", batch=args.temperature_batch, temperature=None)
    rows.append((None, "learned (ends at " + cell(list(learned.values()), digits=1) + ")"))
    for temperature, label in rows:
        cells = [cell(list(seeds_of(results, metric, loss="clip", batch=args.temperature_batch,
                                    temperature=temperature).values()), percent)
                 for metric, _, percent in TEMPERATURE_METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def batch_figure(results, loss: str, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("shape_accuracy", "zero-shot shape accuracy (%)"),
              ("shape_accuracy_held_out", "held-out combinations (%)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(9, 3.4))
    for ax, (metric, label) in zip(axes, panels):
        for name, colour in (("clip", "#4878a8"), (loss, "#d1603d")):
            points = [(b, mean_and_error(v)) for b in args.batches
                      if (v := list(seeds_of(results, metric, loss=name, batch=b,
                                             temperature=compared_temperature(loss, args)).values()))]
            if points:
                x = [b for b, _ in points]
                ax.errorbar(x, [100 * m for _, (m, _, _) in points],
                            yerr=[100 * np.nan_to_num(e) for _, (_, e, _) in points],
                            label=name, color=colour, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.batches, [str(b) for b in args.batches])
        ax.set_xlabel(f"batch size ({args.examples:,} examples seen)")
        ax.set_ylabel(label)
        ax.legend()
    t = compared_temperature(loss, args)
    scale = "learned scale" if t is None else f"fixed τ = {t:g}"
    figure.suptitle(f"{loss} against clip ({scale}): mean ± standard error over seeds", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def temperature_figure(results, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(13, 3.3))
    panels = (("uniformity_image", "uniformity (image; lower: more uniform)", 1),
              ("tolerance", "tolerance (same-shape similarity)", 1),
              ("modality_gap", "modality gap", 1),
              ("shape_accuracy_held_out", "held-out combinations (%)", 100))
    temperatures = sorted(args.temperatures)
    for ax, (metric, label, scale) in zip(axes, panels):
        points = [(t, mean_and_error(v)) for t in temperatures
                  if (v := list(seeds_of(results, metric, loss="clip", batch=args.temperature_batch,
                                         temperature=t).values()))]
        if points:
            ax.errorbar([t for t, _ in points], [scale * m for _, (m, _, _) in points],
                        yerr=[scale * np.nan_to_num(e) for _, (_, e, _) in points],
                        color="#4878a8", marker="o", capsize=3, label="fixed τ")
        learned = list(seeds_of(results, metric, loss="clip", batch=args.temperature_batch,
                                temperature=None).values())
        if learned:
            ax.axhline(scale * np.mean(learned), color="grey", linestyle="--", linewidth=1, label="learned τ")
        ax.set_xscale("log")
        ax.set_xlabel("temperature τ")
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=8)
    figure.suptitle("clip with a fixed temperature: mean ± standard error over seeds", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(runs: list[Run], args) -> str:
    results = collect(runs, args)
    figures = os.path.join(args.workdir, "figures")
    os.makedirs(figures, exist_ok=True)
    seeds = f"{args.seeds} seed(s), {args.examples:,} examples seen per run, shapes/{args.shapes_config}"
    parts = []
    for loss in ("dcl", "siglip"):
        if loss in args.claims:
            batch_figure(results, loss, args, os.path.join(figures, f"{loss}.png"))
            t = compared_temperature(loss, args)
            scale = "learned scale" if t is None else f"both at a fixed τ = {t:g}"
            parts.append(f"### {loss} against clip by batch size ({scale}; {seeds})\n\n"
                         f"{batch_table(results, loss, args)}")
    if "temperature" in args.claims:
        temperature_figure(results, args, os.path.join(figures, "temperature.png"))
        parts.append(f"### clip at a fixed temperature, batch {args.temperature_batch} ({seeds})\n\n"
                     f"{temperature_table(results, args)}")
    text = "\n\n".join(parts) + "\n"
    with open(os.path.join(args.workdir, "tables.md"), "w") as f:
        f.write(text)
    return text + f"\nFigures in {figures}/; tables in {os.path.join(args.workdir, 'tables.md')}."


def integers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--claims", default=",".join(CLAIMS), help=f"some of {','.join(CLAIMS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=25_600, help="examples each run sees (steps × batch)")
    parser.add_argument("--batches", type=integers, default=[16, 32, 64, 128])
    parser.add_argument("--temperatures", type=floats, default=[0.01, 0.05, 0.25])
    parser.add_argument("--temperature-batch", type=int, default=128)
    parser.add_argument("--dcl-temperature", type=float, default=0.05,
                        help="the fixed τ of dcl and its clip baseline (with a learned one dcl's scale runs away)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (small batches use one core)")
    parser.add_argument("--shapes-config", default="default", help="the shapes dataset (tiny: a quick check)")
    parser.add_argument("--model", default="shapes-tiny", help="the model (the demo's; test-micro: a quick check)")
    parser.add_argument("--workdir", default="runs/loss_sweeps")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # a subprocess's single run, as JSON
    args = parser.parse_args()
    if args.one_run:
        return train_and_measure(Run(**json.loads(args.one_run)), args)
    args.claims = args.claims.split(",")
    unknown = sorted(set(args.claims) - set(CLAIMS))
    if unknown:
        parser.error(f"unknown claim(s) {unknown}; choose from {','.join(CLAIMS)}")
    too_small = [b for b in args.batches + [args.temperature_batch] if args.examples < b]
    if too_small:
        parser.error(f"--examples {args.examples} is less than one batch of {max(too_small)}")
    runs = planned_runs(args)
    collect(runs, args)  # refuses a workdir of another setting before anything runs
    print(f"{len(runs)} runs in {args.workdir}: {len(runs) - sum(os.path.exists(result_path(r, args)) for r in runs)}"
          " to do")
    run_all(runs, args)
    print(report(runs, args))


if __name__ == "__main__":
    main()
