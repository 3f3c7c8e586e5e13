"""The train step's options: FSDP, the configured objective, EMA, patch dropout, bf16, geometry metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_batch
from conftest import load_config
from helpers import assert_trees_close, assert_trees_equal, init_params
from jclip import losses, models, parallel
from jclip.models.summary import encoder_flops, training_flops_per_pair
from jclip.train.objective import make_objective
from jclip.train.optimizer import build_optimizer
from jclip.parameter_layout import named, parameter_specs
from jclip.train.state import create_train_state, state_layout
from jclip.train.step import make_gradient_step, make_train_step

IMAGE_SHAPE, LENGTH = (32, 32, 3), 16


@pytest.mark.parametrize("devices,micro_batches", [(2, 1), (8, 1), (8, 2)])
def test_fsdp_gradients_equal_single_device_gradients(devices, micro_batches):
    model = models.create("test-micro")
    batch = random_batch(16)
    params = init_params(model, batch)
    expected_loss, expected = make_gradient_step(model, parallel.make_mesh(1))(params, batch)
    mesh = parallel.make_mesh(devices)
    specs = parameter_specs(model, "fsdp", mesh, IMAGE_SHAPE, LENGTH)
    sharded = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) if s]
    assert len(sharded) > 10  # most kernels and embeddings are split over the devices
    step = make_gradient_step(model, mesh, micro_batches=micro_batches, param_specs=specs)
    loss, grads = step(jax.device_put(params, named(specs, mesh)), parallel.global_batch(batch, mesh))
    kernel = grads["image_tower"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]
    expected_sharding = named(specs, mesh)["image_tower"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]
    assert kernel.sharding.is_equivalent_to(expected_sharding, kernel.ndim) and not kernel.sharding.is_fully_replicated
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert_trees_close(grads, expected, rtol=1e-4, atol_fraction=1e-6)


@pytest.mark.parametrize("optimizer_name", ["lamb", "adafactor"])
def test_fsdp_training_equals_data_parallel_training(optimizer_name):
    """Sharded optimizer state, global-norm clipping, LAMB's trust ratios, Adafactor's factored moments:
    all as with replicated params. (AdamW: tests/test_multiprocess.py, across processes.)"""
    config = load_config("shapes_tiny")
    config.optimizer.name = optimizer_name
    config.optimizer.grad_clip_norm = 0.05  # small enough to clip: the global norm spans all shards
    config.optimizer.warmup_steps = 1
    config.total_steps = 10
    model = models.create("test-micro")
    optimizer = build_optimizer(config)
    mesh = parallel.make_mesh(8)
    results = {}
    for sharding in ("replicated", "fsdp"):
        layout = state_layout(model, optimizer, IMAGE_SHAPE, LENGTH, mesh, sharding)
        state = create_train_state(layout, jax.random.key(0))
        step = make_train_step(layout)
        for seed in range(3):
            state, metrics = step(state, parallel.global_batch(random_batch(16, seed=seed), mesh))
        results[sharding] = (jax.device_get(state.params), float(metrics["grad_norm"]))
        if sharding == "fsdp" and optimizer_name != "adafactor":
            moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2 and x.shape[-1] % 8 == 0]
            assert any(not x.sharding.is_fully_replicated for x in moments)
    assert results["replicated"][1] > config.optimizer.grad_clip_norm
    np.testing.assert_allclose(results["fsdp"][1], results["replicated"][1], rtol=1e-4)
    assert_trees_close(results["fsdp"][0], results["replicated"][0], rtol=1e-3, atol_fraction=1e-6)


def test_objective_is_the_weighted_sum_of_configured_losses():
    rng = np.random.default_rng(0)
    zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 8, 4)))
    out = {"zimg": jnp.asarray(zimg), "ztxt": jnp.asarray(ztxt), "scale": 10.0, "bias": -3.0}
    objective = make_objective({"clip": {"weight": 0.5, "label_smoothing": 0.1}, "siglip": {"weight": 2.0}},
                               axis_name=None)
    total, terms = objective(out, {}, jax.random.key(0))
    clip = losses.clip_loss(out["zimg"], out["ztxt"], 10.0, label_smoothing=0.1)
    siglip = losses.siglip_loss(out["zimg"], out["ztxt"], 10.0, -3.0)
    np.testing.assert_allclose(terms["loss_clip"], clip, rtol=1e-6)
    np.testing.assert_allclose(total, 0.5 * clip + 2.0 * siglip, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss 'infonce'.*'clip'.*'siglip'"):
        make_objective({"infonce": {}}, None)
    with pytest.raises(ValueError, match=r"config.losses.clip has unknown option\(s\) \['smoothing'\].*label_smoothing"):
        make_objective({"clip": {"smoothing": 0.1}}, None)
    without_bias = {k: v for k, v in out.items() if k != "bias"}
    with pytest.raises(ValueError, match="'siglip' loss needs 'bias'.*set config.model.init_bias"):
        make_objective({"siglip": {}}, None)(without_bias, {}, jax.random.key(0))


@pytest.mark.parametrize("ring_dtype", [None, "bfloat16"])
def test_sigmoid_objective_trains_the_bias_with_a_ring_loss(ring_dtype):
    model = models.create("test-micro", init_bias=-10.0, init_scale=10.0)
    batch = random_batch(16)
    params = init_params(model, batch)
    loss_spec = {"siglip": {"weight": 1.0, "ring": True, **({"ring_dtype": ring_dtype} if ring_dtype else {})}}
    loss_1, grads_1 = make_gradient_step(model, parallel.make_mesh(1), loss_spec)(params, batch)
    mesh = parallel.make_mesh(8)
    loss_8, grads_8 = make_gradient_step(model, mesh, loss_spec)(params, parallel.global_batch(batch, mesh))
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    assert abs(float(grads_1["logit_bias"])) > 0
    assert_trees_close(grads_8, grads_1, rtol=1e-4, atol_fraction=1e-6)


def test_ema_follows_the_parameters():
    config = load_config("shapes_tiny")
    model = models.create("test-micro")
    optimizer = build_optimizer(config)
    mesh = parallel.make_mesh(2)
    layout = state_layout(model, optimizer, IMAGE_SHAPE, LENGTH, mesh, ema=True)
    state = create_train_state(layout, jax.random.key(0))
    initial = jax.device_get(state.params)
    assert_trees_equal(state.ema_params, initial)
    step = make_train_step(layout, ema_decay=0.9)
    expected = initial
    for seed in range(3):
        state, _ = step(state, parallel.global_batch(random_batch(8, seed=seed), mesh))
        expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, jax.device_get(state.params))
    assert_trees_close(state.ema_params, expected, rtol=1e-5, atol=1e-7)
    params, ema = jax.device_get((state.params, state.ema_params))
    assert not np.allclose(params["text_tower"]["proj"]["kernel"], initial["text_tower"]["proj"]["kernel"])
    assert not np.allclose(ema["text_tower"]["proj"]["kernel"], params["text_tower"]["proj"]["kernel"])


def test_patch_dropout_changes_gradients_and_trains_in_bfloat16():
    """Patch dropout draws a new mask each step (the step's rng); bf16 compute trains."""
    batch = random_batch(16)
    mesh = parallel.make_mesh(2)
    vision = {**models.model_config("test-micro")["vision"], "patch_dropout": 0.5}
    grads = {}
    for name, model in (("plain", models.create("test-micro")),
                        ("dropped", models.create("test-micro", vision=vision))):
        _, grads[name] = make_gradient_step(model, mesh)(init_params(model, batch), parallel.global_batch(batch, mesh))
    position_grads = [g["image_tower"]["pos_embedding"] for g in grads.values()]
    assert not np.allclose(*position_grads)
    model = models.create("test-micro", dtype="bfloat16", vision=vision)
    optimizer = build_optimizer(load_config("shapes_tiny"))
    layout = state_layout(model, optimizer, IMAGE_SHAPE, LENGTH, mesh)
    state = create_train_state(layout, jax.random.key(0))
    step = make_train_step(layout)
    losses_seen = []
    for _ in range(2):  # the same batch twice: a new dropout mask makes another loss
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        losses_seen.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses_seen)) and losses_seen[0] != losses_seen[1]


