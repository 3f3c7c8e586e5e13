"""The evaluation suite of the built-in `shapes` dataset.

Zero-shot classification of shape and colour on the single-object test
images, from the 70 composed prompts "a {size} {colour} {shape}", reported on
all images and separately on the colour–shape combinations never seen in
training (compositional generalisation); and image→text / text→image
Recall@1/5 over all test images, where every image is relevant to the
captions that describe it word for word.
"""

import json
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from jclip.data import pipeline, shapes
from jclip.data.tokenizer import Tokenizer
from jclip.evaluate.embed import embed_all
from jclip.evaluate.retrieval import recall_at_k
from jclip.evaluate.zero_shot import classify_by_prompts


def evaluate_shapes(model, params, builder, tokenizer: Tokenizer, config: ConfigDict, mesh) -> dict:
    """All metrics of the suite as a nested dict of floats (fractions, not percentages)."""
    data = pipeline.load_split(builder, config.evaluate.split, config.evaluate.preprocess)
    batch_size = config.evaluate.batch_size
    encode_image = lambda p, x: model.apply({"params": p}, x, method=model.encode_image)
    encode_text = lambda p, t: model.apply({"params": p}, t, method=model.encode_text)
    images = embed_all(encode_image, params, data["image"], batch_size, mesh)
    scale = float(jax.device_get(jax.numpy.exp(params["logit_scale"])))

    prompts = shapes.attribute_prompts()
    prompt_embeddings = embed_all(
        encode_text, params, tokenizer([p["prompt"] for p in prompts], config.data.text_length), batch_size, mesh
    )
    single = data["num_objects"] == 1
    subsets = {"all": single, "seen": single & ~data["held_out"], "held_out": single & data["held_out"]}
    zero_shot = {}
    for attribute, names in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS)):
        labels = np.array([p[attribute] for p in prompts])
        predicted = classify_by_prompts(images, prompt_embeddings, labels, len(names), scale)
        correct = predicted == data[attribute]
        zero_shot[attribute] = {name: float(correct[mask].mean()) for name, mask in subsets.items() if mask.any()}

    captions, caption_index = np.unique(data["caption"], return_inverse=True)
    caption_embeddings = embed_all(
        encode_text, params, tokenizer(list(captions), config.data.text_length), batch_size, mesh
    )
    relevant = caption_index[:, None] == np.arange(len(captions))[None, :]
    similarity = images @ caption_embeddings.T
    retrieval = {
        "image_to_text": recall_at_k(similarity, relevant),
        "text_to_image": recall_at_k(similarity.T, relevant.T),
    }
    return {
        "split": config.evaluate.split,
        "num_images": int(len(images)),
        "num_single_object_images": {name: int(mask.sum()) for name, mask in subsets.items()},
        "num_captions": int(len(captions)),
        "zero_shot": zero_shot,
        "retrieval": {d: {f"R@{k}": v for k, v in r.items()} for d, r in retrieval.items()},
    }


def flatten(results: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of `results` as {"prefix/zero_shot/shape/all": value, ...}."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}/{key}"))
        elif isinstance(value, float):
            flat[f"{prefix}/{key}"] = value
    return flat


def format_table(results: dict) -> str:
    """The results as a Markdown table of percentages."""
    rows = ["| metric | all | seen combinations | held-out combinations |", "|---|---:|---:|---:|"]
    for attribute, values in results["zero_shot"].items():
        cells = [f"{100 * values[k]:.1f}" if k in values else "-" for k in ("all", "seen", "held_out")]
        rows.append(f"| zero-shot {attribute} accuracy (%) | " + " | ".join(cells) + " |")
    for direction, values in results["retrieval"].items():
        for name, value in values.items():
            rows.append(f"| {direction.replace('_', ' ')} {name} (%) | {100 * value:.1f} | | |")
    return "\n".join(rows)


def evaluate_and_report(model, params, builder, tokenizer: Tokenizer, config: ConfigDict, workdir: str,
                        mesh, step: int) -> dict:
    """Evaluate, write `<workdir>/results.json` and print the table."""
    results = {"step": step, **evaluate_shapes(model, params, builder, tokenizer, config, mesh)}
    if jax.process_index() == 0:
        path = os.path.join(workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        print(f"\nZero-shot results on the {results['split']} split of shapes/{config.evaluate.dataset} "
              f"(step {step}; {results['num_images']} images):\n{format_table(results)}\nWritten to {path}")
    return results
