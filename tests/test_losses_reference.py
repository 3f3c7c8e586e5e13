"""clip_loss and siglip_loss on one device against float64 NumPy references; input checks."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loss_checks
from helpers import assert_trees_close
from jclip.losses import (
    CLIP_INIT_LOG_SCALE,
    CLIP_INIT_SCALE,
    CLIP_MAX_SCALE,
    SIGLIP_INIT_BIAS,
    SIGLIP_INIT_SCALE,
    clamp_log_scale,
    clip_loss,
    logits,
    siglip_loss,
    top1_accuracy,
)

BATCH, DIM = 16, 8


def clip_reference(x, y, scale, label_smoothing):
    """Loss and gradients (x, y, scale) of CLIP's symmetric cross-entropy, float64."""
    batch = len(x)
    logit = scale * x @ y.T
    target = (1 - label_smoothing) * np.eye(batch) + label_smoothing / batch

    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def cross_entropy(a):
        lse = np.log(np.exp(a - a.max(axis=1, keepdims=True)).sum(axis=1)) + a.max(axis=1)
        return np.sum(lse - np.sum(target * a, axis=1))

    loss = (cross_entropy(logit) + cross_entropy(logit.T)) / (2 * batch)
    dlogit = (softmax(logit) - target + (softmax(logit.T) - target).T) / (2 * batch)
    return loss, (scale * dlogit @ y, scale * dlogit.T @ x, np.sum(dlogit * (x @ y.T)))


def siglip_reference(x, y, scale, bias):
    """Loss and gradients (x, y, scale, bias) of SigLIP's sigmoid loss, float64."""
    batch = len(x)
    logit = scale * x @ y.T + bias
    labels = 2 * np.eye(batch) - 1
    loss = np.sum(np.logaddexp(0, -labels * logit)) / batch
    dlogit = -labels * 0.5 * (1 - np.tanh(labels * logit / 2)) / batch  # -z σ(-z l) / B, overflow-free
    return loss, (scale * dlogit @ y, scale * dlogit.T @ x, np.sum(dlogit * (x @ y.T)), np.sum(dlogit))


def clip_reference_with_keys(x, y, scale, x_keys, y_keys):
    """`clip_reference` without label smoothing whose logits take other keys: l = scale · x · y_keysᵀ for the
    images' rows and scale · y · x_keysᵀ for the texts' (the positive term keeps x · y). Loss and gradients
    (x, y, scale), the keys' gradients passed to the embeddings they stand for, float64."""
    batch = len(x)
    logits = scale * x @ y_keys.T, scale * y @ x_keys.T

    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    lse = lambda a: np.log(np.exp(a - a.max(axis=1, keepdims=True)).sum(axis=1)) + a.max(axis=1)
    loss = (np.sum(lse(logits[0])) + np.sum(lse(logits[1])) - 2 * scale * np.sum(x * y)) / (2 * batch)
    p_images, p_texts = softmax(logits[0]), softmax(logits[1])
    dx = scale * (p_images @ y_keys + p_texts.T @ y - 2 * y) / (2 * batch)
    dy = scale * (p_images.T @ x + p_texts @ x_keys - 2 * x) / (2 * batch)
    dscale = (np.sum(p_images * (x @ y_keys.T)) + np.sum(p_texts * (y @ x_keys.T)) - 2 * np.sum(x * y)) / (2 * batch)
    return loss, (dx, dy, dscale)


def embeddings(kind, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(2, BATCH, DIM))
    y = y + x  # correlated pairs, so that positives stand out as in training
    if kind == "normalised":
        x, y = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (x, y))
    if kind == "large":
        x, y = 10 * x, 10 * y
    return x, y


SCALES = {"random": (2.0, -1.0), "normalised": (CLIP_INIT_SCALE, SIGLIP_INIT_BIAS), "large": (5.0, 3.0)}
TILINGS = {"dense": {}, "block_size=4": {"block_size": 4}, "block_size=1": {"block_size": 1}}


