"""WiSE-FT (`jclip.wise_ft`): the mixtures of a pretrained and a fine-tuned model, evaluated for each α, the best
saved; the ends are the two checkpoints, exactly, and the middle their average."""

import csv
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

import jclip
from conftest import REPO, shrunk_demo_config
from helpers import assert_trees_close, assert_trees_equal
from jclip import models, parallel
from jclip.checkpoint import load_model, read_record, read_stored_params, save_parameters_only
from jclip.data import shapes
from jclip.evaluate.from_checkpoint import evaluate_checkpoint
from jclip.parameter_layout import parameter_shapes
from jclip.train.loop import train
from jclip.wise_ft import interpolate, parse_alphas, wise_ft
import xla_flags

TASKS = ["shapes", "compositionality"]
SHIFT = ("red", "blue")  # the fine-tuning data: images whose objects are all of these colours
FINE_TUNING_STEPS = 6


def shifted_csv(data_dir: str, directory) -> str:
    """A CSV (filepath, caption) of the `shapes/tiny` train images whose objects are all red or blue."""
    keep = {shapes.COLOURS.index(colour) for colour in SHIFT}
    builder = shapes.prepare("tiny", data_dir)
    examples = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    path = directory / "red_blue.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i, example in enumerate(tfds.as_numpy(examples)):
            colours = {int(example["colour"])} | ({int(example["colour2"])} if example["num_objects"] == 2 else set())
            if colours <= keep:
                (directory / f"{i}.png").write_bytes(example["image"])
                writer.writerow([f"{i}.png", example["caption"].decode()])
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_data_dir):
    """(config, pretrained run, fine-tuned run): the demo shrunk, then fine-tuned from it on red and blue objects."""
    config = shrunk_demo_config(shapes_data_dir)
    config.checkpoint_every = config.total_steps  # 12
    pretrained = str(tmp_path_factory.mktemp("pretrained"))
    train(config, pretrained, evaluate_at_end=False)
    tuning = shrunk_demo_config(shapes_data_dir)
    tuning.data.sources = ConfigDict({"red_blue": dict(kind="csv", path=shifted_csv(
        shapes_data_dir, tmp_path_factory.mktemp("red_blue")))})
    tuning.init_from.path, tuning.optimizer.learning_rate = pretrained, 1e-2
    tuning.total_steps = tuning.checkpoint_every = FINE_TUNING_STEPS
    finetuned = str(tmp_path_factory.mktemp("finetuned"))
    train(tuning, finetuned, evaluate_at_end=False)
    return config, pretrained, finetuned


@pytest.fixture(scope="module")
def mixed(runs, tmp_path_factory):
    """(output directory, report) of WiSE-FT at α = 0, 0.5 and 1 with two tasks."""
    config, pretrained, finetuned = runs
    output = str(tmp_path_factory.mktemp("mixed"))
    return output, wise_ft(config, pretrained, finetuned, output, alphas=(0, 0.5, 1), tasks=TASKS)


def stored(run):
    """A checkpoint's parameters, as NumPy arrays."""
    return jax.device_get(read_stored_params(run, None, jax.sharding.SingleDeviceSharding(jax.devices()[0]))[0])


def test_the_ends_are_the_two_checkpoints(runs, mixed, tmp_path):
    """α = 0 evaluates to the pretrained checkpoint's metrics and α = 1 to the fine-tuned one's, as
    `python -m jclip.evaluate` measures them; the mixture in between is another model."""
    config, pretrained, finetuned = runs
    _, report = mixed
    ends = [evaluate_checkpoint(config, str(tmp_path / name), checkpoint=run, tasks=TASKS)["tasks"]
            for name, run in (("pretrained", pretrained), ("finetuned", finetuned))]
    assert report["alphas"]["0"] == ends[0]
    assert report["alphas"]["1"] == ends[1]
    assert ends[0] != ends[1] and report["alphas"]["0.5"] not in ends  # three different models
    assert report["pretrained"] == os.path.join(pretrained, "checkpoints", "12")
    assert report["finetuned"] == os.path.join(finetuned, "checkpoints", str(FINE_TUNING_STEPS))


