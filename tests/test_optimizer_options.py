"""The optimizer's options: layer-wise learning-rate decay (BEiT) and Muon, alone, together with frozen groups,
per-group rates, clipping and the schedule, in training runs and on resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import MuonDimensionNumbers

from batches import random_batch
from conftest import load_config
from helpers import assert_trees_equal, init_params, read_metrics
from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.parameter_layout import parameter_name, parameter_shapes
from jclip.train.loop import train
from jclip.train.optimizer import build_optimizer, layer_decay_multipliers, layer_ids, muon_dimension_numbers
from jclip.train.state import state_layout

DECAY = 0.7
IMAGE_DEPTH, TEXT_DEPTH = 3, 2  # towers of different depths, each decayed over its own


def flat(tree) -> dict:
    """A tree's leaves (arrays, Muon's dimension numbers or None) by parameter name
    ("image_tower/encoder/block_0/mlp/fc/kernel")."""
    is_leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)
    return {parameter_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


@pytest.fixture(scope="module")
def params():
    model = models.create("test-micro", vision={"depth": IMAGE_DEPTH}, text={"depth": TEXT_DEPTH})
    return init_params(model, random_batch(2))


def optimizer_config(**options):
    """The demo's optimizer, at a constant rate after 2 warm-up steps, without clipping unless `options` say."""
    config = load_config("shapes_tiny")
    config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 2
    config.optimizer.grad_clip_norm = float("inf")
    for key, value in options.items():
        config.optimizer[key] = value
    return config


def third_update(config, params, grads):
    """The update of the third step (the first after warm-up) for the same gradients and parameters each step."""
    optimizer = build_optimizer(config)
    state = optimizer.init(params)
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
    return jax.device_get(updates)


# Layer ids (BEiT: embeddings 0, block_i i + 1, the rest L + 1) of some parameters, and each tower's depth L.
EXPECTED_LAYER_IDS = {
    "ViT-B-16-SigLIP": ({"image_tower": 12, "text_tower": 12, "logit_scale": 0, "logit_bias": 0}, {
        "image_tower/patch_embed/kernel": 0, "image_tower/pos_embedding": 0,
        "image_tower/encoder/block_0/attn/query/kernel": 1, "image_tower/encoder/block_9/mlp/fc/bias": 10,
        "image_tower/encoder/block_10/ln_1/scale": 11, "image_tower/encoder/block_11/mlp/proj/kernel": 12,
        "image_tower/ln_post/scale": 13, "image_tower/map_head/latent": 13, "image_tower/map_head/mlp/fc/kernel": 13,
        "text_tower/token_embedding/embedding": 0, "text_tower/pos_embedding": 0, "text_tower/proj/bias": 13,
        "logit_scale": 1, "logit_bias": 1}),
    "shapes-tiny": ({"image_tower": 4, "text_tower": 2, "logit_scale": 0}, {
        "image_tower/conv_stem/conv_0/kernel": 0, "image_tower/conv_stem/proj/kernel": 0, "image_tower/cls_token": 0,
        "image_tower/ln_pre/scale": 0, "image_tower/encoder/block_3/attn/out/kernel": 4, "image_tower/proj/kernel": 5,
        "text_tower/encoder/block_1/ln_2/scale": 2, "text_tower/ln_final/bias": 3}),
    "coca-test-micro": ({"image_tower": 1, "text_tower": 1, "text_decoder": 1, "logit_scale": 0}, {
        "image_tower/pooler/query": 2, "image_tower/pooler/attn/key/kernel": 2, "text_tower/cls_token": 0,
        "text_decoder/block_0/mlp/fc/kernel": 1, "text_decoder/cross_0/attn/query/kernel": 1,
        "text_decoder/ln_final/scale": 2, "text_decoder/proj/kernel": 2}),
    "RN50": ({"image_tower": 3 + 4 + 6 + 3, "text_tower": 12, "logit_scale": 0}, {  # a ResNet's residual blocks
        "image_tower/stem_conv1/kernel": 0, "image_tower/stem_bn3/scale": 0, "image_tower/layer1_0/conv1/kernel": 1,
        "image_tower/layer1_2/bn3/bias": 3, "image_tower/layer2_0/downsample/kernel": 4,
        "image_tower/layer4_2/conv3/kernel": 16, "image_tower/attnpool/pos_embedding": 17,
        "image_tower/attnpool/attn/out/kernel": 17}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYER_IDS))
def test_layer_ids_of_the_models(name):
    config = models.model_config(name)
    size = config["vision"].get("image_size", 64)
    shapes = parameter_shapes(models.create(name), (size, size, 3), config["text"]["context_length"])
    expected_depths, expected_ids = EXPECTED_LAYER_IDS[name]
    ids, depths = layer_ids(shapes)
    assert depths == expected_depths
    assert {key: flat(ids)[key] for key in expected_ids} == expected_ids


