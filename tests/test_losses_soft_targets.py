"""CWCL, distillation and supervised contrastive losses: float64 NumPy formulas, per device, special cases."""

import functools

import jax
import numpy as np
import pytest

import loss_checks
from jclip.losses.soft_targets import cwcl_loss, distillation_loss
from jclip.losses.softmax import clip_loss
from jclip.losses.supervised import supervised_contrastive_loss


def unit_pairs(batch, dim=4, seed=0):
    """Unit-norm image and text embeddings, each text correlated with its image."""
    rng = np.random.default_rng(seed)
    x, noise = rng.normal(size=(2, batch, dim))
    y = x + noise
    return tuple(z / np.linalg.norm(z, axis=1, keepdims=True) for z in (x, y))


def log_softmax(a):
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def softmax(a):
    return np.exp(log_softmax(a))


def soft_cross_entropy(logits, image_targets, text_targets):
    """(1/2B) Σ over both directions of −Σ_j target_ij log softmax_j(row i)."""
    image_to_text = -np.sum(image_targets * log_softmax(logits))
    text_to_image = -np.sum(text_targets * log_softmax(logits.T))
    return (image_to_text + text_to_image) / (2 * len(logits))


def cwcl_reference_with_frozen(reference_embeddings):
    """CWCL whose weights come from fixed embeddings: the loss's stop_gradient, as a function of the rest."""
    weights = (1 + reference_embeddings @ reference_embeddings.T) / 2
    targets = weights / weights.sum(axis=1, keepdims=True)
    return lambda zimg, ztxt, scale: soft_cross_entropy(scale * zimg @ ztxt.T, targets, targets)


def distillation_reference_with_teacher(teacher_zimg, teacher_ztxt, teacher_scale):
    teacher = teacher_scale * teacher_zimg @ teacher_ztxt.T
    return lambda zimg, ztxt, scale: soft_cross_entropy(scale * zimg @ ztxt.T, softmax(teacher), softmax(teacher.T))


def supervised_reference(zimg, ztxt, scale, labels):
    positives = (labels[:, None] == labels[None, :]).astype(float)
    targets = positives / positives.sum(axis=1, keepdims=True)
    return soft_cross_entropy(scale * zimg @ ztxt.T, targets, targets)


def teacher_embeddings(batch, dim=6, seed=3):
    return unit_pairs(batch, dim=dim, seed=seed)


LABELS_8 = np.array([0, 1, 0, 2, 1, 3, 0, 2], np.int32)


@pytest.mark.parametrize("similarity_from", ["text", "image"])
def test_cwcl_matches_reference(similarity_from):
    zimg, ztxt = unit_pairs(8)
    frozen = ztxt if similarity_from == "text" else zimg
    loss_checks.assert_matches_reference(cwcl_loss, cwcl_reference_with_frozen(frozen),
                                         {"zimg": zimg, "ztxt": ztxt, "scale": 5.0}, sharded=("zimg", "ztxt"),
                                         similarity_from=similarity_from)


def test_distillation_matches_reference():
    zimg, ztxt = unit_pairs(8)
    teacher = teacher_embeddings(8)
    student = functools.partial(distillation_loss, teacher_zimg=np.float32(teacher[0]),
                                teacher_ztxt=np.float32(teacher[1]), teacher_scale=8.0)
    reference = distillation_reference_with_teacher(*(np.float64(np.float32(z)) for z in teacher), 8.0)
    loss_checks.assert_matches_reference(student, reference, {"zimg": zimg, "ztxt": ztxt, "scale": 5.0},
                                         sharded=("zimg", "ztxt"))


def test_supervised_contrastive_matches_reference():
    zimg, ztxt = unit_pairs(8)
    loss_checks.assert_matches_reference(supervised_contrastive_loss, supervised_reference,
                                         {"zimg": zimg, "ztxt": ztxt, "scale": 5.0, "labels": LABELS_8},
                                         sharded=("zimg", "ztxt", "labels"))


def per_device_inputs(name):
    zimg, ztxt = unit_pairs(16, seed=1)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": 5.0}
    if name == "distillation":
        teacher_zimg, teacher_ztxt = teacher_embeddings(16)
        inputs.update(teacher_zimg=teacher_zimg, teacher_ztxt=teacher_ztxt, teacher_scale=8.0)
    if name == "supervised":
        inputs["labels"] = np.array([0, 1, 0, 2, 1, 3, 0, 2, 4, 4, 0, 5, 1, 6, 2, 0], np.int32)
    return inputs