def test_interpolation_is_the_weighted_average_in_the_loaded_layout(runs):
    """Every parameter (the scale too) is (1 - α) θ_pretrained + α θ_finetuned, with the layout (FSDP here)
    that `load_model` gives; the ends and the average are exact."""
    config, pretrained, finetuned = runs
    config = ConfigDict(config.to_dict())
    config.parameter_sharding = "fsdp"
    mesh = parallel.make_mesh()
    _, a, _ = load_model(config, pretrained, None, mesh, None)
    _, b, _ = load_model(config, finetuned, None, mesh, None)
    host_a, host_b = jax.device_get(a), jax.device_get(b)
    assert not np.array_equal(host_a["logit_scale"], host_b["logit_scale"])
    assert_trees_equal(interpolate(a, b, 0.0), host_a)
    assert_trees_equal(interpolate(a, b, 1.0), host_b)
    assert_trees_equal(interpolate(a, b, 0.5), jax.tree.map(lambda x, y: (x + y) / 2, host_a, host_b))
    quarter = interpolate(a, b, 0.25)
    assert_trees_close(quarter, jax.tree.map(lambda x, y: 0.75 * x + 0.25 * y, host_a, host_b), rtol=1e-6,
                       atol_fraction=1e-7, per_leaf=True)
    shardings = lambda tree: jax.tree.leaves(jax.tree.map(lambda leaf: leaf.sharding, tree))
    assert shardings(quarter) == shardings(a)
    assert any(not s.is_fully_replicated for s in shardings(a))  # FSDP: some parameters are split


