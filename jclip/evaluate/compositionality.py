"""Compositionality, ARO-style (Yuksekgonul et al. 2023, "When and why vision-language models behave
like bags-of-words"): does the image prefer its true caption over the same words perturbed?

For each image and each perturbation kind of `jclip.data.negatives` (swapped attributes: the
binding test; swapped words and shuffled trigrams: the order tests), the image scores its true
caption and the perturbed one; accuracy is the fraction of images where the true caption wins.
A bag-of-words model scores 50 % or less; captions a perturbation cannot change are left out.
"""

from typing import Callable, Sequence

import numpy as np

from jclip.data.negatives import KINDS, perturb


def perturbed_captions(captions: Sequence[str], kind: str, attributes: Sequence[Sequence[str]] = (),
                       seed: int = 0) -> list[str]:
    """One perturbation of `kind` per caption, drawn with (seed, index); a caption `kind` cannot change stays."""
    return [perturb(caption, kind, seed=seed, index=index, attributes=attributes)
            for index, caption in enumerate(captions)]


def true_caption_preferred(image_embeddings: np.ndarray, true_embeddings: np.ndarray,
                           perturbed_embeddings: np.ndarray) -> np.ndarray:
    """[N] booleans: image i is more similar to its true caption than to the perturbed one."""
    return np.sum(image_embeddings * true_embeddings, 1) > np.sum(image_embeddings * perturbed_embeddings, 1)


def compositionality(image_embeddings: np.ndarray, captions: Sequence[str],
                     embed_texts: Callable[[list[str]], np.ndarray], attributes: Sequence[Sequence[str]] = (),
                     kinds: Sequence[str] = KINDS, seed: int = 0) -> dict[str, dict[str, float]]:
    """`{kind: {"accuracy": ..., "count": ...}}` over the captions that `kind` changes."""
    true_embeddings = np.asarray(embed_texts(list(captions)))
    results = {}
    for kind in kinds:
        perturbed = perturbed_captions(captions, kind, attributes, seed)
        changed = np.array([p != c for p, c in zip(perturbed, captions)])
        if not changed.any():
            results[kind] = {"accuracy": float("nan"), "count": 0}
            continue
        index = np.flatnonzero(changed)
        wins = true_caption_preferred(image_embeddings[index], true_embeddings[index],
                                      np.asarray(embed_texts([perturbed[i] for i in index])))
        results[kind] = {"accuracy": float(wins.mean()), "count": int(len(index))}
    return results
