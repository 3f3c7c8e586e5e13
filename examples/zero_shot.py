"""Zero-shot classification with `jclip.load`, on a run trained on the built-in dataset (`make demo`).

    python examples/zero_shot.py runs/shapes_tiny                  # the shapes test split
    python examples/zero_shot.py runs/shapes_tiny --images DIR     # and your own images, any size

Loads the run's model in one line and classifies the single-object test images by shape two ways: a
prompt-ensembled zero-shot classifier (`zero_shot_classifier`, as for any dataset), and the shapes
suite's own method (a softmax over the 70 prompts "a small red circle", summed per shape), whose
accuracy is the one the run's evaluation reported. Prints a few predictions, and the accuracies as a
JSON line at the end.
"""

import argparse
import json
import os

import numpy as np
import tensorflow_datasets as tfds

import jclip
from jclip.data import shapes
from jclip.evaluate.zero_shot import classify_by_prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (its latest checkpoint) or RUN/checkpoints/STEP")
    parser.add_argument("--images", help="a folder of your own images to classify by shape")
    args = parser.parse_args()

    model = jclip.load(args.run)
    config = model.config
    builder = shapes.prepare(config.evaluate.get("shapes_config", "default"), config.data.data_dir)
    test = [example for example in tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False))
            if example["num_objects"] == 1]
    images = np.stack([example["image"] for example in test])
    labels = np.array([example["shape"] for example in test])

    classifier = model.zero_shot_classifier(
        shapes.SHAPES, [f"a {size} {colour} {{}}" for size in shapes.SIZES for colour in shapes.COLOURS])
    embeddings = model.encode_images(images)
    ensembled = (embeddings @ classifier.weights.T).argmax(axis=1)
    prompts = shapes.attribute_prompts()
    by_prompts = classify_by_prompts(embeddings, model.encode_texts([p["prompt"] for p in prompts]),
                                     np.array([p["shape"] for p in prompts]), len(shapes.SHAPES), model.scale)

    print(f"{len(images)} single-object test images of shapes/{builder.builder_config.name}, model {model.name}")
    print("| method | shape accuracy (%) |\n|---|---:|")
    print(f"| prompt-ensembled classifier | {100 * np.mean(ensembled == labels):.1f} |")
    print(f"| the shapes suite's prompts | {100 * np.mean(by_prompts == labels):.1f} |")

    predictions = model.classify(images[:5], classifier, top_k=2)
    for label, names, probabilities in zip(labels, predictions.labels, predictions.probabilities):
        guesses = ", ".join(f"{name} {p:.2f}" for name, p in zip(names, probabilities))
        print(f"a {shapes.SHAPES[label]}: {guesses}")

    if args.images:
        files = sorted(os.path.join(args.images, name) for name in os.listdir(args.images))
        for path, names in zip(files, model.classify(files, classifier, top_k=1).labels):
            print(f"{path}: {names[0]}")

    print(json.dumps({"images": len(images), "ensembled_accuracy": float(np.mean(ensembled == labels)),
                      "suite_accuracy": float(np.mean(by_prompts == labels))}))


if __name__ == "__main__":
    main()
