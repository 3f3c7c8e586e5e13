"""Retrieval metrics: Recall@K with any number of relevant items per query.

`recall_at_k` ranks a dense [queries, items] similarity matrix: simple, but its memory is quadratic
(100,000 images × 500,000 captions would be 200 GB). `tiled_recall_at_k` and `retrieval_recalls` give
the same numbers, ties included, from the embeddings: they score tiles of queries × items and keep a
running top-K per query, so their memory is linear in the number of queries and items.
"""

from typing import Iterator, Sequence

import numpy as np

QUERY_TILE = 512
ITEM_TILE = 2048


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


def _windows(total: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(start, fresh, stop) of equal windows of at most `size` rows that cover range(total).

    The last window may start early to keep the common size, repeating a few rows of the one before;
    `fresh` is its first new row. Products of windows all have one shape, hence one BLAS code path:
    OpenBLAS computes a single row (GEMV) or a small product (its small-matrix kernels) with another
    order of float32 additions than a large one, so an edge tile could differ from the dense matrix in
    a last bit.
    """
    if total == 0:
        return
    count = -(-total // max(1, size))
    size = -(-total // count)
    for fresh in range(0, total, size):
        stop = min(fresh + size, total)
        yield stop - size, fresh, stop


def _update(top_scores, top_indices, scores, first_index):
    """Merge `scores` [rows, columns], column j being item `first_index + j`, into the rows' running top-k
    (in place): the best k by score descending, then index ascending. The top-k's items have lower indices.

    A row takes the items scoring above its k-th score so far (an equal score loses: its index is higher),
    and when more than k do, only those at or above the k-th best of them (keeping all tied at it).
    """
    k = top_scores.shape[1]
    rows = np.flatnonzero(scores.max(axis=1) > top_scores[:, -1])
    if not rows.size:
        return
    scores = scores[rows]
    above = scores > top_scores[rows, -1:]
    crowded = np.flatnonzero(np.count_nonzero(above, axis=1) > k)
    if crowded.size:
        kth = np.partition(scores[crowded], -k, axis=1)[:, -k]
        above[crowded] &= scores[crowded] >= kth[:, None]
    candidate_rows, columns = np.nonzero(above)
    # Each row's top-k, then its new items, both in index order among equal scores: a stable sort by
    # (row, score descending) keeps that order.
    all_rows = np.concatenate([np.repeat(np.arange(len(rows)), k), candidate_rows])
    all_scores = np.concatenate([top_scores[rows].ravel(), scores[candidate_rows, columns]])
    all_indices = np.concatenate([top_indices[rows].ravel(), first_index + columns])
    order = np.lexsort((-all_scores, all_rows))
    candidates = k + np.bincount(candidate_rows, minlength=len(rows))
    row_starts = np.cumsum(candidates) - candidates
    keep = order[(row_starts[:, None] + np.arange(k)).ravel()]
    top_scores[rows] = all_scores[keep].reshape(-1, k)
    top_indices[rows] = all_indices[keep].reshape(-1, k)


def _empty_top_k(count, k, num_candidates, dtype):
    """Running top-k arrays of `count` rows before any candidate: score -inf, index past the last."""
    return np.full((count, k), -np.inf, dtype), np.full((count, k), num_candidates, np.int64)


def tiled_top_k(queries: np.ndarray, items: np.ndarray, k: int, query_tile: int = QUERY_TILE,
                item_tile: int = ITEM_TILE, both_ways: bool = False):
    """(scores, indices), each [queries, min(k, items)]: every query's best items by `queries @ items.T`,
    in the order of a stable descending sort (of equal scores, the lower item index first). With
    `both_ways`, also every item's best queries by the same scores (`(queries @ items.T).T`), in a pair
    ((query scores, query indices), (item scores, item indices)), from the same tiles.

    Scores are computed `query_tile × item_tile` at a time (a set smaller than its side of the tile
    gives the rest to the other); memory is a few such tiles plus the inputs and the outputs. The scores
    are the dense product's bit for bit when BLAS computes tiles and dense product with one kernel: every
    tile has the same shape (`_windows`), the whole product's when it fits in one tile, and otherwise the
    default tiles take the large-matrix kernel that a large dense product takes (OpenBLAS sends single
    rows to GEMV and, on AVX-512, products of up to 10^6 multiply-adds to small-matrix kernels, whose
    last bits can differ).
    """
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"queries {queries.shape} and items {items.shape} are not [count, dim] of one dim")
    if k < 1:
        raise ValueError(f"k={k}: at least 1")
    if not all(np.isfinite([queries.min(initial=0), queries.max(initial=0), items.min(initial=0),
                            items.max(initial=0)])):
        raise ValueError("queries and items must be finite")  # a NaN score would hide its row's other scores
    if len(items) < item_tile:
        query_tile = max(query_tile, query_tile * item_tile // max(1, len(items)))
    elif len(queries) < query_tile:
        item_tile = max(item_tile, query_tile * item_tile // max(1, len(queries)))
    dtype = np.result_type(queries, items, np.float32)
    query_top = _empty_top_k(len(queries), min(k, len(items)), len(items), dtype)
    item_top = _empty_top_k(len(items), min(k, len(queries)), len(queries), dtype) if both_ways else None
    for query_start, query_fresh, query_stop in _windows(len(queries), query_tile):
        block_top = _empty_top_k(query_stop - query_start, min(k, len(items)), len(items), dtype)
        for item_start, item_fresh, item_stop in _windows(len(items), item_tile):
            tile = queries[query_start:query_stop] @ items[item_start:item_stop].T
            fresh = tile[:, item_fresh - item_start:]
            _update(*block_top, fresh, item_fresh)
            if both_ways:
                fresh_items = slice(item_fresh, item_stop)
                _update(item_top[0][fresh_items], item_top[1][fresh_items],
                        fresh[query_fresh - query_start:].T, query_fresh)
        for top, block in zip(query_top, block_top):
            top[query_fresh:query_stop] = block[query_fresh - query_start:]
    return (query_top, item_top) if both_ways else query_top


def _first_relevant(top_indices: np.ndarray, query_labels, item_labels) -> np.ndarray:
    """Each query's position of its first item with its label among `top_indices`, or inf if none is."""
    hits = np.asarray(item_labels)[top_indices] == np.asarray(query_labels)[:, None]
    return np.where(hits, np.arange(hits.shape[1]), np.inf).min(axis=1, initial=np.inf)


def tiled_recall_at_k(queries: np.ndarray, items: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray,
                      ks: Sequence[int] = (1, 5), query_tile: int = QUERY_TILE,
                      item_tile: int = ITEM_TILE) -> dict[int, float]:
    """`recall_at_k(queries @ items.T, query_labels[:, None] == item_labels[None, :], ks)`, exactly,
    in memory linear in the number of queries and items (`tiled_top_k`)."""
    if len(query_labels) != len(queries) or len(item_labels) != len(items):
        raise ValueError(f"{len(query_labels)} query labels for {len(queries)} queries, "
                         f"{len(item_labels)} item labels for {len(items)} items")
    _, top_indices = tiled_top_k(queries, items, max(ks), query_tile, item_tile)
    first_hit = _first_relevant(top_indices, query_labels, item_labels)
    return {k: float(np.mean(first_hit < k)) for k in ks}


def retrieval_recalls(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      query_tile: int = QUERY_TILE, item_tile: int = ITEM_TILE) -> dict[str, dict[int, float]]:
    """Image→text Recall@K over the images with a caption and text→image Recall@K over all captions,
    where caption j belongs to image `owner[j]`; the similarity is `images @ texts.T` (its transpose for
    text→image), ties go to the lower index, and memory is linear: one pass of `tiled_top_k` over the
    tiles of `images @ texts.T` ranks both ways."""
    owner = np.asarray(owner)
    image_ids = np.arange(len(images))
    (_, image_to_text), (_, text_to_image) = tiled_top_k(images, texts, max(ks), query_tile, item_tile,
                                                         both_ways=True)
    first_caption = _first_relevant(image_to_text, image_ids, owner)[np.isin(image_ids, owner)]
    first_image = _first_relevant(text_to_image, owner, image_ids)
    return {"image_to_text": {k: float(np.mean(first_caption < k)) for k in ks},
            "text_to_image": {k: float(np.mean(first_image < k)) for k in ks}}