def test_register_tokens_are_embeddings():
    tower = {"registers": np.zeros((1, 4, 8)), "cls_token": np.zeros((1, 1, 8)),
             "encoder": {"block_0": {"mlp": {"fc": {"kernel": np.zeros((8, 8))}}}}, "ln_post": {"scale": np.ones(8)}}
    ids, depths = layer_ids({"image_tower": tower})
    assert depths == {"image_tower": 1}
    assert flat(ids) == {"image_tower/registers": 0, "image_tower/cls_token": 0,
                         "image_tower/encoder/block_0/mlp/fc/kernel": 1, "image_tower/ln_post/scale": 2}


def test_layer_decay_multiplies_each_layers_rate(params):
    """The update of a step after warm-up, with decay over without: layer_decay ** (L + 1 - layer_id) for each
    parameter, L the depth of its own tower; the optimizer state is the same as without decay."""
    grads = jax.tree.map(jnp.ones_like, params)
    plain = flat(third_update(optimizer_config(), params, grads))
    decayed = flat(third_update(optimizer_config(layer_decay=DECAY), params, grads))
    exponents = {
        "image_tower/patch_embed/kernel": IMAGE_DEPTH + 1, "image_tower/cls_token": IMAGE_DEPTH + 1,
        "image_tower/pos_embedding": IMAGE_DEPTH + 1, "image_tower/ln_pre/scale": IMAGE_DEPTH + 1,
        "image_tower/encoder/block_0/mlp/fc/kernel": IMAGE_DEPTH,
        "image_tower/encoder/block_1/attn/query/kernel": IMAGE_DEPTH - 1,
        "image_tower/encoder/block_2/attn/out/kernel": 1, "image_tower/encoder/block_2/ln_2/bias": 1,
        "image_tower/ln_post/scale": 0, "image_tower/proj/kernel": 0,
        "text_tower/token_embedding/embedding": TEXT_DEPTH + 1, "text_tower/pos_embedding": TEXT_DEPTH + 1,
        "text_tower/encoder/block_0/mlp/proj/kernel": TEXT_DEPTH, "text_tower/encoder/block_1/attn/key/kernel": 1,
        "text_tower/ln_final/scale": 0, "text_tower/proj/kernel": 0, "logit_scale": 0}
    for name, exponent in exponents.items():
        assert np.abs(plain[name]).min() > 0, name
        np.testing.assert_allclose(decayed[name], plain[name] * DECAY**exponent, rtol=1e-6, err_msg=name)
    multipliers = flat(layer_decay_multipliers(params, DECAY))
    for name, update in plain.items():
        np.testing.assert_allclose(decayed[name], update * multipliers[name], rtol=1e-6, err_msg=name)
    states = [jax.eval_shape(build_optimizer(config).init, params)
              for config in (optimizer_config(), optimizer_config(layer_decay=DECAY))]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])  # a run resumes with or without decay
    assert jax.tree.leaves(states[0]) == jax.tree.leaves(states[1])


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor", "muon"])
def test_layer_decay_composes_with_frozen_groups_rates_and_clipping(params, name):
    """Per-group rates and layer decay multiply what a frozen group and clipping (counted without the frozen group)
    give, for every optimizer, since each ends by scaling by the learning rate."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)  # a global norm above grad_clip_norm
    options = dict(name=name, frozen=("image_tower",), grad_clip_norm=1.0)
    group_rates = {"text_tower": 0.5, "logit_scale": 2.0}
    plain = flat(third_update(optimizer_config(**options), params, grads))
    updates = flat(third_update(optimizer_config(**options, lr_multipliers=group_rates, layer_decay=DECAY), params,
                                grads))
    layer_rates = flat(layer_decay_multipliers(params, DECAY))
    for key, update in updates.items():
        expected = plain[key] * group_rates.get(key.split("/")[0], 1.0) * layer_rates[key]
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-12, err_msg=key)
        assert np.abs(update).max() == 0 if key.startswith("image_tower/") else np.abs(update).max() > 0, key
    assert layer_rates["text_tower/encoder/block_0/mlp/fc/kernel"] == DECAY**TEXT_DEPTH


def test_muon_trains_the_block_matrices_and_adamw_the_rest(params):
    dims = flat(muon_dimension_numbers(params))
    block = "image_tower/encoder/block_0"
    assert dims[f"{block}/mlp/fc/kernel"] == dims["text_tower/encoder/block_1/mlp/proj/kernel"] == (
        MuonDimensionNumbers((0,), (1,)))
    for projection in ("query", "key", "value"):  # [embed, heads, head_dim] as [embed, heads x head_dim]
        assert dims[f"{block}/attn/{projection}/kernel"] == MuonDimensionNumbers((0,), (1, 2))
    assert dims[f"{block}/attn/out/kernel"] == MuonDimensionNumbers((0, 1), (2,))  # [heads x head_dim, embed]
    adamw = [name for name, matrix in dims.items() if matrix is None]
    assert {"image_tower/patch_embed/kernel", "image_tower/cls_token", "image_tower/pos_embedding",
            "image_tower/proj/kernel", "image_tower/ln_post/scale", f"{block}/mlp/fc/bias", f"{block}/ln_1/scale",
            f"{block}/attn/query/bias", "text_tower/token_embedding/embedding", "text_tower/proj/kernel",
            "logit_scale"} <= set(adamw)
    assert all("/block_" not in name or not name.endswith("kernel") for name in adamw)
    siglip = flat(muon_dimension_numbers(parameter_shapes(models.create("ViT-B-16-SigLIP"), (224, 224, 3), 64)))
    map_head = [name for name in siglip if "/map_head/" in name]
    assert len(map_head) > 10 and all(siglip[name] is None for name in map_head)
    coca = flat(muon_dimension_numbers(parameter_shapes(models.create("coca-test-micro"), (32, 32, 3), 12)))
    assert coca["text_decoder/cross_0/attn/value/kernel"] == MuonDimensionNumbers((0,), (1, 2))
    assert coca["image_tower/pooler/attn/value/kernel"] is None and coca["text_decoder/proj/kernel"] is None

    # One momentum per Muon matrix, Adam's two moments per other parameter: no moment twice.
    state = build_optimizer(optimizer_config(name="muon")).init(params)
    sizes = {name: np.size(value) for name, value in flat(params).items()}
    moments = sum(size if dims[name] is not None else 2 * size for name, size in sizes.items())
    assert 0 <= sum(np.size(x) for x in jax.tree.leaves(state)) - moments < 16  # plus step counts and NS coefficients


def ill_conditioned(rng, rows, cols):
    """A [rows, cols] matrix (rows <= cols) with singular values from 1 down to 0.01."""
    left, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    right, _ = np.linalg.qr(rng.normal(size=(cols, rows)))
    return ((left * np.logspace(0, -2, rows)) @ right.T).astype(np.float32)


def condition_number(matrix):
    singular_values = np.linalg.svd(np.asarray(matrix), compute_uv=False)
    return singular_values.max() / singular_values.min()


def test_muon_orthogonalises_block_matrices_attention_as_one_matrix(params):
    """Muon's update of an ill-conditioned gradient has singular values close to one another, AdamW's do not; the
    3-D attention kernels are orthogonalised as whole [embed, heads x head_dim] matrices, at AdamW's RMS."""
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    block = grads["image_tower"]["encoder"]["block_0"]
    block["mlp"]["fc"]["kernel"] = ill_conditioned(rng, 32, 128)
    block["attn"]["query"]["kernel"] = ill_conditioned(rng, 32, 32).reshape(32, 2, 16)
    block["attn"]["out"]["kernel"] = ill_conditioned(rng, 32, 32).reshape(2, 16, 32)
    matrices = {}
    for name in ("adamw", "muon"):
        config = optimizer_config(name=name, weight_decay=0.0)
        updates = third_update(config, params, grads)["image_tower"]["encoder"]["block_0"]
        matrices[name] = {"fc": updates["mlp"]["fc"]["kernel"],
                          "query": updates["attn"]["query"]["kernel"].reshape(32, 32),
                          "out": updates["attn"]["out"]["kernel"].reshape(32, 32)}
    learning_rate = config.optimizer.learning_rate
    for kernel, update in matrices["muon"].items():
        assert condition_number(update) < 2, kernel
        assert condition_number(matrices["adamw"][kernel]) > 5, kernel
        assert 0.1 < np.sqrt(np.mean(np.square(update))) / learning_rate < 0.3, kernel  # AdamW's RMS is about 0.2


@pytest.mark.parametrize("options", [dict(layer_decay=DECAY), dict(name="muon")], ids=["layer_decay", "muon"])
def test_short_run_trains_saves_and_resumes(tiny_config, tmp_path, options):
    for key, value in options.items():
        tiny_config.optimizer[key] = value
    workdir = str(tmp_path / "run")
    final = train(tiny_config, workdir, evaluate_at_end=False)
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    layout = state_layout(models.CLIP(**tiny_config.model), build_optimizer(tiny_config), (64, 64, 3),
                          tiny_config.data.text_length, parallel.make_mesh())
    restored, _ = Checkpointer(workdir, tiny_config.model.to_dict(), save_every=1).restore(layout.abstract)
    assert int(restored.step) == tiny_config.total_steps
    assert_trees_equal(restored.params, final.params)
    assert_trees_equal(restored.opt_state, final.opt_state)


def test_bad_options_are_refused_with_the_fix():
    for layer_decay in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], e\.g\. 0\.75.*None for no decay"):
            build_optimizer(optimizer_config(layer_decay=layer_decay))
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd' \(config.optimizer.name\); use one of .*'muon'"):
        build_optimizer(optimizer_config(name="sgd"))