def assert_close(actual, expected, rtol=1e-4):
    """Within `rtol`, and absolutely within `rtol` times each leaf's largest entry."""
    assert_trees_close(actual, expected, rtol=rtol, atol_fraction=rtol, per_leaf=True)


@pytest.fixture(scope="module")
def clip_grad():
    cache = {}

    def get(tiling, label_smoothing):
        key = (tiling, label_smoothing)
        if key not in cache:
            loss = lambda x, y, s: clip_loss(x, y, s, label_smoothing=label_smoothing, **TILINGS[tiling])
            cache[key] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return cache[key]

    return get


@pytest.mark.parametrize("kind", SCALES)
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_clip_loss_matches_reference(clip_grad, kind, tiling, label_smoothing):
    x, y = embeddings(kind)
    scale = SCALES[kind][0]
    value, grads = clip_grad(tiling, label_smoothing)(*(np.float32(a) for a in (x, y, scale)))
    ref_value, ref_grads = clip_reference(x, y, scale, label_smoothing)
    assert_close(value, ref_value, rtol=1e-5)
    assert_close(grads, ref_grads)


@pytest.mark.parametrize("kind", SCALES)
@pytest.mark.parametrize("tiling", TILINGS)
def test_siglip_loss_matches_reference(kind, tiling):
    x, y = embeddings(kind)
    scale, bias = SCALES[kind]
    loss = jax.jit(jax.value_and_grad(lambda *a: siglip_loss(*a, **TILINGS[tiling]), argnums=(0, 1, 2, 3)))
    value, grads = loss(*(np.float32(a) for a in (x, y, scale, bias)))
    ref_value, ref_grads = siglip_reference(x, y, scale, bias)
    assert_close(value, ref_value, rtol=1e-5)
    assert_close(grads, ref_grads)


def assert_global_arrays_match(loss, x, y, scale, bias, mesh_kind, ref_value, ref_grads):
    """`loss(x, y, scale, bias)` in float32 on global arrays (x, y split over 8 devices): the reference's value
    and gradients, the gradients laid out like the inputs."""
    inputs = loss_checks.on_mesh({"x": np.float32(x), "y": np.float32(y), "scale": np.float32(scale),
                                  "bias": np.float32(bias)}, ("x", "y"), mesh_kind)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*inputs.values())
    assert_close(value, ref_value, rtol=1e-5)
    assert_close(grads, ref_grads)
    loss_checks.assert_sharded_like(dict(zip(inputs, grads)), inputs)


GLOBAL_TILINGS = {**TILINGS, "ring": {"ring": True}, "ring+block_size=1": {"ring": True, "block_size": 1}}


@pytest.mark.parametrize("mesh_kind", loss_checks.MESH_KINDS)
@pytest.mark.parametrize("tiling", GLOBAL_TILINGS)
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_losses_on_global_arrays_match_reference(loss_name, tiling, mesh_kind):
    """Global arrays split over 8 devices, `axis_name=None`: the reference's value and gradients, laid out
    like the inputs, for every tiling (a ring too: the loss runs per device over the mesh)."""
    x, y = embeddings("normalised")
    scale, bias = SCALES["normalised"]
    if loss_name == "clip":
        loss = lambda x, y, scale, bias: clip_loss(x, y, scale, label_smoothing=0.1, **GLOBAL_TILINGS[tiling])
        ref_value, ref_grads = clip_reference(x, y, scale, 0.1)
        ref_grads = (*ref_grads, 0.0)
    else:
        loss = lambda x, y, scale, bias: siglip_loss(x, y, scale, bias, **GLOBAL_TILINGS[tiling])
        ref_value, ref_grads = siglip_reference(x, y, scale, bias)
    assert_global_arrays_match(loss, x, y, scale, bias, mesh_kind, ref_value, ref_grads)


