"""A newcomer's own data through the README's command: a config file of their own that trains on a CSV of 32 px
image–caption pairs at the model's 64 px and evaluates on the same inputs; a task whose data cannot fit the model
stops the command before training."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240)}

# What a user writes: the demo config with their own data and evaluation.
MY_CONFIG = '''
import ml_collections

from {demo} import get_config as demo_config


def get_config():
    config = demo_config()
    pairs = dict(kind="csv", path={csv!r}, image_column="file", caption_column="caption")
    config.data.sources = ml_collections.ConfigDict({{"mine": pairs}})
    config.data.preprocess = "decode|resize(64)|value_range(-1, 1)"
    config.evaluate.tasks = ml_collections.ConfigDict({{"pairs": dict(kind="retrieval", source=pairs{task_options})}})
    return config
'''


def write_pairs(root, shape=(32, 32)) -> str:
    """A CSV of 40 PNGs of `shape` (32x32), a square of one colour on black, captioned "a small <colour> square"."""
    rows = ["file,caption"]
    for i in range(40):
        colour = list(COLOURS)[i % len(COLOURS)]
        image = np.zeros((*shape, 3), np.uint8)
        offset = i % 12
        image[offset:offset + 16, offset:offset + 16] = COLOURS[colour]
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append(f"{i}.png,a small {colour} square")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return str(root / "pairs.csv")


def train_command(tmp_path, shapes_data_dir, name: str, task_options: str = "", shape=(32, 32),
                  *overrides: str) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.py"
    demo = "shapes_tiny_copy"
    (tmp_path / f"{demo}.py").write_text((REPO / "configs" / "shapes_tiny.py").read_text())
    config.write_text(MY_CONFIG.format(demo=demo, csv=write_pairs(tmp_path, shape), task_options=task_options))
    train = [sys.executable, "-m", "jclip.train", "--config", str(config), "--workdir", str(tmp_path / name),
             f"--config.data.data_dir={shapes_data_dir}", "--config.data.tokenizer=shapes/tiny",
             "--config.model_name=test-micro", "--config.batch_size=16", "--config.total_steps=4",
             "--config.log_every=2", "--config.checkpoint_every=4", "--config.evaluate.batch_size=16", *overrides]
    return run_in(tmp_path, train)


def run_in(tmp_path, args) -> subprocess.CompletedProcess:
    """A command with the config files of `tmp_path` importable."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_on_32_pixel_images_resized_to_64_completes_and_evaluates(tmp_path, shapes_data_dir):
    result = train_command(tmp_path, shapes_data_dir, "run")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert results["step"] == 4 and results["tasks"]["pairs"]["num_images"] == 40


def test_a_task_whose_images_cannot_fit_the_model_stops_before_training(tmp_path, shapes_data_dir):
    result = train_command(tmp_path, shapes_data_dir, "unfit", task_options=', preprocess="decode|value_range(-1, 1)"')
    assert result.returncode != 0
    assert ("error: evaluation task 'pairs' cannot run: its preprocessing 'decode|value_range(-1, 1)' turns an image "
            "of pairs.csv into shape (32, 32, 3), but the model takes (64, 64, 3)") in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "unfit" / "checkpoints")
    assert not os.path.exists(tmp_path / "unfit" / "metrics.jsonl")


def test_a_naflex_run_on_wide_images_trains_and_evaluates_at_its_budget_and_another(tmp_path, shapes_data_dir):
    """NaFlex on 24 x 56 images: each becomes 2 x 5 of the model's 16 px patches within a budget of 12 (no
    squashing or cropping), then `python -m jclip.evaluate --max_patches` and `jclip.load(max_patches=)` embed
    them at a budget of 40 (4 x 10 patches)."""
    naflex_spec = "--config.data.preprocess=decode|naflex(16, 12)|value_range(-1, 1)"
    result = train_command(tmp_path, shapes_data_dir, "naflex", "", (24, 56), naflex_spec)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "naflex" / "results.json") as f:
        assert json.load(f)["tasks"]["pairs"]["num_images"] == 40
    evaluate = [sys.executable, "-m", "jclip.evaluate", "--config", str(tmp_path / "naflex.py"),
                "--workdir", str(tmp_path / "naflex"), f"--config.data.data_dir={shapes_data_dir}",
                "--config.data.tokenizer=shapes/tiny", "--config.model_name=test-micro",
                "--config.evaluate.batch_size=16", naflex_spec, "--max_patches=40", "--table", str(tmp_path / "40.csv")]
    result = run_in(tmp_path, evaluate)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| num_images | 40 |" in result.stdout and os.path.exists(tmp_path / "40.csv")

    import jclip
    from jclip.data import naflex
    model = jclip.load(tmp_path / "naflex", max_patches=40)
    assert model.preprocess.spec == "decode|naflex(16, 40)|value_range(-1, 1)"
    patch_input = model.preprocess(str(tmp_path / "0.png"))
    assert patch_input["grid"].tolist() == [4, 10] and naflex.row_count(naflex.stack([patch_input])) == 1
    embeddings = model.encode_images([str(tmp_path / f"{i}.png") for i in range(3)])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert jclip.load(tmp_path / "naflex").preprocess(str(tmp_path / "0.png"))["grid"].tolist() == [2, 5]
