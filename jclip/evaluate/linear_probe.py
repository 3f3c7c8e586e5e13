"""Linear probes and few-shot classification on frozen image embeddings, in closed form.

As big_vision's few-shot evaluator does: regularised least squares from the
embeddings to ±1 one-hot targets, `W = (XᵀX + λI)⁻¹ XᵀY` on centred features
with a bias, solved exactly (no SGD, no learning rate to tune), for a few
regularisation strengths λ. With `shots` set, the training examples are `shots`
per class drawn with a seed; otherwise all of them.
"""

from typing import Optional, Sequence

import numpy as np

DEFAULT_L2 = (2.0**-10, 2.0**-4, 1.0, 2.0**4, 2.0**10)


def fit_least_squares(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float):
    """(weights [dim, classes], bias [classes], mean [dim]) of the ridge regression onto ±1 targets."""
    x = features.astype(np.float64)
    mean = x.mean(axis=0)
    x = x - mean
    targets = 2.0 * np.eye(num_classes)[labels] - 1.0
    bias = targets.mean(axis=0)
    weights = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ (targets - bias))
    return weights, bias, mean


def predict(model, features: np.ndarray) -> np.ndarray:
    weights, bias, mean = model
    return np.argmax((features.astype(np.float64) - mean) @ weights + bias, axis=1)


def sample_shots(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Indices of `shots` examples of each class (all of a class that has fewer), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray, num_classes: int, shots: Optional[int] = None,
                   l2_values: Sequence[float] = DEFAULT_L2, seed: int = 0) -> dict[str, float]:
    """Test accuracy of the probe for every λ, and the best: `{"l2=<λ>": acc, ..., "best": acc}`.

    Reporting the best λ on the test split is big_vision's few-shot protocol; it
    measures how linearly separable the embeddings are, not a tuned classifier.
    """
    if shots is not None:
        index = sample_shots(train_labels, shots, seed)
        train_features, train_labels = train_features[index], train_labels[index]
    results = {}
    for l2 in l2_values:
        model = fit_least_squares(train_features, train_labels, num_classes, l2)
        results[f"l2={l2:g}"] = float(np.mean(predict(model, test_features) == test_labels))
    results["best"] = max(results.values())
    return results
