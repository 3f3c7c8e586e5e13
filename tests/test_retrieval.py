"""Tiled Recall@K against the dense `recall_at_k`: equal, ties included, for every tile size."""

import numpy as np
import pytest

from jclip.evaluate.retrieval import _windows, recall_at_k, retrieval_recalls, tiled_recall_at_k, tiled_top_k

KS = (1, 2, 5, 10)


def normalised(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_recalls(images, texts, owner, ks):
    """What `retrieval_task` computes with the dense similarity matrix."""
    has_caption = np.isin(np.arange(len(images)), owner)
    relevant = owner[None, :] == np.arange(len(images))[:, None]
    similarity = images @ texts.T
    return {"image_to_text": recall_at_k(similarity[has_caption], relevant[has_caption], ks),
            "text_to_image": recall_at_k(similarity.T, relevant.T, ks)}


def first_hit_by_counting(similarity, relevant, rows_at_once=500):
    """`recall_at_k`'s position of each row's first relevant item, counted instead of sorted: the items
    scoring above the best relevant one, and those equal to it with a lower index than its first."""
    positions = []
    for start in range(0, len(similarity), rows_at_once):
        scores = np.ascontiguousarray(similarity[start:start + rows_at_once])
        hits = relevant[start:start + rows_at_once]
        best = np.where(hits, scores, -np.inf).max(axis=1, keepdims=True)
        best_index = np.argmax(hits & (scores == best), axis=1)[:, None]
        ahead = (scores > best) | ((scores == best) & (np.arange(scores.shape[1]) < best_index))
        positions.append(np.where(hits.any(axis=1), np.count_nonzero(ahead, axis=1), np.inf))
    return np.concatenate(positions)


def captioned_images(rng, num_images, dim, integer_valued):
    """(images, texts, owner): 0 to 4 captions per image (some images have none), images and captions
    duplicated exactly, captions near their image. Integer-valued embeddings score exactly in float32."""
    owner = np.repeat(np.arange(num_images), rng.integers(0, 5, num_images))
    if integer_valued:
        images = rng.integers(-2, 3, (num_images, dim)).astype(np.float32)
        texts = images[owner] + rng.integers(-1, 2, (len(owner), dim)).astype(np.float32)
    else:
        images = normalised(rng.normal(size=(num_images, dim)))
        texts = normalised(images[owner] + rng.normal(size=(len(owner), dim)) / np.sqrt(dim))
    images[-5:] = images[:5]  # duplicate images: text→image ties
    texts[-7:] = texts[:7]  # a caption of one image equal to one of another: image→text ties
    return images, texts, owner


def assert_equals_dense(images, texts, owner, query_tile, item_tile):
    similarity = images @ texts.T
    k = max(KS)
    image_top, text_top = tiled_top_k(images, texts, k, query_tile, item_tile, both_ways=True)
    for (top_scores, top_indices), scores in ((image_top, similarity), (text_top, similarity.T)):
        np.testing.assert_array_equal(top_indices, np.argsort(-scores, axis=1, kind="stable")[:, :k])
        np.testing.assert_array_equal(top_scores, np.take_along_axis(scores, top_indices, axis=1))
    for one_way, both_ways in ((tiled_top_k(images, texts, k, query_tile, item_tile), image_top),
                               (tiled_top_k(texts, images, k, query_tile, item_tile), text_top)):
        np.testing.assert_array_equal(one_way, both_ways)
    image_ids = np.arange(len(images))
    relevant = owner[None, :] == image_ids[:, None]
    assert tiled_recall_at_k(images, texts, image_ids, owner, KS, query_tile, item_tile) == recall_at_k(
        similarity, relevant, KS)
    assert tiled_recall_at_k(texts, images, owner, image_ids, KS, query_tile, item_tile) == recall_at_k(
        similarity.T, relevant.T, KS)
    assert retrieval_recalls(images, texts, owner, KS, query_tile, item_tile) == dense_recalls(images, texts, owner, KS)


@pytest.mark.parametrize("total, size", [(1, 5), (5, 5), (6, 5), (10, 3), (7, 1), (25000, 4096), (8193, 4096)])
def test_windows_have_one_size_and_cover_each_row_once(total, size):
    """One shape for every tile (one BLAS kernel), whatever the remainder; the repeated rows are skipped."""
    windows = list(_windows(total, size))
    assert len({stop - start for start, _, stop in windows}) == 1 and windows[0][2] - windows[0][0] <= size
    assert [row for _, fresh, stop in windows for row in range(fresh, stop)] == list(range(total))
    assert all(start <= fresh for start, fresh, _ in windows)


def test_a_tie_goes_to_the_lower_index_in_a_tile_and_across_tiles():
    query = np.array([[1.0, 0.0]], np.float32)
    items = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)  # scores 0, 1, 1
    for tiles in ((1, 1), (1, 2), (1, 3)):  # the tied items 1 and 2 in two tiles, or in one
        assert tiled_top_k(query, items, 2, *tiles)[1].tolist() == [[1, 2]]
        assert tiled_recall_at_k(query, items, [7], [0, 0, 7], (1, 2), *tiles) == {1: 0.0, 2: 1.0}
        assert tiled_recall_at_k(query, items, [7], [0, 7, 0], (1, 2), *tiles) == {1: 1.0, 2: 1.0}


