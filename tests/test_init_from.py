"""`config.init_from`: a new run starts from chosen parts of pretrained weights, the rest initialised afresh."""

import jax
import numpy as np
import pytest

from helpers import assert_trees_close, assert_trees_equal
from jclip import models, parallel
from jclip.convert.to_checkpoint import save_converted
from jclip.models.vision import resize_positions
from jclip.parameter_layout import init_params
from jclip.train.init_from import pretrained_params
from jclip.train.loop import check_locked_parts_are_pretrained, train, train_state_layout
from jclip.train.optimizer import build_optimizer


def micro_params(seed: int, image_size: int = 64, **overrides):
    model = models.create("test-micro", **overrides)
    return jax.device_get(init_params(model, jax.random.key(seed), (image_size, image_size, 3), 16))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(directory, parameters) of `test-micro` weights (seed 3) as `python -m jclip.convert` writes them."""
    directory = str(tmp_path_factory.mktemp("converted"))
    params = micro_params(3)
    save_converted(params, "test-micro", directory, source="weights.safetensors")
    return directory, params


def test_lit_takes_the_locked_image_tower_and_starts_the_text_tower_afresh(tiny_config, converted, tmp_path):
    directory, pretrained = converted
    tiny_config.total_steps = 2
    tiny_config.init_from.path, tiny_config.init_from.parts = directory, ("image_tower",)
    tiny_config.optimizer.frozen = ("image_tower",)
    params = jax.device_get(train(tiny_config, str(tmp_path / "lit"), evaluate_at_end=False).params)
    assert_trees_equal(params["image_tower"], pretrained["image_tower"])
    fresh = micro_params(tiny_config.seed)  # what the run initialises with its seed
    text, start, other = (p["text_tower"]["token_embedding"]["embedding"] for p in (params, fresh, pretrained))
    assert 0 < np.abs(text - start).max() < 0.05  # two small steps from the fresh initialisation
    assert np.abs(text - other).mean() > 10 * np.abs(text - start).mean()  # not from the pretrained one

    # A run that resumes ignores init_from (here a path that does not exist).
    tiny_config.total_steps, tiny_config.init_from.path = 3, str(tmp_path / "nothing")
    assert int(train(tiny_config, str(tmp_path / "lit"), evaluate_at_end=False).step) == 3


def test_fine_tuning_from_init_from_is_the_same_on_1_and_8_devices(tiny_config, converted, tmp_path, monkeypatch):
    directory, pretrained = converted
    tiny_config.total_steps, tiny_config.init_from.path = 2, directory
    on_8 = jax.device_get(train(tiny_config, str(tmp_path / "eight"), evaluate_at_end=False).params)
    make_mesh = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh", lambda num_devices=None: make_mesh(1))
    on_1 = jax.device_get(train(tiny_config, str(tmp_path / "one"), evaluate_at_end=False).params)
    assert_trees_close(on_1, on_8, rtol=1e-5, atol_fraction=1e-6)
    assert not np.array_equal(on_8["image_tower"]["pos_embedding"], pretrained["image_tower"]["pos_embedding"])
    assert_trees_close(on_8, pretrained, rtol=0, atol=0.05)  # two steps from the pretrained parameters


def layout_for(config, image_size: int = 64):
    config.data.image_size = image_size
    model = models.model_class(config.model)(**config.model)
    return train_state_layout(config, model, build_optimizer(config), parallel.make_mesh())


def test_position_embeddings_of_another_image_size_are_resized(tiny_config, converted):
    directory, pretrained = converted
    tiny_config.init_from.path = directory
    layout = layout_for(tiny_config, image_size=96)  # a 6x6 patch grid where the weights have 4x4
    params = pretrained_params(tiny_config, layout, micro_params(0, image_size=96))
    want = resize_positions(pretrained["image_tower"]["pos_embedding"], 1, (6, 6))
    np.testing.assert_allclose(params["image_tower"]["pos_embedding"], want, rtol=1e-6)
    assert_trees_equal(params["text_tower"], pretrained["text_tower"])


def test_bad_init_from_is_one_clear_line(tiny_config, converted, tmp_path):
    directory, _ = converted
    layout = layout_for(tiny_config)
    fresh = micro_params(0)
    tiny_config.init_from.path = directory

    tiny_config.init_from.parts = ("text_tower", "vision")
    with pytest.raises(ValueError, match=r"parts names \['vision'\], which this run's model has no parameters of"):
        pretrained_params(tiny_config, layout, fresh)

    tiny_config.init_from.parts = ("logit_bias",)  # a sigmoid model's bias, which the CLIP weights lack
    tiny_config.model = models.model_config("test-micro", init_bias=-10.0)
    with pytest.raises(ValueError, match=r"has no \['logit_bias'\] parameters"):
        pretrained_params(tiny_config, layout_for(tiny_config), micro_params(0, init_bias=-10.0))

    tiny_config.init_from.parts = ("all",)
    tiny_config.model = models.model_config("test-micro", text={"depth": 2})
    with pytest.raises(ValueError, match="the text_tower of .* is another architecture than this run's"):
        pretrained_params(tiny_config, layout_for(tiny_config), micro_params(0, text={"depth": 2}))

    tiny_config.model = models.model_config("test-micro", embed_dim=8)
    with pytest.raises(ValueError, match=r"parameter image_tower/proj/kernel has shape \(32, 16\) in .* but \(32, 8\)"):
        pretrained_params(tiny_config, layout_for(tiny_config), micro_params(0, embed_dim=8))

    tiny_config.model = models.model_config("test-micro")
    tiny_config.init_from.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        pretrained_params(tiny_config, layout, fresh)
    tiny_config.init_from.path = str(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is a weight file: name its model with config.init_from.model"):
        pretrained_params(tiny_config, layout, fresh)

    tiny_config.init_from.path, tiny_config.optimizer.frozen = None, ("image_tower",)
    with pytest.raises(ValueError, match=r"frozen locks \['image_tower'\], which this new run would keep at their"):
        train(tiny_config, str(tmp_path / "random_locked"), evaluate_at_end=False)
    tiny_config.optimizer.frozen = ("logit_scale", "image_tower")
    with pytest.raises(ValueError, match=r"frozen locks \['image_tower'\], which"):
        check_locked_parts_are_pretrained(tiny_config)
    tiny_config.optimizer.frozen = ("logit_scale",)  # a fixed temperature: the scale starts at config.model.init_scale
    check_locked_parts_are_pretrained(tiny_config)
