"""The configured objective: every named term wired to its loss, per device as on one, and the inputs it needs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from batches import random_batch
from helpers import assert_trees_close, init_params, read_metrics
from jclip import losses, models, parallel
from jclip.data import preprocess, shapes
from jclip.train.loop import train
from jclip.train.objective import LOSSES, caption_labels, make_objective
from jclip.train.step import make_gradient_step
from jclip.train.teacher import make_teacher

BATCH, DIM, LENGTH, VOCAB, NEGATIVES = 16, 8, 6, 11, 2

# Every term, with the options it needs and the direct call it must equal on the whole batch.
TERMS = {
    "clip": ({}, lambda o, b, key: losses.clip_loss(o["zimg"], o["ztxt"], o["scale"])),
    "siglip": ({}, lambda o, b, key: losses.siglip_loss(o["zimg"], o["ztxt"], o["scale"], o["bias"])),
    "dcl": ({"weight_sigma": 0.5}, lambda o, b, key: losses.dcl_loss(o["zimg"], o["ztxt"], o["scale"], weight_sigma=0.5)),
    "hard_negatives": ({"beta": 0.5, "tau_plus": 0.1}, lambda o, b, key: losses.hard_negative_clip_loss(
        o["zimg"], o["ztxt"], o["scale"], beta=0.5, tau_plus=0.1)),
    "negclip": ({}, lambda o, b, key: losses.negclip_loss(o["zimg"], o["ztxt"], o["scale"], o["negative_ztxt"])),
    "mochi": ({"hardest": 4, "mixed": 3, "mixed_with_query": 2}, lambda o, b, key: losses.mochi_loss(
        o["zimg"], o["ztxt"], o["scale"], key, hardest=4, mixed=3, mixed_with_query=2)),
    "cwcl": ({}, lambda o, b, key: losses.cwcl_loss(o["zimg"], o["ztxt"], o["scale"])),
    "supervised": ({}, lambda o, b, key: losses.supervised_contrastive_loss(
        o["zimg"], o["ztxt"], o["scale"], caption_labels(b["tokens"], None))),
    "alignment": ({}, lambda o, b, key: losses.alignment_loss(o["zimg"], o["ztxt"])),
    "uniformity": ({"t": 1.0}, lambda o, b, key: (losses.uniformity_loss(o["zimg"], t=1.0)
                                                 + losses.uniformity_loss(o["ztxt"], t=1.0)) / 2),
    "cross_modal_uniformity": ({}, lambda o, b, key: losses.cross_modal_uniformity_loss(o["zimg"], o["ztxt"])),
    "contrastive_gap": ({}, lambda o, b, key: losses.contrastive_gap_loss(o["zimg"], o["ztxt"], o["scale"])),
    "multi_view_infonce": ({}, lambda o, b, key: losses.multi_view_infonce_loss(
        jnp.stack([o["zimg"], o["ztxt"]], 1), o["scale"])),
    "multi_view_dhel": ({}, lambda o, b, key: losses.multi_view_dhel_loss(
        jnp.stack([o["zimg"], o["ztxt"]], 1), o["scale"])),
    "poly_view": ({"aggregation": "arithmetic"}, lambda o, b, key: losses.poly_view_loss(
        jnp.stack([o["zimg"], o["ztxt"]], 1), o["scale"], aggregation="arithmetic")),
    "caption": ({}, lambda o, b, key: losses.caption_loss(o["caption_logits"], b["tokens"])),
    "distillation": ({}, lambda o, b, key: losses.distillation_loss(
        o["zimg"], o["ztxt"], o["scale"], b["teacher_zimg"], b["teacher_ztxt"], b["teacher_scale"][0])),
}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def outputs_and_batch():
    rng = np.random.default_rng(0)
    zimg = unit(rng.normal(size=(BATCH, DIM)))
    out = {"zimg": zimg, "ztxt": unit(zimg + rng.normal(size=(BATCH, DIM))), "scale": np.float32(5.0),
           "bias": np.float32(-2.0), "negative_ztxt": unit(rng.normal(size=(BATCH, NEGATIVES, DIM))),
           "caption_logits": rng.normal(size=(BATCH, LENGTH, VOCAB))}
    tokens = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    tokens[:, 4:] = 0
    tokens[5], tokens[12] = tokens[1], tokens[1]  # one caption three times: supervised positives
    batch = {"tokens": tokens, "teacher_zimg": unit(rng.normal(size=(BATCH, 5))),
             "teacher_ztxt": unit(rng.normal(size=(BATCH, 5))), "teacher_scale": np.full(BATCH, 7.0, np.float32)}
    as32 = lambda tree: jax.tree.map(lambda x: np.float32(x) if x.dtype == np.float64 else x, tree)
    return as32(out), as32(batch)


def test_every_term_is_tested():
    assert set(TERMS) == set(LOSSES)


def test_each_term_is_its_loss_and_the_same_per_device():
    out, batch = outputs_and_batch()
    spec = {name: {"weight": 0.5 + i, **options} for i, (name, (options, _)) in enumerate(TERMS.items())}
    key = jax.random.key(3)
    total, terms = jax.jit(make_objective(spec, None))(out, batch, key)
    for name, (_, direct) in TERMS.items():
        np.testing.assert_allclose(terms[f"loss_{name}"], direct(out, batch, key), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(total, sum(spec[n]["weight"] * terms[f"loss_{n}"] for n in TERMS), rtol=1e-6)

    mesh = parallel.make_mesh(8)
    sharded = {k: P() if k in ("scale", "bias") else P("data") for k in out}
    per_device = jax.jit(jax.shard_map(make_objective(spec, "data"), mesh=mesh,
                                       in_specs=(sharded, P("data"), P()), out_specs=P()))
    total_8, terms_8 = per_device(out, batch, key)
    assert_trees_close((total_8, terms_8), (total, terms), rtol=2e-5, atol_fraction=1e-6)


def test_caption_labels_mark_identical_captions():
    tokens = np.array([[1, 2, 0], [3, 4, 0], [1, 2, 0], [1, 2, 5]], np.int32)
    np.testing.assert_array_equal(caption_labels(tokens, None), [0, 1, 0, 3])


@pytest.mark.parametrize("spec, dropped, message", [
    ({"negclip": {}}, "negative_ztxt", r"needs 'negative_ztxt'.*config.data.negative_kinds"),
    ({"distillation": {}}, "teacher_zimg", r"needs 'teacher_zimg'.*config.teacher"),
    ({"caption": {}}, "caption_logits", r"needs 'caption_logits'.*CoCa"),
])
def test_a_missing_input_names_the_setting_that_provides_it(spec, dropped, message):
    out, batch = outputs_and_batch()
    out.pop(dropped, None)
    batch.pop(dropped, None)
    with pytest.raises(ValueError, match=message):
        make_objective(spec, None)(out, batch, jax.random.key(0))


def test_options_are_checked_before_training():
    with pytest.raises(ValueError, match=r"config.losses.mochi has unknown option\(s\) \['hardness'\]"):
        make_objective({"mochi": {"hardness": 3}}, None)
    with pytest.raises(ValueError, match=r"config.losses.uniformity has unknown option\(s\) \['alpha'\].*\['t'\]"):
        make_objective({"uniformity": {"alpha": 2.0}}, None)
    with pytest.raises(ValueError, match=r"config.losses.mochi needs option\(s\) \['hardest', 'mixed'\]"):
        make_objective({"mochi": {"weight": 1.0}}, None)


@functools.cache
def negclip_batch():
    batch = random_batch(16)
    negatives = random_batch(32, seed=1)["tokens"].reshape(16, 2, -1)
    return {**batch, "negative_tokens": negatives}


def test_the_step_embeds_hard_negatives_and_caches_their_gradients():
    """negclip's extra captions go through the text tower; gradient caching gives the full-batch gradient."""
    model = models.create("test-micro")
    batch = negclip_batch()
    params = init_params(model, batch)
    spec = {"negclip": {}}
    loss_1, grads_1 = make_gradient_step(model, parallel.make_mesh(1), spec)(params, batch)
    mesh = parallel.make_mesh(8)
    loss_8, grads_8 = make_gradient_step(model, mesh, spec, micro_batches=2)(params, parallel.global_batch(batch, mesh))
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    assert_trees_close(grads_8, grads_1, rtol=1e-4, atol_fraction=1e-6)
    plain, _ = make_gradient_step(model, parallel.make_mesh(1), {"clip": {}})(params, batch)
    assert float(loss_1) > float(plain)  # the negatives add columns to image→text
    with pytest.raises(ValueError, match=r"need batch field\(s\) \['negative_tokens'\].*negative_kinds"):
        make_gradient_step(model, parallel.make_mesh(1), spec)(params, random_batch(16))