def test_embedding_geometry_matches_numpy_and_is_the_same_sharded():
    rng = np.random.default_rng(1)
    zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 16, 6)))
    zimg = zimg + 0.3  # a gap between the modalities
    geometry = losses.embedding_geometry(jnp.asarray(zimg), jnp.asarray(ztxt))

    def uniformity(u):
        squared = ((u[:, None] - u[None]) ** 2).sum(-1)
        return np.log(np.exp(-2 * squared)[~np.eye(len(u), dtype=bool)].mean())

    expected = {"alignment": ((zimg - ztxt) ** 2).sum(1).mean(), "uniformity_image": uniformity(zimg),
                "uniformity_text": uniformity(ztxt),
                "modality_gap": np.linalg.norm(zimg.mean(0) - ztxt.mean(0))}
    for name, value in expected.items():
        np.testing.assert_allclose(geometry[name], value, rtol=1e-5, err_msg=name)
    mesh = parallel.make_mesh(8)
    sharded = jax.jit(jax.shard_map(lambda a, b: losses.embedding_geometry(a, b, axis_name="data"), mesh=mesh,
                                    in_specs=(jax.sharding.PartitionSpec("data"),) * 2,
                                    out_specs=jax.sharding.PartitionSpec()))(zimg, ztxt)
    for name, value in expected.items():
        np.testing.assert_allclose(sharded[name], value, rtol=1e-5, err_msg=name)


