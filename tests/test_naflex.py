"""NaFlex (SigLIP 2): images at their own aspect ratio as padded patch sequences within a token budget.

The grid search against its definition, the preprocessing op against a direct patchify, and the ViT on patch
inputs against the same ViT on the images themselves (square and not), whatever the padding, sharded or not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import load_config
from jclip import models, parallel
from jclip.data import naflex, preprocess
from jclip.models.clip import CLIP
from jclip.models.summary import training_flops_per_pair
from jclip.models.vision import VisionTransformer, patch_positions, resize_positions
from jclip.train.loop import patch_input_example

PATCH = 4


@pytest.mark.parametrize("height, width, budget", [(224, 224, 196), (100, 300, 64), (300, 100, 64), (37, 53, 256),
                                                   (480, 640, 256), (10, 1000, 16), (1, 5000, 4), (5, 5, 1000)])
def test_the_grid_is_the_largest_that_fits_the_budget_at_the_image_aspect_ratio(height, width, budget):
    rows, columns = naflex.budget_grid(height, width, 16, budget).numpy()
    assert 1 <= rows * columns <= budget

    def grid_at(scale):
        return max(1, int(np.ceil(height * scale / 16))), max(1, int(np.ceil(width * scale / 16)))

    # The grid is that of some scale, and a slightly larger scale no longer fits (unless one side is capped).
    scales = np.geomspace(1e-4, 1e3, 20001)
    fitting = [s for s in scales if np.prod(grid_at(s)) <= budget]
    best = grid_at(max(fitting))
    assert (rows, columns) == tuple(min(side, budget) for side in best)


def test_the_naflex_op_cuts_the_resized_image_into_row_major_patches_padded_with_zeros():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    out = preprocess.parse(f"naflex({PATCH}, 40)")(tf.constant(image), tf.constant([0, 0], tf.int64))
    rows, columns = out["grid"].numpy()
    assert (rows, columns) == tuple(naflex.budget_grid(30, 50, PATCH, 40).numpy()) == (5, 8)
    resized = tf.image.resize(image, (rows * PATCH, columns * PATCH), antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
    expected = naflex.padded(naflex.image_patches(resized, PATCH), 40)
    assert out["patches"].dtype == tf.uint8 and out["patches"].shape == (40, PATCH, PATCH, 3)
    np.testing.assert_array_equal(out["patches"].numpy(), expected["patches"])
    assert not out["patches"].numpy()[rows * columns:].any()


def test_value_ops_after_naflex_map_the_patches_in_the_pipeline_and_on_the_devices():
    spec = f"decode|naflex({PATCH}, 16)|value_range(-1, 1)"
    once, per_image, per_batch = preprocess.stages(spec)
    assert [name for name, _ in once + per_image + per_batch] == ["decode", "naflex", "value_range"]
    image = tf.io.encode_png(np.full((8, 12, 3), 255, np.uint8))
    whole = preprocess.parse(spec)(image, tf.constant([0, 0], tf.int64))
    staged = preprocess.compose(once + per_image)(image, tf.constant([0, 0], tf.int64))
    finished = preprocess.batch_op(spec)({key: value.numpy()[None] for key, value in staged.items()})
    np.testing.assert_array_equal(finished["patches"][0], whole["patches"].numpy())
    np.testing.assert_array_equal(finished["grid"][0], whole["grid"].numpy())
    count = int(np.prod(whole["grid"].numpy()))  # 8 x 12 pixels scaled up to 3 x 5 patches
    assert count == 15
    assert whole["patches"].numpy()[:count].min() == 1.0 and whole["patches"].numpy()[count:].max() == -1.0


def test_evaluation_keeps_the_training_naflex_op_and_can_change_its_budget():
    training = f"decode|naflex({PATCH}, 16, 'bicubic')|value_range(-1, 1)"
    evaluation = preprocess.evaluation_spec(64, training)
    assert evaluation == training
    assert preprocess.with_max_patches(evaluation, 64) == f"decode|naflex({PATCH}, 64, 'bicubic')|value_range(-1, 1)"
    assert preprocess.example_input(evaluation, 64)["patches"].shape == (16, PATCH, PATCH, 3)
    with pytest.raises(ValueError, match="max_patches is for NaFlex models"):
        preprocess.with_max_patches("decode|resize(64)|value_range(-1, 1)", 64)


def test_per_image_positions_are_the_fixed_resolution_resize_for_every_grid():
    positions = np.random.default_rng(1).normal(size=(1, 1 + 36, 8)).astype(np.float32)
    grids = [(6, 6), (3, 9), (9, 4), (1, 12), (2, 2)]
    count = 40
    grid_positions = jnp.asarray(positions[0, 1:].reshape(6, 6, 8))
    per_image = jax.jit(patch_positions, static_argnums=2)(grid_positions, jnp.array(grids), count)
    for (rows, columns), got in zip(grids, per_image):
        expected = resize_positions(jnp.asarray(positions), 1, (rows, columns))[0, 1:]
        np.testing.assert_allclose(got[:rows * columns], expected, rtol=1e-5, atol=1e-6)


def tower(pool: str, registers: int = 0, **options):
    return VisionTransformer(embed_dim=16, patch_size=PATCH, width=32, depth=2, num_heads=4, pool=pool,
                             image_size=24, num_registers=registers, **options)


def patch_batch(images, budget):
    return naflex.stack([naflex.padded(naflex.image_patches(image, PATCH), budget) for image in images])


@pytest.mark.parametrize("pool, registers", [("cls", 0), ("map", 2), ("gap", 0)])
def test_a_patch_input_embeds_as_the_image_at_fixed_resolution_whatever_the_padding(pool, registers):
    rng = np.random.default_rng(2)
    vit = tower(pool, registers)
    square = rng.normal(size=(3, 24, 24, 3)).astype(np.float32)
    variables = vit.init(jax.random.key(0), square)
    apply = jax.jit(vit.apply)
    for images in (square, rng.normal(size=(3, 12, 32, 3)).astype(np.float32)):  # the trained size, and another
        fixed = apply(variables, images)
        count = (images.shape[1] // PATCH) * (images.shape[2] // PATCH)
        tight, loose = patch_batch(images, count), patch_batch(images, count + 17)
        np.testing.assert_allclose(apply(variables, tight), fixed, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(apply(variables, loose), fixed, rtol=1e-5, atol=1e-5)
        # What the padding holds changes nothing either.
        loose["patches"][:, count:] = rng.normal(size=loose["patches"][:, count:].shape)
        np.testing.assert_allclose(apply(variables, loose), fixed, rtol=1e-5, atol=1e-5)


def test_images_of_different_shapes_batch_together_each_as_it_embeds_alone():
    rng = np.random.default_rng(3)
    vit = tower("map", 1)
    variables = vit.init(jax.random.key(0), np.zeros((1, 24, 24, 3), np.float32))
    apply = jax.jit(vit.apply)
    images = [rng.normal(size=shape).astype(np.float32) for shape in [(24, 24, 3), (8, 40, 3), (36, 12, 3), (4, 4, 3)]]
    together = apply(variables, patch_batch(images, 40))
    for image, embedding in zip(images, together):
        np.testing.assert_allclose(embedding, apply(variables, image[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["jit", "explicit", "shard_map"])
def test_sharded_patch_batches_embed_as_unsharded_ones(mode):
    """Over 8 devices: a global batch that XLA partitions (under an auto or an explicit mesh), or per-device
    code as the train step runs it."""
    rng = np.random.default_rng(4)
    model = models.create("test-micro")
    images = [rng.normal(size=(16 * rng.integers(1, 5), 16 * rng.integers(1, 5), 3)).astype(np.float32)
              for _ in range(8)]
    batch = naflex.stack([naflex.padded(naflex.image_patches(image, 16), 16) for image in images])
    variables = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 16), np.int32))
    encode = lambda v, x: model.apply(v, x, method=model.encode_image)
    unsharded = jax.jit(encode)(variables, batch)
    axis_type = jax.sharding.AxisType.Explicit if mode == "explicit" else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((8,), (parallel.DATA_AXIS,), axis_types=(axis_type,))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P(parallel.DATA_AXIS)))
    if mode == "shard_map":
        encode = jax.shard_map(encode, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                               out_specs=P(parallel.DATA_AXIS))
    with jax.set_mesh(mesh):
        sharded = jax.jit(encode)(variables, sharded_batch)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-6)


def test_bad_patch_inputs_get_clear_errors():
    vit = tower("cls")
    variables = vit.init(jax.random.key(0), np.zeros((1, 24, 24, 3), np.float32))
    good = patch_batch([np.zeros((8, 8, 3), np.float32)], 8)
    with pytest.raises(ValueError, match=r"patches must be \[batch, max_patches, 4, 4, 3\]"):
        vit.apply(variables, {**good, "patches": np.zeros((1, 8, 8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match="a patch input has the keys 'patches' and 'grid'"):
        vit.apply(variables, {"patches": good["patches"]})
    with pytest.raises(ValueError, match="patch_dropout is not available with patch inputs"):
        tower("cls", patch_dropout=0.5).apply(variables, good, train=True, rngs={"patch_dropout": jax.random.key(1)})
    resnet = CLIP(vision=dict(type="resnet", layers=(1, 1, 1, 1), width=8, num_heads=2), embed_dim=16,
                  text=dict(vocab_size=64, context_length=16, width=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="patch inputs \\(NaFlex\\) need a ViT image tower"):
        resnet.init(jax.random.key(0), good, np.zeros((1, 16), np.int32))


def test_a_naflex_run_counts_the_flops_of_its_token_budget():
    """MFU and the planner count what the step computes: the budget's tokens, not image_size's."""
    model = models.create("test-micro")
    flops = {budget: training_flops_per_pair(model, (64, 64, 3), 16, naflex.example(16, budget))
             for budget in (16, 64)}
    fixed = training_flops_per_pair(model, (64, 64, 3), 16)  # 4 x 4 patches
    assert fixed < flops[16] < 1.02 * fixed  # the same 16 tokens, plus the per-image position resize
    assert flops[64] > 3 * flops[16]
    config = load_config("shapes_tiny")
    assert patch_input_example(config) is None
    config.data.preprocess = "decode|naflex(16, 64)|value_range(-1, 1)"
    example = patch_input_example(config)
    assert example["patches"].shape == (64, 16, 16, 3) and example["patches"].dtype == np.uint8