def test_trainer_distils_a_teacher_checkpoint_with_hard_negatives(tiny_config, tmp_path, monkeypatch):
    """The teacher's outputs in the batch are those of the teacher run's parameters on the batch's inputs."""
    tiny_config.total_steps = 2
    teacher = str(tmp_path / "teacher")
    teacher_params = train(tiny_config, teacher, evaluate_at_end=False).params
    seen = []

    def recorded_teacher(*args):
        teacher = make_teacher(*args)

        def call(batch):
            out = teacher(batch)
            seen.append(jax.device_get({**batch, **out}))
            return out
        return call

    monkeypatch.setattr("jclip.train.loop.make_teacher", recorded_teacher)
    tiny_config.losses = ConfigDict({"clip": {"weight": 1.0}, "distillation": {"weight": 1.0},
                                     "negclip": {"weight": 0.5}})
    tiny_config.data.negative_kinds = ("swap_attributes",)
    tiny_config.data.negative_attributes = (shapes.COLOURS, shapes.SIZES)
    tiny_config.teacher = os.path.join(teacher, "checkpoints", "2")
    student = str(tmp_path / "student")
    train(tiny_config, student, evaluate_at_end=False)
    logged = [m for m in read_metrics(student) if "loss" in m][-1]
    assert {"loss_clip", "loss_distillation", "loss_negclip"} <= set(logged)
    assert np.isfinite([logged["loss_clip"], logged["loss_distillation"], logged["loss_negclip"]]).all()
    np.testing.assert_allclose(
        logged["loss"], logged["loss_clip"] + logged["loss_distillation"] + 0.5 * logged["loss_negclip"], rtol=1e-5)
    batch = seen[0]
    assert batch["image"].dtype == np.uint8  # the student's step and the teacher finish them alike
    out = models.model_class(tiny_config.model)(**tiny_config.model).apply(
        {"params": teacher_params}, preprocess.batch_op(tiny_config.data.preprocess)(batch["image"]), batch["tokens"])
    for name in ("zimg", "ztxt", "scale"):
        np.testing.assert_allclose(batch[f"teacher_{name}"], np.broadcast_to(out[name], batch[f"teacher_{name}"].shape),
                                   rtol=1e-5, atol=1e-6, err_msg=name)

    tiny_config.losses = ConfigDict({"clip": {"weight": 1.0}})
    with pytest.raises(ValueError, match="config.teacher is set but config.losses has no distillation term"):
        train(tiny_config, str(tmp_path / "no_term"), evaluate_at_end=False)