PER_DEVICE = {
    "cwcl_text": functools.partial(cwcl_loss, similarity_from="text"),
    "cwcl_image": functools.partial(cwcl_loss, similarity_from="image"),
    "distillation": distillation_loss,
    "supervised": supervised_contrastive_loss,
}


@pytest.mark.parametrize("name", PER_DEVICE)
def test_per_device_equals_whole_batch(name):
    inputs = per_device_inputs(name.split("_")[0])
    loss_checks.assert_sharded_equals_single_device(
        PER_DEVICE[name], inputs, sharded=("zimg", "ztxt", "teacher_zimg", "teacher_ztxt", "labels"))


def test_cwcl_is_symmetric_in_the_modalities():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(8))
    np.testing.assert_allclose(cwcl_loss(zimg, ztxt, 5.0, similarity_from="text"),
                               cwcl_loss(ztxt, zimg, 5.0, similarity_from="image"), rtol=1e-6)


def test_distillation_is_minimised_when_the_student_is_the_teacher():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(8))
    loss = lambda zimg, ztxt, scale: distillation_loss(zimg, ztxt, scale, zimg, ztxt, 5.0)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(zimg, ztxt, np.float32(5.0))
    teacher = 5.0 * np.float64(zimg) @ np.float64(ztxt).T
    entropy = lambda p: -np.sum(p * np.log(p)) / len(p)
    np.testing.assert_allclose(value, (entropy(softmax(teacher)) + entropy(softmax(teacher.T))) / 2, rtol=1e-5)
    for grad in grads:  # the gradient through the student's logits, softmax(l) − softmax(m), is 0
        np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    moved = distillation_loss(zimg, ztxt, 6.0, zimg, ztxt, 5.0)
    assert moved > value


def test_distillation_gives_the_teacher_no_gradient():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(8))
    teacher_zimg, teacher_ztxt = (np.float32(z) for z in teacher_embeddings(8))
    grads = jax.grad(distillation_loss, argnums=(3, 4, 5))(zimg, ztxt, 5.0, teacher_zimg, teacher_ztxt, 8.0)
    for grad in grads:
        assert np.all(grad == 0)


def test_supervised_contrastive_with_distinct_labels_is_clip_loss():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(8))
    labels = np.arange(8, dtype=np.int32)[::-1].copy()
    supervised = jax.value_and_grad(supervised_contrastive_loss, argnums=(0, 1, 2))(zimg, ztxt, 5.0, labels)
    clip = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(zimg, ztxt, 5.0)
    loss_checks.assert_close(supervised, clip, rtol=1e-6)
    repeated = supervised_contrastive_loss(zimg, ztxt, 5.0, LABELS_8)
    assert not np.isclose(repeated, supervised[0])  # the labels matter


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cwcl_loss(np.ones((4, 8)), np.ones((4, 7)), 1.0), r"\(4, 8\).*\(4, 7\)"),
        (lambda: cwcl_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, similarity_from="audio"), "similarity_from.*audio"),
        (lambda: cwcl_loss(np.ones((4, 8)), np.ones((4, 8)), np.ones(2)), r"scale.*\(2,\)"),
        (lambda: distillation_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.ones((4, 6)), np.ones((4, 5)), 1.0),
         r"teacher_zimg \(4, 6\) and teacher_ztxt \(4, 5\)"),
        (lambda: distillation_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.ones((5, 6)), np.ones((5, 6)), 1.0),
         r"one row per example.*\(5, 6\).*\(4, 8\)"),
        (lambda: distillation_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.ones(6), np.ones(6), 1.0),
         r"2-D.*teacher_zimg \(6,\)"),
        (lambda: distillation_loss(*np.ones((2, 4, 8), np.float32), 1.0, *np.ones((2, 4, 6), np.float32),
                                   np.ones((1, 2))), r"teacher_scale.*\(1, 2\)"),
        (lambda: supervised_contrastive_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.zeros(5, np.int32)),
         r"labels.*\(5,\).*\(4, 8\)"),
        (lambda: supervised_contrastive_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.zeros((4, 1), np.int32)),
         r"labels.*\(4, 1\)"),
        (lambda: supervised_contrastive_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.zeros(4, np.float32)),
         "integer.*float32"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
