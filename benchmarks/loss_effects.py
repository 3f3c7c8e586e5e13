"""Do the research losses do what their papers say? Trains the demo model with each objective and compares.

Three runs of `configs/shapes_tiny.py`, the same seed, data order and steps, differing only in
the objective:

- `clip`: plain CLIP (the baseline);
- `contrastive_gap`: CLIP plus the alignment and uniformity regularisers of Fahim et al. 2024,
  whose published effect is a smaller modality gap (image and text embeddings closer together)
  at similar zero-shot accuracy;
- `negclip`: CLIP with NegCLIP's hard-negative captions (Yuksekgonul et al. 2023: attributes
  swapped between the objects of a caption), whose published effect is better compositional
  (attribute-binding) accuracy at similar zero-shot accuracy.

For each it prints the embedding geometry of the test split (modality gap, alignment,
uniformity; `jclip.losses.embedding_geometry` over every test image and its caption), zero-shot
shape and colour accuracy, and the compositionality test (the true caption preferred over
perturbed ones). Runs are kept in `--workdir`: a second call reuses finished runs.

    python benchmarks/loss_effects.py                      # ~20 min on 2 CPU cores
    python benchmarks/loss_effects.py --steps 300 --runs clip,negclip
"""

import argparse
import json
import os
import pathlib

import jax.numpy as jnp
from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.cli import load_config_file
from jclip.data import pipeline, shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import make_evaluator
from jclip.losses import embedding_geometry
from jclip.train.loop import evaluation_params, train

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py"


def clip(config):
    config.losses = ConfigDict({"clip": dict(weight=1.0)})


def contrastive_gap(config):
    config.losses = ConfigDict({"contrastive_gap": dict(weight=1.0)})


def negclip(config):
    config.losses = ConfigDict({"negclip": dict(weight=1.0)})
    config.data.negative_kinds = ("swap_attributes",)
    config.data.negative_attributes = (shapes.COLOURS, shapes.SIZES, shapes.SHAPES)


OBJECTIVES = {"clip": clip, "contrastive_gap": contrastive_gap, "negclip": negclip}


def load_config(steps: int, shapes_config: str):
    config = load_config_file(CONFIG)
    config.total_steps = steps
    config.data.sources.shapes.config = shapes_config
    config.data.tokenizer = f"shapes/{shapes_config}"
    config.evaluate.shapes_config = shapes_config
    config.evaluate.tasks = ConfigDict({k: config.evaluate.tasks[k].to_dict() for k in ("shapes", "compositionality")})
    config.log_every = max(1, steps // 10)
    return config


def test_embeddings(config, model, params):
    """Every test image and its caption embedded by the trained model: (zimg, ztxt, the test split's arrays)."""
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    evaluator = make_evaluator(config, model, params, tokenizer, parallel.make_mesh())
    data = pipeline.load_split(shapes.prepare(config.evaluate.shapes_config, config.data.data_dir), "test",
                               evaluator.preprocess)
    return evaluator.embed_array(data["image"]), evaluator.embed_texts(list(data["caption"])), data


def geometry(zimg, ztxt) -> dict:
    """`embedding_geometry` of paired embeddings, as floats."""
    return {k: float(v) for k, v in embedding_geometry(jnp.asarray(zimg), jnp.asarray(ztxt)).items()}


def run(name: str, set_objective, args) -> dict:
    config = load_config(args.steps, args.shapes_config)
    set_objective(config)
    workdir = os.path.join(args.workdir, name)
    state = train(config, workdir)
    model = models.model_class(config.model)(**config.model)
    with open(os.path.join(workdir, "results.json")) as f:
        tasks = json.load(f)["tasks"]
    zero_shot = tasks["shapes"]["zero_shot"]
    return {
        **geometry(*test_embeddings(config, model, evaluation_params(state))[:2]),
        "zero_shot_shape": zero_shot["shape"]["all"],
        "zero_shot_colour": zero_shot["colour"]["all"],
        **{f"compositionality_{kind}": v["accuracy"] for kind, v in tasks["compositionality"].items()
           if isinstance(v, dict) and v.get("count")},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", default="clip,contrastive_gap,negclip")
    parser.add_argument("--shapes-config", default="default", help="the shapes dataset (tiny: a quick check)")
    parser.add_argument("--workdir", default="runs/loss_effects")
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(OBJECTIVES)}")
    results = {name: run(name, OBJECTIVES[name], args) for name in names}
    metrics = list(dict.fromkeys(k for r in results.values() for k in r))
    baseline = results.get("clip")
    print(f"\nTest-split geometry and accuracy after {args.steps} steps (shapes/{args.shapes_config}):\n")
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for metric in metrics:
        cells = []
        for name in names:
            value = results[name].get(metric)
            cell = "-" if value is None else f"{value:.4f}"
            if baseline is not None and name != "clip" and value is not None and metric in baseline:
                cell += f" ({value - baseline[metric]:+.4f})"
            cells.append(cell)
        print(f"| {metric} | " + " | ".join(cells) + " |")
    print("\nIn parentheses: the difference from plain CLIP. Lower alignment, uniformity and modality gap "
          "mean closer pairs, more spread and a smaller gap.")


if __name__ == "__main__":
    main()
