"""Classification metrics and prompt-ensembled zero-shot classifiers, on embeddings (NumPy).

Zero-shot classification as in Radford et al. 2021, section 3.1.4: every class
name is put into each template ("a photo of a {}."), the prompt embeddings are
normalised, averaged per class and normalised again (prompt ensembling), and an
image is assigned the class whose ensembled embedding is most similar.
"""

from typing import Callable, Sequence

import numpy as np


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ensemble_prompts(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[classes, templates, dim] prompt embeddings -> [classes, dim] class embeddings.

    Each prompt embedding is normalised, the templates averaged, the mean normalised again.
    """
    if prompt_embeddings.ndim != 3:
        raise ValueError(f"prompt embeddings must be [classes, templates, dim], got shape {prompt_embeddings.shape}")
    return normalize(normalize(prompt_embeddings).mean(axis=1))


def zero_shot_classifier(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                         templates: Sequence[str]) -> np.ndarray:
    """[classes, dim] ensembled class embeddings; `embed_texts(list of prompts) -> [prompts, dim]`."""
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = np.asarray(embed_texts(prompts))
    return ensemble_prompts(embeddings.reshape(len(class_names), len(templates), -1))


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among their K highest scores (ties: the lower class index first)."""
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} rows of scores but {labels.shape[0]} labels")
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {k: float(np.mean(rank < k)) for k in ks if k <= scores.shape[1]}


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """The mean over classes present in `labels` of the fraction of that class predicted correctly."""
    present = np.unique(labels)
    recalls = [np.mean(predictions[labels == c] == c) for c in present if c < num_classes]
    return float(np.mean(recalls))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes] accuracy per class (NaN for a class with no examples)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan)
