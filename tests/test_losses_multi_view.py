"""Multi-view losses (MV-InfoNCE, MV-DHEL, poly-view): float64 references, sharding, two-view relations."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import loss_checks
from jclip.losses.multi_view import multi_view_dhel_loss, multi_view_infonce_loss, poly_view_loss
from jclip.losses.softmax import clip_loss

SCALE = 2.0  # away from the temperature at which a loss's scale gradient cancels to ~0
LOSSES = {
    "mv_infonce": multi_view_infonce_loss,
    "mv_dhel": multi_view_dhel_loss,
    "poly_geometric": functools.partial(poly_view_loss, aggregation="geometric"),
    "poly_arithmetic": functools.partial(poly_view_loss, aggregation="arithmetic"),
}


def make_views(batch, view_count, dim=4, seed=0):
    """Unit-norm views of each sample scattered around a per-sample direction, as augmentations are."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(batch, 1, dim))
    views = centre + 0.7 * rng.normal(size=(batch, view_count, dim))
    return views / np.linalg.norm(views, axis=2, keepdims=True)


def similarity(scale, u, v):
    return np.exp(scale * np.dot(u, v))


def mv_infonce_reference(views, scale):
    batch, view_count, _ = views.shape
    pairs = [(l, m) for l in range(view_count) for m in range(view_count) if l != m]
    total = 0.0
    for i in range(batch):
        numerator = sum(similarity(scale, views[i, l], views[i, m]) for l, m in pairs)
        denominator = sum(similarity(scale, views[i, l], views[j, m]) for l, m in pairs for j in range(batch))
        total -= np.log(numerator / denominator)
    return total / batch


def mv_dhel_reference(views, scale):
    batch, view_count, _ = views.shape
    total = 0.0
    for i in range(batch):
        numerator = sum(similarity(scale, views[i, l], views[i, m])
                        for l in range(view_count) for m in range(view_count) if l != m)
        denominator = 1.0
        for l in range(view_count):
            denominator *= sum(similarity(scale, views[i, l], views[j, l]) for j in range(batch) if j != i)
        total -= np.log(numerator / denominator)
    return total / batch


def poly_view_reference(views, scale, aggregation):
    batch, view_count, _ = views.shape
    total = 0.0
    for i in range(batch):
        for alpha in range(view_count):
            negatives = sum(similarity(scale, views[i, alpha], views[j, gamma])
                            for j in range(batch) if j != i for gamma in range(view_count))
            likelihoods = []
            for beta in range(view_count):
                if beta != alpha:
                    positive = similarity(scale, views[i, alpha], views[i, beta])
                    likelihoods.append(positive / (positive + negatives))
            if aggregation == "geometric":
                total -= np.mean(np.log(likelihoods))
            else:
                total -= np.log(np.mean(likelihoods))
    return total / (batch * view_count)


REFERENCES = {
    "mv_infonce": mv_infonce_reference,
    "mv_dhel": mv_dhel_reference,
    "poly_geometric": functools.partial(poly_view_reference, aggregation="geometric"),
    "poly_arithmetic": functools.partial(poly_view_reference, aggregation="arithmetic"),
}


@pytest.mark.parametrize("view_count", [2, 3])
@pytest.mark.parametrize("name", LOSSES)
def test_matches_float64_reference(name, view_count):
    inputs = {"views": make_views(8, view_count), "scale": np.float64(SCALE)}
    loss_checks.assert_matches_reference(LOSSES[name], REFERENCES[name], inputs, sharded=("views",))


@pytest.mark.parametrize("name", LOSSES)
def test_sharded_equals_single_device(name):
    inputs = {"views": make_views(16, 3, seed=1), "scale": np.float64(SCALE)}
    loss_checks.assert_sharded_equals_single_device(LOSSES[name], inputs, sharded=("views",))


def test_two_view_infonce_is_one_softmax_over_row_and_column_and_bounds_clip_loss():
    views = np.float32(make_views(8, 2, seed=2))
    logits = SCALE * np.float64(views[:, 0]) @ np.float64(views[:, 1]).T

    def log_sum_exp(a, axis):
        return np.log(np.sum(np.exp(a), axis=axis))

    joint = np.logaddexp(log_sum_exp(logits, 1), log_sum_exp(logits, 0)) - np.log(2) - np.diag(logits)
    value = multi_view_infonce_loss(views, SCALE)
    loss_checks.assert_close(value, np.mean(joint))
    assert value > clip_loss(views[:, 0], views[:, 1], SCALE) + 1e-3
    # Symmetric logits (both views the same): each row and its column agree, and Jensen is tight.
    same = np.stack([views[:, 0], views[:, 0]], axis=1)
    loss_checks.assert_close(multi_view_infonce_loss(same, SCALE), clip_loss(same[:, 0], same[:, 1], SCALE))


def test_two_view_dhel_is_dhel_minus_log_two():
    views = make_views(8, 2, seed=3)
    first, second = views[:, 0], views[:, 1]
    off_diagonal = ~np.eye(8, dtype=bool)

    def energy(z):
        return np.log(np.sum(np.where(off_diagonal, np.exp(SCALE * z @ z.T), 0.0), axis=1))

    dhel = np.mean(energy(first) + energy(second) - SCALE * np.sum(first * second, axis=1))
    loss_checks.assert_close(multi_view_dhel_loss(np.float32(views), SCALE), dhel - np.log(2))


def test_two_view_poly_view_is_nt_xent_and_bounds_clip_loss():
    views = np.float32(make_views(8, 2, seed=4))
    stacked = np.float64(np.concatenate([views[:, 0], views[:, 1]]))  # SimCLR's 2B rows
    logits = SCALE * stacked @ stacked.T
    np.fill_diagonal(logits, -np.inf)
    partner = np.concatenate([np.arange(8, 16), np.arange(8)])
    nt_xent = np.mean(np.log(np.sum(np.exp(logits), axis=1)) - logits[np.arange(16), partner])
    geometric = poly_view_loss(views, SCALE, aggregation="geometric")
    loss_checks.assert_close(geometric, nt_xent)
    loss_checks.assert_close(poly_view_loss(views, SCALE, aggregation="arithmetic"), nt_xent)
    assert geometric > clip_loss(views[:, 0], views[:, 1], SCALE)


def test_arithmetic_poly_view_is_at_most_geometric():
    views = np.float32(make_views(8, 4, seed=5))
    assert poly_view_loss(views, SCALE, aggregation="arithmetic") < poly_view_loss(views, SCALE)


@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_views_are_computed_in_float32(name):
    views = make_views(8, 3, seed=6)
    value = LOSSES[name](jnp.bfloat16(views), SCALE)
    assert value.dtype == jnp.float32
    loss_checks.assert_close(value, REFERENCES[name](np.float64(jnp.bfloat16(views)), SCALE), rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: multi_view_infonce_loss(np.ones((4, 8)), 1.0), r"3-D.*\(4, 8\)"),
        (lambda: multi_view_dhel_loss(np.ones((4, 1, 8)), 1.0), r"at least 2 views.*\(4, 1, 8\)"),
        (lambda: poly_view_loss(np.ones((1, 3, 8)), 1.0), "global batch of at least 2; got 1"),
        (lambda: multi_view_dhel_loss(np.ones((1, 3, 8)), 1.0), "global batch of at least 2; got 1"),
        (lambda: poly_view_loss(np.ones((4, 3, 8)), 1.0, aggregation="mean"), "aggregation.*'mean'"),
        (lambda: multi_view_infonce_loss(np.ones((4, 2, 8)), np.ones(2)), r"scale.*\(2,\)"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
