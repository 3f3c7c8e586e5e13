"""Per-device losses under pmap and shard_map on 2 and 8 devices: gathered, ring, blocked.

Every variant must give the single-device full-batch value and gradients: for the parameters of a
small replicated model, and for the loss's inputs zimg, ztxt, scale and bias. The conventions are
the documented ones: under shard_map (check_vma=True) `jax.grad` is the global gradient as it is;
under pmap and shard_map with check_vma=False, replicated values (params, scale, bias) take
`lax.pmean` of their gradients, and the local embeddings' gradients are N times the global loss's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip.losses import clip_loss, logits, siglip_loss, top1_accuracy

BATCH, INPUT_DIM, DIM = 32, 6, 8
LOSSES = {
    "clip": lambda zimg, ztxt, scale, bias, **kw: clip_loss(zimg, ztxt, scale, label_smoothing=0.1, **kw),
    "siglip": siglip_loss,
}
TILINGS = {
    "gathered": {},
    "gathered+blocks": {"block_size": 4},
    "ring": {"ring": True},
    "ring+blocks": {"ring": True, "block_size": 2},
}


def model(params, images, texts):
    """A linear head per tower and normalisation; scale = exp(t) and the bias are parameters."""
    normalise = lambda z: z / jnp.linalg.norm(z, axis=1, keepdims=True)
    return normalise(images @ params["img"]), normalise(texts @ params["txt"]), jnp.exp(params["t"]), params["b"]


def data():
    rng = np.random.default_rng(0)
    images, noise = rng.normal(size=(2, BATCH, INPUT_DIM)).astype(np.float32)
    params = {
        "img": rng.normal(size=(INPUT_DIM, DIM)).astype(np.float32),
        "txt": rng.normal(size=(INPUT_DIM, DIM)).astype(np.float32),
        "t": np.float32(np.log(5.0)),
        "b": np.float32(-2.0),
    }
    return params, images, images + 0.5 * noise


def step(loss, params, images, texts, *, mean_over=None, **kwargs):
    """Loss, parameter gradients, and gradients w.r.t. the loss's inputs (zimg, ztxt, scale, bias).

    `mean_over`: the axis over which replicated values' gradients are averaged (pmap convention).
    """
    value, param_grads = jax.value_and_grad(lambda p: loss(*model(p, images, texts), **kwargs))(params)
    dzimg, dztxt, dscale, dbias = jax.grad(lambda *z: loss(*z, **kwargs), argnums=(0, 1, 2, 3))(*model(params, images, texts))
    if mean_over is not None:
        param_grads, dscale, dbias = lax.pmean((param_grads, dscale, dbias), mean_over)
    return value, param_grads, (dzimg, dztxt, dscale, dbias)


@functools.cache
def single_device(loss_name):
    return jax.jit(functools.partial(step, LOSSES[loss_name]))(*data())


def make_mesh(devices):
    return jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def per_device(mode, devices, loss, **kwargs):
    """`step` run per device over axis "data"; returns the value and gradients as global arrays,
    the local-embedding gradients already divided by N where the convention says so."""
    if mode == "pmap":
        fn = jax.pmap(
            functools.partial(step, loss, axis_name="data", mean_over="data", **kwargs),
            axis_name="data", in_axes=(None, 0, 0), devices=jax.devices()[:devices],
        )

        def run(params, images, texts):
            shard = lambda x: x.reshape(devices, -1, *x.shape[1:])
            value, param_grads, (dzimg, dztxt, dscale, dbias) = fn(params, shard(images), shard(texts))
            first = lambda tree: jax.tree.map(lambda x: x[0], tree)
            unshard = lambda x: x.reshape(-1, *x.shape[2:]) / devices
            return first(value), first(param_grads), (unshard(dzimg), unshard(dztxt), dscale[0], dbias[0])

        return run
    checked = mode == "shard_map"
    local = functools.partial(step, loss, axis_name="data", mean_over=None if checked else "data", **kwargs)
    fn = jax.jit(
        jax.shard_map(
            local, mesh=make_mesh(devices), in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P(), (P("data"), P("data"), P(), P())), check_vma=checked,
        )
    )
    if checked:
        return fn

    def run(params, images, texts):
        value, param_grads, (dzimg, dztxt, dscale, dbias) = fn(params, images, texts)
        return value, param_grads, (dzimg / devices, dztxt / devices, dscale, dbias)

    return run


def assert_close(actual, expected, rtol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.max(np.abs(e)))


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_per_device_loss_equals_single_device(mode, devices, loss_name, tiling):
    result = per_device(mode, devices, LOSSES[loss_name], **TILINGS[tiling])(*data())
    assert_close(result, single_device(loss_name))


@pytest.mark.parametrize("tiling", ["gathered", "ring"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_unchecked_shard_map_follows_the_pmap_convention(loss_name, tiling):
    result = per_device("shard_map_unchecked", 8, LOSSES[loss_name], **TILINGS[tiling])(*data())
    assert_close(result, single_device(loss_name))


@pytest.mark.parametrize("tiling", ["gathered", "gathered+blocks"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_global_arrays_partitioned_by_xla(loss_name, tiling):
    params, images, texts = data()
    sharding = NamedSharding(make_mesh(8), P("data"))
    images, texts = jax.device_put(images, sharding), jax.device_put(texts, sharding)
    result = jax.jit(functools.partial(step, LOSSES[loss_name], **TILINGS[tiling]))(params, images, texts)
    assert_close(result, single_device(loss_name))


def gradient_cut_clip_loss(zimg, ztxt, scale, bias, *, axis_name):
    """The classic mistake: local rows against gathered columns with no gradient through the gather."""
    gather = lambda z: lax.stop_gradient(lax.all_gather(z, axis_name, tiled=True))
    first = lax.axis_index(axis_name) * zimg.shape[0] + jnp.arange(zimg.shape[0])

    def cross_entropy(rows, columns):
        logit = scale * rows @ gather(columns).T
        return jax.nn.logsumexp(logit, axis=1) - jnp.take_along_axis(logit, first[:, None], axis=1)[:, 0]

    local = jnp.sum(cross_entropy(zimg, ztxt) + cross_entropy(ztxt, zimg))
    return lax.psum(local, axis_name) / (2 * zimg.shape[0] * lax.axis_size(axis_name))


def test_cutting_the_gradient_through_the_gather_is_detected():
    plain_clip = lambda zimg, ztxt, scale, bias, **kw: clip_loss(zimg, ztxt, scale, **kw)
    expected = jax.jit(functools.partial(step, plain_clip))(*data())
    value, param_grads, input_grads = per_device("shard_map", 8, gradient_cut_clip_loss)(*data())
    assert_close(value, expected[0])  # the value is right ...
    with pytest.raises(AssertionError):  # ... the gradients are not
        assert_close(param_grads, expected[1])


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_metrics_per_device_equal_whole_batch(mode):
    params, images, texts = data()
    zimg, ztxt, scale, bias = model(params, images, texts)

    def local(zimg, ztxt):
        return logits(zimg, ztxt, scale, bias, axis_name="data"), top1_accuracy(zimg, ztxt, axis_name="data")

    if mode == "pmap":
        shard = lambda x: x.reshape(8, -1, x.shape[1])
        local_logits, accuracy = jax.pmap(local, axis_name="data")(shard(zimg), shard(ztxt))
        local_logits, accuracy = local_logits.reshape(BATCH, BATCH), jax.tree.map(lambda x: x[0], accuracy)
    else:
        local_logits, accuracy = jax.jit(
            jax.shard_map(local, mesh=make_mesh(8), in_specs=P("data"), out_specs=(P("data"), P()))
        )(zimg, ztxt)
    assert_close(local_logits, logits(zimg, ztxt, scale, bias))
    assert_close(accuracy, top1_accuracy(zimg, ztxt))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_tiled_losses_never_hold_the_local_logits(loss_name):
    """Compiled temporary memory per device of forward + backward, against one [b, B] logits matrix."""
    batch, devices = 2048, 8
    embeddings = jax.ShapeDtypeStruct((batch, DIM), jnp.float32)
    logits_bytes = batch // devices * batch * 4

    def temp_bytes(**kwargs):
        loss = lambda zimg, ztxt: LOSSES[loss_name](zimg, ztxt, 10.0, -10.0, axis_name="data", **kwargs)
        grad = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=make_mesh(devices), in_specs=P("data"), out_specs=P("data"))
        return jax.jit(grad).lower(embeddings, embeddings).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes() >= logits_bytes
    assert temp_bytes(block_size=64) < logits_bytes / 4
    assert temp_bytes(ring=True) < logits_bytes / 4  # one [b, b] tile is 1/8 of the logits
    assert temp_bytes(ring=True, block_size=16) < logits_bytes / 16