def test_the_report_and_the_chosen_mixture(runs, mixed):
    """wise_ft.json, the table, the figure, and the best mixture by the first headline metric saved as a
    parameters-only checkpoint that `jclip.load` and `jclip.evaluate` read."""
    config, pretrained, finetuned = runs
    output, report = mixed
    with open(os.path.join(output, "wise_ft.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    select = "shapes/zero_shot/shape/all"
    assert report["select"] == select
    values = {alpha: row[select] for alpha, row in report["headline"].items()}
    chosen = report["chosen"]["alpha"]
    assert values[f"{chosen:g}"] == max(values.values()) == report["chosen"]["value"]
    assert set(report["headline"]["0.5"]) == {f"shapes/zero_shot/{a}/{s}" for a in ("shape", "colour")
                                              for s in ("all", "seen", "held_out")} | {
        f"compositionality/{kind}/accuracy" for kind in report["alphas"]["0.5"]["compositionality"]}

    table = open(os.path.join(output, "wise_ft.md")).read().splitlines()
    assert table[0].startswith(f"| α | {select} (%) | shapes/zero_shot/shape/seen (%) |")
    labels = [row.split(" | ")[0] for row in table[2:]]
    assert [label.replace(" **chosen**", "") for label in labels] == ["| 0 (pretrained)", "| 0.5", "| 1 (fine-tuned)"]
    assert sum(label.endswith(" **chosen**") for label in labels) == 1
    row = next(row for row in table[2:] if "**chosen**" in row)
    assert row.split(" | ")[1] == f"{100 * report['chosen']['value']:.1f}"
    assert os.path.getsize(os.path.join(output, "plots", "wise_ft.png")) > 10_000

    record = read_record(output)
    assert record["parameters_only"] and record["wise_ft"]["alpha"] == chosen
    assert (record["wise_ft"]["pretrained"], record["wise_ft"]["finetuned"]) == (report["pretrained"],
                                                                                 report["finetuned"])
    want = jax.tree.map(lambda x, y: (1 - np.float32(chosen)) * x + np.float32(chosen) * y, stored(pretrained),
                        stored(finetuned))
    loaded = jclip.load(output)
    assert_trees_close(loaded.params, want, rtol=1e-6, atol_fraction=1e-7, per_leaf=True)
    assert loaded.name == "test-micro" and loaded.image_size == 64
    again = evaluate_checkpoint(config, output, tasks=TASKS)
    assert again["tasks"] == report["alphas"][f"{chosen:g}"]


def command(*args):
    """`python -m jclip.wise_ft` with the shrunk demo's data settings, on 2 CPU devices."""
    env = {**os.environ, "XLA_FLAGS": xla_flags.with_devices(2), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jclip.wise_ft", "--config", "configs/shapes_tiny.py",
                           "--config.evaluate.shapes_config=tiny", "--config.data.tokenizer=shapes/tiny",
                           "--config.evaluate.batch_size=64", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)


def test_the_command_saves_the_average_and_refuses_a_second_time(runs, tmp_path):
    """With α = 0.5 alone the saved mixture is the average of the two checkpoints, to the last bit; the same
    command again stops with one line, since the workdir now holds a checkpoint."""
    config, pretrained, finetuned = runs
    args = [f"--config.data.data_dir={config.data.data_dir}", "--pretrained", pretrained,
            "--finetuned", os.path.join(finetuned, "checkpoints", str(FINE_TUNING_STEPS)),
            "--workdir", str(tmp_path / "out"), "--alphas", "0.5", "--tasks", "shapes"]
    done = command(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 0.5 **chosen** |" in done.stdout and "Chosen: α = 0.5 (shapes/zero_shot/shape/all" in done.stdout
    average = jax.tree.map(lambda x, y: (x + y) / 2, stored(pretrained), stored(finetuned))
    assert_trees_equal(stored(str(tmp_path / "out")), average)

    again = command(*args)
    assert again.returncode != 0 and again.stdout == ""
    errors = [line for line in again.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert errors == [f"error: {tmp_path / 'out'} already holds a checkpoint; give a new --workdir for the mixture"]
    assert again.stderr.endswith(errors[0] + "\n")  # after TensorFlow's start-up lines, if any


def micro_checkpoint(directory, image_size: int = 64, **overrides) -> str:
    """A parameters-only checkpoint of `test-micro` (with `overrides`) for `image_size` inputs (zeros)."""
    model = models.create("test-micro", **overrides)
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                          parameter_shapes(model, (image_size, image_size, 3), 16))
    save_parameters_only(params, models.model_config("test-micro", **overrides), str(directory), {})
    return str(directory)


@pytest.mark.parametrize("case", ["missing", "architecture", "shapes", "alpha", "alpha-text", "task", "select-task",
                                  "select-metric", "workdir"])
def test_bad_input_is_one_line(runs, tmp_path, case):
    config, pretrained, finetuned = runs
    out = str(tmp_path / "out")
    arguments = dict(config=config, pretrained=pretrained, finetuned=finetuned, workdir=out, tasks=["shapes"])
    error, message = ValueError, None
    if case == "missing":
        arguments["finetuned"] = str(tmp_path / "nothing")
        error, message = FileNotFoundError, f"--finetuned: no checkpoint at {tmp_path / 'nothing'}"
    elif case == "architecture":
        arguments["finetuned"] = micro_checkpoint(tmp_path / "deeper", text={"depth": 2})
        message = "are different architectures: model.text.depth is 1 in the pretrained one and 2 in the fine-tuned"
    elif case == "shapes":  # the same model, made for other images: a longer position embedding
        arguments["pretrained"] = micro_checkpoint(tmp_path / "larger", image_size=96)
        message = re.escape("differ in parameter image_tower/pos_embedding: of shape (1, 37, 32) in the pretrained "
                            "one, of shape (1, 17, 32) in the fine-tuned one")
    elif case == "alpha":
        arguments["alphas"] = (0, 1.5)
        message = r"--alphas: 1.5 is outside \[0, 1\]"
    elif case == "alpha-text":
        with pytest.raises(ValueError, match="--alphas: 'half' is not a number") as raised:
            parse_alphas(["0", "half"])
        assert "\n" not in str(raised.value)
        return
    elif case == "task":
        arguments["tasks"] = ["shapes", "nope"]
        message = r"no evaluation task\(s\) \['nope'\] in config.evaluate.tasks"
    elif case == "select-task":
        arguments["select"] = "compositionality/swap_words/accuracy"
        message = "--select compositionality/swap_words/accuracy: name a metric of an evaluated task"
    elif case == "select-metric":
        arguments.update(alphas=(0,), select="shapes/zero_shot/size/all")
        message = "--select shapes/zero_shot/size/all: task 'shapes' reports no such metric"
    elif case == "workdir":
        arguments["workdir"] = finetuned
        message = f"{finetuned} already holds a checkpoint"
    with pytest.raises(error, match=message) as raised:
        wise_ft(**arguments)
    assert "\n" not in str(raised.value)
    assert not os.path.exists(os.path.join(out, "checkpoints"))
