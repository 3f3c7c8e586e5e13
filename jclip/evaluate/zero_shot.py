"""Zero-shot classification from text prompts."""

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=axis, keepdims=True)


def classify_by_prompts(
    image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, prompt_labels: np.ndarray,
    num_classes: int, scale: float,
) -> np.ndarray:
    """Predicted class per image: softmax over all prompts, probabilities summed per class.

    Each prompt describes one combination of attributes ("a small red circle")
    and `prompt_labels[p]` is the class of the attribute being predicted. Summing
    the probability mass per class marginalises out the other attributes; it
    keeps the fine-grained signal that averaging prompt embeddings would wash out.
    """
    probabilities = softmax(scale * image_embeddings @ prompt_embeddings.T)
    per_class = np.zeros((len(image_embeddings), num_classes))
    np.add.at(per_class.T, prompt_labels, probabilities.T)
    return per_class.argmax(axis=1)
