"""Retrieval metrics: Recall@K with any number of relevant items per query."""

from typing import Sequence

import numpy as np


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant item among their top-K scored items.

    `similarity` and `relevant` are [queries, items]; `relevant` is boolean and
    may mark several items per row (several captions per image, or identical
    captions). Ties are broken in favour of the lower item index.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.inf)
    return {k: float(np.mean(first_hit < k)) for k in ks}
