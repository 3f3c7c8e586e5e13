"""The evaluation suite of the built-in `shapes` dataset.

Zero-shot classification of shape and colour on the single-object test
images, from the 70 composed prompts "a {size} {colour} {shape}", reported on
all images and separately on the colour–shape combinations never seen in
training (compositional generalisation); and image→text / text→image
Recall@1/5 over all test images, where every image is relevant to the
captions that describe it word for word.
"""

import numpy as np

from jclip.data import pipeline, shapes
from jclip.evaluate.retrieval import recall_at_k
from jclip.evaluate.zero_shot import classify_by_prompts


def evaluate_shapes(evaluator, builder, split: str, preprocess: str) -> dict:
    """All metrics of the suite as a nested dict of floats (fractions, not percentages).

    `evaluator` is a `jclip.evaluate.tasks.Evaluator`; `builder` the shapes dataset.
    """
    data = pipeline.load_split(builder, split, preprocess)
    images = evaluator.embed_array(data["image"])
    prompts = shapes.attribute_prompts()
    prompt_embeddings = evaluator.embed_texts([p["prompt"] for p in prompts])
    single = data["num_objects"] == 1
    subsets = {"all": single, "seen": single & ~data["held_out"], "held_out": single & data["held_out"]}
    zero_shot = {}
    for attribute, names in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS)):
        labels = np.array([p[attribute] for p in prompts])
        predicted = classify_by_prompts(images, prompt_embeddings, labels, len(names), evaluator.scale)
        correct = predicted == data[attribute]
        zero_shot[attribute] = {name: float(correct[mask].mean()) for name, mask in subsets.items() if mask.any()}

    captions, caption_index = np.unique(data["caption"], return_inverse=True)
    caption_embeddings = evaluator.embed_texts(list(captions))
    relevant = caption_index[:, None] == np.arange(len(captions))[None, :]
    similarity = images @ caption_embeddings.T
    retrieval = {
        "image_to_text": recall_at_k(similarity, relevant),
        "text_to_image": recall_at_k(similarity.T, relevant.T),
    }
    return {
        "split": split,
        "num_images": int(len(images)),
        "num_single_object_images": {name: int(mask.sum()) for name, mask in subsets.items()},
        "num_captions": int(len(captions)),
        "zero_shot": zero_shot,
        "retrieval": {d: {f"R@{k}": v for k, v in r.items()} for d, r in retrieval.items()},
    }


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