def test_the_step_applies_the_per_pixel_ops_to_uint8_images_on_the_devices():
    """The input pipeline hands over uint8 images; the step normalises each micro-batch as the host would."""
    from jclip.data import preprocess

    normalize = preprocess.batch_op("decode|flip_lr|clip_normalize")
    model = models.create("test-micro")
    optimizer = build_optimizer(load_config("shapes_tiny"))
    mesh = parallel.make_mesh(2)
    batch = random_batch(8)
    pixels = np.random.default_rng(0).integers(0, 256, (8, *IMAGE_SHAPE), dtype=np.uint8)
    results = []
    for images, image_op in ((normalize(pixels), None), (pixels, normalize)):
        layout = state_layout(model, optimizer, IMAGE_SHAPE, LENGTH, mesh)
        state = create_train_state(layout, jax.random.key(0))
        step = make_train_step(layout, micro_batches=2, image_op=image_op)
        state, metrics = step(state, parallel.global_batch({**batch, "image": images}, mesh))
        results.append(jax.device_get((state.params, metrics)))
    assert_trees_close(results[1], results[0], rtol=1e-6, atol_fraction=1e-7)


def test_frozen_groups_train_as_before_without_computing_their_gradients():
    """LiT's locked image tower: the same updates as when the optimizer alone keeps it fixed, and a compiled step
    without the tower's backward pass (about twice its forward pass in FLOPs)."""
    config = load_config("shapes_tiny")
    config.optimizer.frozen = ("image_tower",)
    config.optimizer.warmup_steps = 1
    model = models.create("test-micro")
    mesh = parallel.make_mesh(8)
    layout = state_layout(model, build_optimizer(config), IMAGE_SHAPE, LENGTH, mesh, "replicated")
    batch = parallel.global_batch(random_batch(16), mesh)
    results, flops = {}, {}
    for frozen in ((), ("image_tower",)):
        step = make_train_step(layout, frozen=frozen)
        state = create_train_state(layout, jax.random.key(0))
        flops[frozen] = step.lower(state, batch).compile().cost_analysis()["flops"]
        for _ in range(2):
            state, metrics = step(state, batch)
        results[frozen] = jax.device_get(state.params)
    assert_trees_close(results[("image_tower",)], results[()], rtol=1e-6, atol_fraction=1e-7)
    initial = jax.device_get(create_train_state(layout, jax.random.key(0)).params)
    assert_trees_equal(results[("image_tower",)]["image_tower"], initial["image_tower"])
    # The step's cost analysis counts one device's share: 2 of the 16 pairs.
    images = jax.ShapeDtypeStruct((2, *IMAGE_SHAPE), jnp.float32)
    image_forward, _ = encoder_flops(model, images, jax.ShapeDtypeStruct((2, LENGTH), jnp.int32))
    assert flops[()] - flops[("image_tower",)] > 1.2 * image_forward
    # MFU counts the same: the locked tower's forward pass once, not three times.
    full, locked = (training_flops_per_pair(model, IMAGE_SHAPE, LENGTH, frozen=frozen) for frozen in flops)
    assert full - locked == pytest.approx(image_forward, rel=1e-2)  # 2 passes fewer per pair; image_forward: 2 pairs
