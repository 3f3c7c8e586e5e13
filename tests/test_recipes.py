"""The training recipes of configs/: each says what its docstring claims (the published numbers, the step
arithmetic, its loss terms and frozen groups, a preprocessing that parses) and trains: two steps on the 8
simulated devices, after the command line a user would give swaps in tiny data and a tiny model. The command
line is parsed in this process by absl's config flags as `python -m jclip.train` parses it, and the trainer
runs in-process, so the recipes share one process's imports and compilation cache."""

import csv
import io
import json
import os
import shlex
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf
from ml_collections import ConfigDict

from conftest import REPO, load_config
from helpers import assert_trees_equal, command_line, png, read_metrics
from jclip import models
from jclip.convert.to_checkpoint import save_converted
from jclip.data import preprocess
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.evaluate.from_checkpoint import evaluation_preprocess
from jclip.evaluate.tasks import select_tasks
from jclip.train.loop import train

OPENCLIP_TRAIN = "decode|inception_crop(224, 0.9, 1.0)|clip_normalize"  # RandomResizedCrop(224, (0.9, 1)) + OpenAI
OPENCLIP_EVAL = "decode|resize_small(224)|center_crop(224)|clip_normalize"

# What each recipe claims to follow: the published numbers, as its docstring states them.
PUBLISHED = {
    "open_clip_vit_b32_laion400m": dict(
        model_name="ViT-B-32", losses={"clip": {"weight": 1.0}}, frozen=(), batch_size=32_768,
        total_steps=32 * 407_332_084 // 32_768, source="tar", tokenizer="clip", text_length=77, image_size=224,
        preprocess=OPENCLIP_TRAIN, evaluation=OPENCLIP_EVAL,
        optimizer=dict(name="adamw", schedule="cosine", learning_rate=5e-4, end_learning_rate=0.0, warmup_steps=2_000,
                       weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=float("inf"))),
    "siglip_vit_b16": dict(
        model_name="ViT-B-16-SigLIP", losses={"siglip": {"weight": 1.0, "ring": True}}, frozen=(), batch_size=32_768,
        total_steps=9_000_000_000 // 32_768, source="tar", tokenizer="sentencepiece:", text_length=64,
        image_size=224, preprocess="decode|resize(224)|value_range(-1, 1)",
        evaluation="decode|resize(224)|value_range(-1, 1)",  # squashed, as it trains
        optimizer=dict(name="adamw", schedule="cosine", learning_rate=1e-3, end_learning_rate=0.0,
                       warmup_steps=int(0.03 * (9_000_000_000 // 32_768)), weight_decay=1e-4 / 1e-3,  # big_vision's
                       b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0)),
    "lit_vit_b32": dict(
        model_name="ViT-B-32", losses={"clip": {"weight": 1.0}}, frozen=("image_tower",), batch_size=4_096,
        total_steps=5_000, source="tfds", tokenizer="clip", text_length=77, image_size=224,
        preprocess=OPENCLIP_TRAIN, evaluation=OPENCLIP_EVAL,
        optimizer=dict(name="adamw", schedule="cosine", learning_rate=1e-3, end_learning_rate=0.0, warmup_steps=150,
                       weight_decay=0.01 / 1e-3, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)),  # big_vision's wd
    "coca_vit_b32": dict(
        model_name="coca_ViT-B-32", losses={"clip": {"weight": 1.0}, "caption": {"weight": 2.0}}, frozen=(),
        batch_size=90_112, total_steps=13_000_000_000 // 90_112, source="tar", tokenizer="clip", text_length=76,
        image_size=224, preprocess=OPENCLIP_TRAIN, evaluation=OPENCLIP_EVAL,
        optimizer=dict(name="adamw", schedule="cosine", learning_rate=5e-4, end_learning_rate=0.0,
                       warmup_steps=10_000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=float("inf"))),
    "finetune_vit_b32": dict(
        model_name="ViT-B-32", losses={"clip": {"weight": 1.0}}, frozen=(), batch_size=512,
        total_steps=10 * 1_281_167 // 512, source="csv", tokenizer="clip", text_length=77, image_size=224,
        preprocess=OPENCLIP_TRAIN, evaluation=OPENCLIP_EVAL,
        optimizer=dict(name="adamw", schedule="cosine", learning_rate=3e-5, end_learning_rate=0.0, warmup_steps=500,
                       weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)),
}
RECIPES = sorted(PUBLISHED)
# Mappings whose keys a recipe chooses; every other field is the demo config's, so the same overrides work.
OPEN_MAPPINGS = {"data.sources", "model", "losses", "evaluate.tasks", "optimizer.lr_multipliers"}
NUM_PAIRS = 32


def field_names(config, prefix=""):
    names = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        names.add(name)
        if isinstance(value, ConfigDict) and name not in OPEN_MAPPINGS:
            names |= field_names(value, f"{name}.")
    return names


def recipe_module(name):
    """The recipe file's module namespace (its constants), as the config loader executes it."""
    namespace = {}
    exec(compile((REPO / "configs" / f"{name}.py").read_text(), f"{name}.py", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Tiny image–caption data in the recipes' formats: two WebDataset tar shards and a TSV of the same
    `NUM_PAIRS` 64 x 64 PNGs, and a BPE tokenizer of their captions: (tar pattern, TSV path, tokenizer path,
    its vocabulary size)."""
    root = tmp_path_factory.mktemp("pairs")
    captions = [f"picture number {i}" for i in range(NUM_PAIRS)]
    images = [png(8 * i, 64, 64) for i in range(NUM_PAIRS)]
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as archive:
            for i in range(shard, NUM_PAIRS, 2):
                for suffix, data in ((".png", images[i]), (".txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    with open(root / "pairs.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i in range(NUM_PAIRS):
            (root / f"{i}.png").write_bytes(images[i])
            writer.writerow([f"{i}.png", captions[i]])
    tokenizer = Tokenizer.train(captions, 300)
    tokenizer.save(str(root / "tokenizer.json"))
    return str(root / "*.tar"), str(root / "pairs.tsv"), str(root / "tokenizer.json"), tokenizer.vocab_size


def tiny_overrides(recipe, pairs):
    """What a user types to try `recipe` on the tiny data with a tiny model: their own data and tokenizer, a
    small image size, batch and run, checkpoint settings and a small evaluation (retrieval on the TSV)."""
    pattern, tsv, tokenizer, vocab_size = pairs
    module = recipe_module(recipe)
    coca = recipe == "coca_vit_b32"
    size, length = (32, 12) if coca else (64, 16)  # coca-test-micro takes 32 px images and 12 tokens
    retrieval = {"pairs": {"kind": "retrieval", "source": {"kind": "csv", "path": tsv, "image_column": "filepath",
                                                           "caption_column": "title"}}}
    overrides = [
        f"--config.data.tokenizer={tokenizer}", f"--config.data.image_size={size}",
        f"--config.data.text_length={length}",
        f"--config.data.preprocess={module['PREPROCESS'].replace('224', str(size))}",
        "--config.data.shuffle_buffer=64", "--config.batch_size=16", "--config.total_steps=2",
        "--config.optimizer.warmup_steps=1", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.tensorboard=False",
        "--config.evaluate.batch_size=16", "--config.evaluate.every_steps=0", f"--config.evaluate.tasks={retrieval}",
    ]
    if coca:
        overrides += ["--config.model_name=coca-test-micro", f"--config.model.text.vocab_size={vocab_size}"]
    else:
        overrides += ["--config.model_name=test-micro"]
    if recipe == "siglip_vit_b16":
        overrides += ["--config.model.init_bias=-10.0"]  # the sigmoid loss needs a learnable bias
    kind = PUBLISHED[recipe]["source"]
    if kind == "tfds":  # the LiT recipe's coco_captions, replaced by the user's shards as its docstring says
        overrides += [f'--config.data.sources={{"web": {{"kind": "tar", "pattern": "{pattern}"}}}}']
    else:  # the recipe's own source, pointed at the user's data
        (name,) = load_config(recipe).data.sources.keys()
        overrides += [f"--config.data.sources.{name}.pattern={pattern}" if kind == "tar"
                      else f"--config.data.sources.{name}.path={tsv}"]
    return overrides


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_says_what_it_follows(recipe):
    config = load_config(recipe)
    published = PUBLISHED[recipe]
    module = recipe_module(recipe)
    doc = " ".join(module["__doc__"].split())
    assert field_names(config) == field_names(load_config("shapes_tiny")), "the demo config's fields, no more or less"

    # The model is the named one, unchanged, so --config.model_name can swap in another.
    assert config.model_name == published["model_name"] and config.model_name in models.list_models()
    assert config.model.to_dict() == models.model_config(config.model_name)
    assert config.losses.to_dict() == published["losses"]
    assert tuple(config.optimizer.frozen) == published["frozen"]
    for field, value in published["optimizer"].items():
        expected = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
        assert config.optimizer[field] == expected, f"optimizer.{field}"

    # The batch and the step arithmetic, in the config and in the docstring.
    assert (config.batch_size, config.total_steps) == (published["batch_size"], published["total_steps"])
    assert f"{config.batch_size:,}" in doc, "the docstring states the batch size"
    steps = f"{config.total_steps:,}"
    assert f"= {steps}" in doc or f"{steps} steps" in doc, "the docstring shows the step arithmetic"
    warmup = f"{config.optimizer.warmup_steps:,}"
    assert f"{warmup} warm-up steps" in doc or f"= {warmup} steps" in doc
    assert f"python -m jclip.train --config configs/{recipe}.py" in doc

    # Data: the source kind, tokenizer, sizes; the preprocessing parses and makes [size, size, 3] images.
    (source,) = config.data.sources.values()
    assert source["kind"] == published["source"]
    assert config.data.tokenizer.startswith(published["tokenizer"])
    assert (config.data.text_length, config.data.image_size) == (published["text_length"], published["image_size"])
    assert config.data.text_length <= config.model.text.context_length
    assert config.data.preprocess == module["PREPROCESS"] == published["preprocess"]
    image = preprocess.parse(config.data.preprocess)(tf.constant(png(90, 300, 400)), tf.constant([1, 2]))
    assert image.shape == (224, 224, 3)
    assert "flip_lr" not in config.data.preprocess  # captions say left and right

    # Evaluation: the model's default preprocessing (no task sets its own), tasks that check out.
    assert evaluation_preprocess(config) == published["evaluation"]
    assert all("preprocess" not in task for task in config.evaluate.tasks.values())
    select_tasks(config.evaluate.tasks)
    assert 0 < config.evaluate.every_steps < config.total_steps


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_launch_command_in_its_docstring_parses(recipe):
    """The docstring's `python -m jclip.train` command sets what it says, through command-line overrides only;
    `--config.evaluate.tasks={}` drops the evaluations."""
    doc = recipe_module(recipe)["__doc__"].replace("\\\n", " ")
    (command,) = [line for line in doc.splitlines() if f"python -m jclip.train --config configs/{recipe}.py" in line]
    overrides = [arg for arg in shlex.split(command) if arg.startswith("--config.")]
    assert any(".sources." in arg or ".data_dir=" in arg for arg in overrides), "the command says where the data is"
    config = command_line(REPO / "configs" / f"{recipe}.py", *overrides)
    for override in overrides:
        path, value = override[len("--config."):].split("=", 1)
        node = config
        for key in path.split("."):
            node = node[key]
        assert str(node) == value, override
    assert not command_line(REPO / "configs" / f"{recipe}.py", "--config.evaluate.tasks={}").evaluate.tasks


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_on_tiny_data(recipe, pairs, tmp_path, capsys):
    starts_from_converted = recipe in ("lit_vit_b32", "finetune_vit_b32")
    overrides = tiny_overrides(recipe, pairs)
    if starts_from_converted:  # weights as `python -m jclip.convert` writes them
        converted_run = str(tmp_path / "converted")
        overrides.append(f"--config.init_from.path={converted_run}")
    config = command_line(REPO / "configs" / f"{recipe}.py", *overrides)
    assert config.model_name in ("test-micro", "coca-test-micro") and config.total_steps == 2
    assert config.losses.to_dict() == PUBLISHED[recipe]["losses"]  # the recipe's objective, not the overrides'
    workdir = str(tmp_path / "run")
    if starts_from_converted:
        model = models.create(config.model_name)
        converted = jax.device_get(model.init(jax.random.key(3), np.zeros((1, 64, 64, 3), np.float32),
                                              np.zeros((1, 16), np.int32))["params"])
        save_converted(converted, config.model_name, converted_run, source="open_clip_model.safetensors")

    state = train(config, workdir)

    assert int(state.step) == 2
    metrics = [m for m in read_metrics(workdir) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    if len(config.losses) > 1:  # each term logged (a single term is the loss itself)
        assert {f"loss_{name}" for name in config.losses} <= set(metrics[-1])
    assert ("bias" in metrics[-1]) == ("siglip" in config.losses)  # the sigmoid loss's learnable bias
    with open(os.path.join(workdir, "results.json")) as f:
        assert set(json.load(f)["tasks"]) == {"pairs"}
    if starts_from_converted:
        assert f"Starting from the parameters ({', '.join(config.init_from.parts)}) of {converted_run}" in (
            capsys.readouterr().out)
        params = jax.device_get(state.params)
        frozen = PUBLISHED[recipe]["frozen"]
        for group in params:
            if group in frozen:  # LiT: the image tower is the converted one, bit for bit
                assert_trees_equal(params[group], converted[group])
        text, converted_text = (p["text_tower"]["token_embedding"]["embedding"] for p in (params, converted))
        if recipe == "lit_vit_b32":  # LiT's text tower starts afresh, far from the converted one
            assert np.abs(text - converted_text).mean() > 0.5 * np.abs(converted_text).mean()
        else:  # fine-tuning starts from all of it: two small steps stay close
            np.testing.assert_allclose(text, converted_text, atol=1e-3)