def test_reference_detects_a_wrong_loss():
    x, y = embeddings("random")
    ref_value, ref_grads = clip_reference(x, y, 2.0, 0.0)
    with pytest.raises(AssertionError):  # smoothing changes the value; the comparison must see it
        assert_close(clip_loss(np.float32(x), np.float32(y), 2.0, label_smoothing=0.01), ref_value, rtol=1e-5)
    one_way = jax.grad(lambda x: jnp.mean(jax.nn.logsumexp(2.0 * x @ y.T, axis=1) - 2.0 * jnp.sum(x * y, axis=1)))
    with pytest.raises(AssertionError):
        assert_close(one_way(x), ref_grads[0])


def test_scale_and_bias_accept_one_element_arrays():
    x, y = (np.float32(z) for z in embeddings("normalised"))
    assert_close(clip_loss(x, y, np.full((1,), 10.0)), clip_loss(x, y, 10.0))
    assert_close(siglip_loss(x, y, np.full((1,), 10.0), np.full((1,), -10.0)), siglip_loss(x, y, 10.0, -10.0))


def test_bfloat16_embeddings_are_computed_in_float32():
    x, y = (np.float32(z) for z in embeddings("normalised"))
    value = clip_loss(jnp.bfloat16(x), jnp.bfloat16(y), CLIP_INIT_SCALE)
    assert value.dtype == jnp.float32
    assert_close(value, clip_reference(np.float64(jnp.bfloat16(x)), np.float64(jnp.bfloat16(y)), CLIP_INIT_SCALE, 0.0)[0])


def test_metrics_match_numpy():
    x, y = embeddings("random", seed=1)
    x32, y32 = np.float32(x), np.float32(y)
    assert_close(logits(x32, y32, 3.0, -1.0), 3.0 * x @ y.T - 1.0)
    accuracy = top1_accuracy(x32, y32)
    similarity = x @ y.T
    assert_close(accuracy["img2txt"], np.mean(similarity.argmax(axis=1) == np.arange(BATCH)))
    assert_close(accuracy["txt2img"], np.mean(similarity.argmax(axis=0) == np.arange(BATCH)))
    assert 0 < accuracy["img2txt"] < 1  # the test data tells right from wrong


def test_initial_values():
    assert CLIP_INIT_SCALE == pytest.approx(1 / 0.07) and CLIP_MAX_SCALE == 100.0
    assert (SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS) == (10.0, -10.0)
    assert jnp.exp(clamp_log_scale(jnp.log(200.0))) == pytest.approx(CLIP_MAX_SCALE)
    assert clamp_log_scale(jnp.float32(CLIP_INIT_LOG_SCALE)) == pytest.approx(CLIP_INIT_LOG_SCALE)
    assert clamp_log_scale(jnp.float32(-1.0)) == 0.0


