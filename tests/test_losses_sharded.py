"""Per-device losses under pmap and shard_map on 1, 2 and 8 devices, and on global arrays over a mesh:
gathered, ring, blocked.

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

from helpers import assert_trees_close
from jclip.losses import blocks, clip_loss, embedding_geometry, logits, siglip_loss, top1_accuracy
from loss_checks import MESH_KINDS

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


def make_mesh(devices, kind="auto"):
    return jax.make_mesh((devices,), ("data",), axis_types=(MESH_KINDS[kind],))


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


# Within 2e-5, and absolutely within 2e-5 times each leaf's largest entry.
assert_close = functools.partial(assert_trees_close, rtol=2e-5, atol_fraction=2e-5, per_leaf=True)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("devices", [1, 2, 8])
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_per_device_loss_equals_single_device(mode, devices, loss_name, tiling):
    result = per_device(mode, devices, LOSSES[loss_name], **TILINGS[tiling])(*data())
    assert_close(result, single_device(loss_name))


@pytest.mark.parametrize("tiling", ["gathered+blocks", "ring+blocks"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("devices", [1, 2, 8])
def test_tiles_of_query_rows_give_the_same_value_and_gradients(monkeypatch, devices, loss_name, tiling):
    """Tiles of two blocks' worth of query rows (four rows at block size 2): a device's rows in several tiles,
    each tile's log-sum-exp, value and gradients added in place."""
    monkeypatch.setattr(blocks, "QUERY_TILE_BLOCKS", 2)
    assert blocks._query_tile(BATCH // devices, 2) == 4
    result = per_device("shard_map", devices, LOSSES[loss_name], **TILINGS[tiling])(*data())
    assert_close(result, single_device(loss_name))


@functools.cache
def bfloat16_ring_on_one_device(loss_name):
    return per_device("shard_map", 1, LOSSES[loss_name], ring=True, ring_dtype="bfloat16")(*data())


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_a_bfloat16_ring_gives_the_same_value_and_gradients_on_any_number_of_devices(mode, devices, loss_name):
    """Every key enters the logits rounded, its own device's block too, so the split does not change the loss
    (`test_losses_reference` checks that loss against float64)."""
    result = per_device(mode, devices, LOSSES[loss_name], ring=True, block_size=2, ring_dtype="bfloat16")(*data())
    assert_close(result, bfloat16_ring_on_one_device(loss_name))


@pytest.mark.parametrize("tiling", ["gathered", "ring"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_unchecked_shard_map_follows_the_pmap_convention(loss_name, tiling):
    result = per_device("shard_map_unchecked", 8, LOSSES[loss_name], **TILINGS[tiling])(*data())
    assert_close(result, single_device(loss_name))


@pytest.mark.parametrize("mesh_kind", MESH_KINDS)
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_global_arrays_on_a_mesh_equal_single_device(loss_name, tiling, mesh_kind):
    """A model's batch split over an explicit or auto mesh and `axis_name=None`, as in users' own jitted
    code: the loss runs per device over the mesh, and a ring works too."""
    params, images, texts = data()
    mesh = make_mesh(8, mesh_kind)
    params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated; their gradients too
    images, texts = jax.device_put((images, texts), NamedSharding(mesh, P("data")))
    result = jax.jit(functools.partial(step, LOSSES[loss_name], **TILINGS[tiling]))(params, images, texts)
    assert_close(result, single_device(loss_name))


@pytest.mark.parametrize("batch_axes", ["data", ("data", "model")])
def test_global_arrays_on_a_two_axis_mesh(batch_axes):
    """Embeddings split over 'data' and 'model' (batch and features, or the batch over both axes)."""
    zimg, ztxt, scale, bias = model(*data())
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    spec = P("data", "model") if batch_axes == "data" else P(batch_axes)
    sharded = [jax.device_put(z, NamedSharding(mesh, spec)) for z in (zimg, ztxt)]
    for name, loss in LOSSES.items():
        grad = jax.jit(jax.value_and_grad(lambda z, t: loss(z, t, scale, bias, ring=True), argnums=(0, 1)))
        value, grads = grad(*sharded)
        expected = jax.value_and_grad(lambda z, t: loss(z, t, scale, bias), argnums=(0, 1))(zimg, ztxt)
        assert_close((value, grads), expected)
        assert all(g.sharding.is_equivalent_to(z.sharding, 2) for g, z in zip(grads, sharded)), name


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_inside_pmap_or_shard_map_without_axis_name_the_local_rows_are_the_batch(mode):
    zimg, ztxt, scale, bias = model(*data())
    local = lambda z, t: clip_loss(z, t, scale)
    if mode == "pmap":
        values = jax.pmap(local)(zimg.reshape(8, -1, DIM), ztxt.reshape(8, -1, DIM))
    else:
        values = jax.jit(jax.shard_map(lambda z, t: local(z, t)[None], mesh=make_mesh(8), in_specs=P("data"),
                                       out_specs=P("data")))(zimg, ztxt)
    expected = [local(z, t) for z, t in zip(zimg.reshape(8, -1, DIM), ztxt.reshape(8, -1, DIM))]
    assert_close(values, np.array(expected))


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


@pytest.mark.parametrize("mode", ["shard_map", "pmap", "explicit", "auto"])
def test_metrics_per_device_equal_whole_batch(mode):
    """Per device, or on global arrays over an explicit or auto mesh: the whole batch's metrics."""
    params, images, texts = data()
    zimg, ztxt, scale, bias = model(params, images, texts)

    def local(zimg, ztxt, axis_name="data"):
        return (logits(zimg, ztxt, scale, bias, axis_name=axis_name), top1_accuracy(zimg, ztxt, axis_name=axis_name),
                embedding_geometry(zimg, ztxt, axis_name=axis_name))

    if mode == "pmap":
        shard = lambda x: x.reshape(8, -1, x.shape[1])
        local_logits, accuracy, geometry = jax.pmap(local, axis_name="data")(shard(zimg), shard(ztxt))
        local_logits = local_logits.reshape(BATCH, BATCH)
        accuracy, geometry = jax.tree.map(lambda x: x[0], (accuracy, geometry))
    elif mode == "shard_map":
        local_logits, accuracy, geometry = jax.jit(
            jax.shard_map(local, mesh=make_mesh(8), in_specs=P("data"), out_specs=(P("data"), P(), P()))
        )(zimg, ztxt)
    else:
        sharded = jax.device_put((zimg, ztxt), NamedSharding(make_mesh(8, mode), P("data")))
        local_logits, accuracy, geometry = jax.jit(functools.partial(local, axis_name=None))(*sharded)
        assert local_logits.sharding.is_equivalent_to(sharded[0].sharding, 2)  # each device its own rows
    assert_close(local_logits, logits(zimg, ztxt, scale, bias))
    assert_close(accuracy, top1_accuracy(zimg, ztxt))
    assert_close(geometry, embedding_geometry(zimg, ztxt))


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


@pytest.mark.parametrize("mesh_kind", MESH_KINDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_global_arrays_hold_only_their_rows_of_logits(loss_name, mesh_kind):
    """Compiled temporary memory per device of forward + backward on global arrays (`axis_name=None`):
    each device's own [B/N, B] rows of logits and their gradient, never the [B, B] matrix or a
    gathered copy of the queries; a [B/N, block] tile with `block_size`."""
    batch, devices = 4096, 8
    embeddings = jax.ShapeDtypeStruct((batch, DIM), jnp.float32, sharding=NamedSharding(make_mesh(devices, mesh_kind),
                                                                                          P("data")))
    rows_bytes = batch // devices * batch * 4  # one [B/N, B] float32 matrix: 1/8 of the whole logits
    embedding_bytes = batch * DIM * 4

    def temp_bytes(**kwargs):
        loss = lambda zimg, ztxt: LOSSES[loss_name](zimg, ztxt, 10.0, -10.0, **kwargs)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(embeddings, embeddings).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes() <= 2 * rows_bytes + 8 * embedding_bytes
    assert temp_bytes(block_size=64) < rows_bytes / 4
    assert temp_bytes(ring=True) < rows_bytes / 4
