"""Alignment, uniformity and the contrastive-gap loss against float64 NumPy formulas and per device; embedding_geometry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loss_checks
from jclip.losses.geometry import (
    alignment_loss,
    contrastive_gap_loss,
    cross_modal_uniformity_loss,
    uniformity_loss,
)
from jclip.losses.metrics import embedding_geometry


def unit_pairs(batch, dim=4, seed=0):
    """Unit-norm image and text embeddings, each text correlated with its image."""
    rng = np.random.default_rng(seed)
    x, noise = rng.normal(size=(2, batch, dim))
    y = x + noise
    return tuple(z / np.linalg.norm(z, axis=1, keepdims=True) for z in (x, y))


def squared_distances(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def log_mean_over_distinct_pairs(values):
    """log of the mean of exp(values[i, j]) over i ≠ j, shifted by the largest so that nothing underflows."""
    off_diagonal = values[~np.eye(len(values), dtype=bool)]
    peak = off_diagonal.max()
    return peak + np.log(np.mean(np.exp(off_diagonal - peak)))


def alignment_reference(zimg, ztxt, alpha):
    return np.mean(np.linalg.norm(zimg - ztxt, axis=1) ** alpha)


def uniformity_reference(z, t):
    return log_mean_over_distinct_pairs(-t * squared_distances(z, z))


def cross_reference(zimg, ztxt, t):
    return log_mean_over_distinct_pairs(-t * squared_distances(zimg, ztxt))


def clip_reference(zimg, ztxt, scale):
    logits = scale * zimg @ ztxt.T

    def cross_entropy(a):
        return np.sum(np.log(np.exp(a).sum(axis=1)) - np.diag(a))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / (2 * len(zimg))


def contrastive_gap_reference(zimg, ztxt, scale, alignment_weight, uniformity_weight, t):
    in_modal = (uniformity_reference(zimg, t) + uniformity_reference(ztxt, t)) / 2
    return (clip_reference(zimg, ztxt, scale) + alignment_weight * alignment_reference(zimg, ztxt, 2)
            + uniformity_weight * (in_modal + cross_reference(zimg, ztxt, t)) / 2)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_alignment_matches_reference(alpha):
    zimg, ztxt = unit_pairs(8)
    loss_checks.assert_matches_reference(
        alignment_loss, lambda zimg, ztxt: alignment_reference(zimg, ztxt, alpha), {"zimg": zimg, "ztxt": ztxt},
        sharded=("zimg", "ztxt"), alpha=alpha)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_reference(t):
    zimg, _ = unit_pairs(8)
    loss_checks.assert_matches_reference(uniformity_loss, lambda z: uniformity_reference(z, t), {"z": zimg},
                                         sharded=("z",), t=t)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_cross_modal_uniformity_matches_reference(t):
    zimg, ztxt = unit_pairs(8)
    loss_checks.assert_matches_reference(
        cross_modal_uniformity_loss, lambda zimg, ztxt: cross_reference(zimg, ztxt, t), {"zimg": zimg, "ztxt": ztxt},
        sharded=("zimg", "ztxt"), t=t)


@pytest.mark.parametrize("alignment_weight, uniformity_weight, t", [(1.0, 1.0, 2.0), (0.5, 2.0, 1.0)])
def test_contrastive_gap_matches_reference(alignment_weight, uniformity_weight, t):
    zimg, ztxt = unit_pairs(8)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": 5.0}
    reference = lambda zimg, ztxt, scale: contrastive_gap_reference(zimg, ztxt, scale, alignment_weight,
                                                                    uniformity_weight, t)
    loss_checks.assert_matches_reference(contrastive_gap_loss, reference, inputs, sharded=("zimg", "ztxt"),
                                         alignment_weight=alignment_weight, uniformity_weight=uniformity_weight, t=t)


PER_DEVICE = {
    "alignment": (alignment_loss, ("zimg", "ztxt")),
    "uniformity": (uniformity_loss, ("z",)),
    "cross_modal_uniformity": (cross_modal_uniformity_loss, ("zimg", "ztxt")),
    "contrastive_gap": (contrastive_gap_loss, ("zimg", "ztxt", "scale")),
}


@pytest.mark.parametrize("name", PER_DEVICE)
def test_per_device_equals_whole_batch(name):
    loss, arguments = PER_DEVICE[name]
    zimg, ztxt = unit_pairs(16, seed=1)
    inputs = {"zimg": zimg, "ztxt": ztxt, "z": zimg, "scale": 5.0}
    loss_checks.assert_sharded_equals_single_device(
        loss, {k: inputs[k] for k in arguments}, sharded=("zimg", "ztxt", "z"))


def test_uniformity_stays_finite_where_the_plain_mean_underflows():
    zimg, ztxt = unit_pairs(8)
    far = 30 * zimg  # t·d² in the thousands: every exp(−t d²) is 0 in float32 (and in float64)
    kernel = jnp.exp(-2 * squared_distances(np.float32(far), np.float32(far)))
    assert jnp.log(jnp.mean(kernel[~np.eye(8, dtype=bool)])) == -jnp.inf  # the plain formula
    value, grad = jax.value_and_grad(uniformity_loss)(np.float32(far))
    np.testing.assert_allclose(value, uniformity_reference(far, 2.0), rtol=1e-5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(cross_modal_uniformity_loss(np.float32(far), np.float32(30 * ztxt)),
                               cross_reference(far, 30 * ztxt, 2.0), rtol=1e-5)


def test_alignment_gradient_is_zero_for_a_coincident_pair():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(8))
    ztxt[3] = zimg[3]
    grad = jax.grad(lambda zimg: alignment_loss(zimg, ztxt, alpha=1.5))(zimg)
    assert np.all(np.isfinite(grad)) and np.all(grad[3] == 0) and np.all(grad[2] != 0)


def test_contrastive_gap_without_its_terms_is_clip_loss():
    zimg, ztxt = unit_pairs(8)
    value = contrastive_gap_loss(np.float32(zimg), np.float32(ztxt), 5.0, alignment_weight=0.0, uniformity_weight=0.0)
    np.testing.assert_allclose(value, clip_reference(zimg, ztxt, 5.0), rtol=1e-5)


def test_embedding_geometry_is_the_losses_on_one_device_and_per_device():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(16, seed=2))
    zimg = zimg + 0.3  # a gap between the modalities
    expected = {"alignment": alignment_loss(zimg, ztxt), "uniformity_image": uniformity_loss(zimg),
                "uniformity_text": uniformity_loss(ztxt), "uniformity_cross": cross_modal_uniformity_loss(zimg, ztxt),
                "modality_gap": np.linalg.norm(zimg.mean(0) - ztxt.mean(0))}
    geometry = embedding_geometry(zimg, ztxt)
    assert set(geometry) == set(expected)
    loss_checks.assert_close(geometry, expected, rtol=1e-6)
    np.testing.assert_allclose(geometry["uniformity_image"], uniformity_reference(np.float64(zimg), 2.0), rtol=1e-5)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    per_device = jax.jit(jax.shard_map(lambda a, b: embedding_geometry(a, b, axis_name="data"), mesh=mesh,
                                       in_specs=P("data"), out_specs=P()))(zimg, ztxt)
    loss_checks.assert_close(per_device, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: alignment_loss(np.ones((4, 8)), np.ones((4, 7))), r"\(4, 8\).*\(4, 7\)"),
        (lambda: alignment_loss(np.ones((4, 8)), np.ones((4, 8)), alpha=0.0), "alpha.*positive.*alpha=0.0"),
        (lambda: uniformity_loss(np.ones(8)), r"2-D.*\(8,\)"),
        (lambda: uniformity_loss(np.ones((4, 8)), t=-1.0), "t.*positive.*t=-1.0"),
        (lambda: uniformity_loss(np.ones((1, 8))), "at least 2.*got 1"),
        (lambda: cross_modal_uniformity_loss(np.ones((4, 8)), np.ones((5, 8))), r"\(4, 8\).*\(5, 8\)"),
        (lambda: cross_modal_uniformity_loss(np.ones((4, 8)), np.ones((4, 8)), t=0.0), "t=0.0"),
        (lambda: contrastive_gap_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, uniformity_weight=-1.0),
         "uniformity_weight.*non-negative"),
        (lambda: contrastive_gap_loss(np.ones((4, 8)), np.ones((4, 8)), np.ones(2)), r"scale.*\(2,\)"),
        (lambda: embedding_geometry(np.ones((4, 8)), np.ones((4, 6))), r"\(4, 8\).*\(4, 6\)"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