RING_WITHOUT_DEVICES = "no mesh.*NamedSharding.*axis_name='data' inside jax.shard_map"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: clip_loss(np.ones((4, 8)), np.ones((4, 7)), 1.0), r"\(4, 8\).*\(4, 7\)"),
        (lambda: siglip_loss(np.ones((4, 8)), np.ones((5, 8)), 1.0, 0.0), r"\(4, 8\).*\(5, 8\)"),
        (lambda: clip_loss(np.ones(8), np.ones(8), 1.0), r"2-D.*\(8,\)"),
        (lambda: siglip_loss(np.ones((2, 4, 8)), np.ones((2, 4, 8)), 1.0, 0.0), r"2-D.*\(2, 4, 8\)"),
        (lambda: clip_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, ring=True), RING_WITHOUT_DEVICES),
        (lambda: siglip_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, 0.0, ring=True), RING_WITHOUT_DEVICES),
        (lambda: clip_loss(np.ones((6, 8)), np.ones((6, 8)), 1.0, block_size=4), "block_size=4.*6"),
        (  # a ring's blocks split the local batch: 4 rows per device under a 2-way mapped axis
            lambda: jax.vmap(lambda x, y: clip_loss(x, y, 1.0, axis_name="d", ring=True, block_size=3), axis_name="d")(
                np.ones((2, 4, 8)), np.ones((2, 4, 8))
            ),
            "block_size=3.*local batch.*4",
        ),
        (lambda: siglip_loss(np.ones((6, 8)), np.ones((6, 8)), 1.0, 0.0, block_size=0), "block_size=0"),
        (lambda: clip_loss(np.ones((4, 8)), np.ones((4, 8)), np.ones(2)), r"scale.*\(2,\)"),
        (lambda: siglip_loss(np.ones((4, 8)), np.ones((4, 8)), 1.0, np.ones((2, 2))), r"bias.*\(2, 2\)"),
        (lambda: clip_loss(np.ones((4, 8), np.float32), np.ones((4, 8), np.float32), 1.0, ring_dtype="bfloat16"),
         "ring_dtype='bfloat16'.*set ring=True"),
        (lambda: jax.vmap(lambda x, y: siglip_loss(x, y, 1.0, 0.0, axis_name="d", ring=True, ring_dtype="int8"),
                          axis_name="d")(np.ones((2, 4, 8)), np.ones((2, 4, 8))),
         "ring_dtype must be a floating-point type.*'int8'"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("mesh_kind", loss_checks.MESH_KINDS)
def test_bad_global_arrays_are_named_by_their_global_shapes(mesh_kind):
    x = loss_checks.on_mesh({"x": np.ones((16, 8), np.float32)}, ("x",), mesh_kind)["x"]
    y = loss_checks.on_mesh({"y": np.ones((16, 7), np.float32)}, ("y",), mesh_kind)["y"]
    with pytest.raises(ValueError, match=r"\(16, 8\).*\(16, 7\)"):
        jax.jit(clip_loss)(x, y, 1.0)
    with pytest.raises(ValueError, match="block_size=5.*global batch.*16"):
        jax.jit(lambda x: siglip_loss(x, x, 1.0, 0.0, block_size=5))(x)


def test_import_pulls_in_no_tensorflow_or_flax():
    code = (
        "import sys, jclip.losses; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'flax')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("mesh_kind", loss_checks.MESH_KINDS)
@pytest.mark.parametrize("block_size", [None, 1])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_a_bfloat16_ring_is_the_float64_loss_of_its_rounded_keys(loss_name, block_size, mesh_kind):
    """`ring_dtype="bfloat16"` over 8 devices: the keys of each direction enter the logits rounded to bfloat16 and
    everything else is float32, so the loss is the float64 loss of the rounded keys, to float32 precision; and
    that differs measurably from the loss of the embeddings themselves."""
    x, y = embeddings("normalised")
    scale, bias = SCALES["normalised"]
    rounded = lambda a: np.float32(a).astype(jnp.bfloat16).astype(np.float64)
    options = dict(ring=True, block_size=block_size, ring_dtype="bfloat16")
    if loss_name == "clip":
        assert_close(clip_reference_with_keys(x, y, scale, x, y), clip_reference(x, y, scale, 0.0), rtol=1e-12)
        loss = lambda x, y, scale, bias: clip_loss(x, y, scale, **options)
        exact_value, exact_grads = clip_reference(x, y, scale, 0.0)
        ref_value, ref_grads = clip_reference_with_keys(x, y, scale, rounded(x), rounded(y))
        ref_grads, exact_grads = (*ref_grads, 0.0), (*exact_grads, 0.0)
    else:
        loss = lambda x, y, scale, bias: siglip_loss(x, y, scale, bias, **options)
        exact_value, exact_grads = siglip_reference(x, y, scale, bias)
        ref_value, ref_grads = siglip_reference(x, rounded(y), scale, bias)
    # The rounding is visible at the tolerances below (else this test could not tell a ring without it).
    assert abs(ref_value - exact_value) > 3e-5 * abs(exact_value)
    with pytest.raises(AssertionError):
        assert_close(exact_grads, ref_grads)
    assert_global_arrays_match(loss, x, y, scale, bias, mesh_kind, ref_value, ref_grads)