def test_items_tied_at_the_kth_score_keep_the_lowest_index():
    query = np.array([[1.0]], np.float32)
    items = np.array([[0.9], [0.5], [0.5], [0.5], [0.5]], np.float32)
    for tiles in ((1, 1), (1, 2), (1, 3), (1, 5)):  # the k-th score tied within a tile, and with later tiles
        top_scores, top_indices = tiled_top_k(query, items, 2, *tiles)
        assert top_indices.tolist() == [[0, 1]] and np.array_equal(top_scores, items[:2].T)
        assert tiled_recall_at_k(query, items, [1], [0, 1, 0, 0, 1], (1, 2), *tiles) == {1: 0.0, 2: 1.0}
        assert tiled_recall_at_k(query, items, [1], [0, 0, 1, 1, 1], (1, 2), *tiles) == {1: 0.0, 2: 0.0}


def test_fewer_items_than_k_no_items_and_not_finite():
    queries = np.eye(3, dtype=np.float32)
    assert tiled_top_k(queries, queries[:2], 5)[1].tolist() == [[0, 1], [1, 0], [0, 1]]
    assert tiled_recall_at_k(queries, queries[:2], [0, 1, 2], [1, 0], (1, 2, 5)) == {1: 0.0, 2: 2 / 3, 5: 2 / 3}
    # The dense recall_at_k fails on no items (argmax of an empty row); no query finds a relevant item.
    assert tiled_recall_at_k(queries, queries[:0], [0, 1, 2], np.zeros(0, int), (1, 5)) == {1: 0.0, 5: 0.0}
    with pytest.raises(ValueError, match="finite"):
        tiled_top_k(queries, np.array([[0.0, np.nan, 1.0]], np.float32), 1)


# 53 images and about 100 captions: tiles of one row, smaller than, equal to and larger than the sets.
@pytest.mark.parametrize("query_tile, item_tile", [(1, 1), (3, 7), (16, 5), (53, 53), (200, 200)])
def test_equals_dense_on_exact_integer_scores(query_tile, item_tile):
    """Integer-valued embeddings score exactly whatever the BLAS kernel, with many ties."""
    images, texts, owner = captioned_images(np.random.default_rng(query_tile), 53, 6, integer_valued=True)
    assert_equals_dense(images, texts, owner, query_tile, item_tile)


# 301 images and about 600 captions, tiles of at least about 60 × 150, which OpenBLAS scores bit for bit as
# the dense matrix (tiles of a few rows it may not: the integer-valued test has those).
@pytest.mark.parametrize("query_tile, item_tile", [(64, 256), (100, 333), (301, 301), (1000, 1000)])
def test_equals_dense_on_normalised_embeddings(query_tile, item_tile):
    images, texts, owner = captioned_images(np.random.default_rng(query_tile), 301, 64, integer_valued=False)
    assert_equals_dense(images, texts, owner, query_tile, item_tile)
    similarity = images @ texts.T
    relevant = owner[None, :] == np.arange(len(images))[:, None]
    first_hit = first_hit_by_counting(similarity, relevant)
    assert {k: float(np.mean(first_hit < k)) for k in KS} == recall_at_k(similarity, relevant, KS)


def test_a_set_smaller_than_its_side_of_the_tile_lends_the_rest():
    """3,000 images and 2 captions: tiles of 512 images × 2 captions would be small products, which
    OpenBLAS computes with other kernels than the large dense product; one tile of them all is the dense one."""
    rng = np.random.default_rng(0)
    images, texts = normalised(rng.normal(size=(3000, 512))), normalised(rng.normal(size=(2, 512)))
    similarity = images @ texts.T
    for queries, items, scores in ((images, texts, similarity), (texts, images, similarity.T)):
        top_scores, top_indices = tiled_top_k(queries, items, 10)
        np.testing.assert_array_equal(top_indices, np.argsort(-scores, axis=1, kind="stable")[:, :10])
        np.testing.assert_array_equal(top_scores, np.take_along_axis(scores, top_indices, axis=1))


def test_equals_dense_at_5000_images_and_25000_captions():
    """With the default tiles; the dense reference counts instead of sorting (its argsort takes 25 s)."""
    rng = np.random.default_rng(0)
    num_images, dim = 5000, 64
    owner = np.repeat(np.arange(num_images), 5)
    images = normalised(rng.normal(size=(num_images, dim)))
    texts = normalised(images[owner] + 2.5 * rng.normal(size=(len(owner), dim)) / np.sqrt(dim))
    images[-50:] = images[:50]
    texts[-70:] = texts[:70]
    recalls = retrieval_recalls(images, texts, owner, KS)

    similarity = images @ texts.T
    relevant = owner[None, :] == np.arange(num_images)[:, None]
    image_first = first_hit_by_counting(similarity, relevant)
    text_first = first_hit_by_counting(similarity.T, relevant.T)
    assert recalls == {"image_to_text": {k: float(np.mean(image_first < k)) for k in KS},
                       "text_to_image": {k: float(np.mean(text_first < k)) for k in KS}}
    assert 0.1 < recalls["text_to_image"][1] < recalls["image_to_text"][10] < 0.95
