"""Nothing is lost: non-finite losses, kills during a save, time-based and kept checkpoints, logs."""

import glob
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from helpers import CORRUPT, EMPTY_CAPTION, assert_trees_equal, cli, read_metrics, saved_config
from jclip import models, parallel
from jclip.checkpoint import Checkpointer, load_model
from jclip.data import pipeline
from jclip.data.sources import csv_source
from jclip.data.to_tfds import convert
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import make_evaluator
from jclip.train.loop import train, train_state_layout
from jclip.train.optimizer import build_optimizer


def poison_batch(monkeypatch, at_call: int):
    """Make the input's `at_call`-th batch (1-based) all NaN images."""
    original = pipeline.TrainInput.__next__
    calls = []

    def poisoned(self):
        batch = original(self)
        calls.append(1)
        return {**batch, "image": batch["image"] * jnp.nan} if len(calls) == at_call else batch

    monkeypatch.setattr(pipeline.TrainInput, "__next__", poisoned)


def restore_run(workdir, step=None):
    """The state and record of a run's checkpoint, with the config the run saved beside it."""
    config = saved_config(workdir)
    mesh = parallel.make_mesh()
    model = models.model_class(config.model)(**config.model)
    optimizer = build_optimizer(config)
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=1)
    try:
        return checkpointer.restore(train_state_layout(config, model, optimizer, mesh).abstract, step)
    finally:
        checkpointer.close()


def test_a_nonfinite_loss_stops_before_anything_is_saved(tiny_config, tmp_path, monkeypatch):
    poison_batch(monkeypatch, at_call=3)
    tiny_config.checkpoint_every = 2
    tiny_config.log_every = 4
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"loss is nan .* at step 4; the last good checkpoint is step 2 in"):
        train(tiny_config, workdir, evaluate_at_end=False)
    state, _ = restore_run(workdir)
    assert int(state.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_a_nonfinite_update_is_skipped_when_configured(tiny_config, tmp_path, monkeypatch):
    poison_batch(monkeypatch, at_call=3)
    tiny_config.optimizer.skip_nonfinite = True
    tiny_config.log_every = 1
    state = train(tiny_config, str(tmp_path / "run"), evaluate_at_end=False)
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "run")) if "loss" in m]
    assert np.isnan(losses[2]) and np.all(np.isfinite(losses[3:]))
    assert int(state.step) == tiny_config.total_steps
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    assert int(state.opt_state.total_notfinite) == 1


def test_time_based_and_kept_checkpoints_and_logged_metrics(tiny_config, csv_file, tmp_path, monkeypatch):
    """Also the whole loop with FSDP and an EMA, on data decoded into memory with examples left out (counted in
    the metrics). The evaluation at the end, and `jclip.evaluate`'s of the checkpoint, use the EMA parameters."""
    directory = convert(csv_source(csv_file, caption_column="title"), "pairs", str(tmp_path))
    tiny_config.data.sources = ConfigDict({"pairs": dict(kind="tfds", name=directory, caption_key="captions")})
    tiny_config.data.preprocess = "decode|resize(64)|value_range(-1, 1)"
    evaluated = []

    def recorded_evaluator(config, model, params, *args):
        evaluated.append(jax.device_get(params))
        return make_evaluator(config, model, params, *args)

    monkeypatch.setattr("jclip.train.loop.make_evaluator", recorded_evaluator)
    tiny_config.parameter_sharding = "fsdp"
    tiny_config.ema_decay = 0.9
    tiny_config.checkpoint_every = 1000  # never by steps:
    tiny_config.checkpoint_every_minutes = 1e-9  # always by time, checked at log steps
    tiny_config.log_every = 2
    tiny_config.keep_checkpoints = 1
    tiny_config.keep_checkpoint_every = 4
    tiny_config.peak_flops_per_device = 1e12
    workdir = str(tmp_path / "run")
    state = train(tiny_config, workdir)
    assert not state.params["image_tower"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"].sharding.is_fully_replicated
    ema, params = jax.device_get((state.ema_params, state.params))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))
    assert len(evaluated) == 1
    assert_trees_equal(evaluated[0], ema)
    _, restored, _ = load_model(tiny_config, workdir, None, parallel.make_mesh(),
                                load_tokenizer(tiny_config.data.tokenizer, tiny_config.data.data_dir))
    assert_trees_equal(restored, ema)  # what `python -m jclip.evaluate` evaluates
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["step"] == tiny_config.total_steps
    kept = sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(workdir, "checkpoints", "*")))
    assert kept == [4, 8, 12]  # the last, plus every multiple of 4; 2, 6 and 10 were deleted
    metrics = read_metrics(workdir)[-1]
    for name in ("loss", "scale", "grad_norm", "learning_rate", "samples_per_second", "model_tflops_per_device",
                 "mfu", "alignment", "uniformity_image", "uniformity_text", "modality_gap", "accuracy_img2txt"):
        assert np.isfinite(metrics[name]), name
    np.testing.assert_allclose(metrics["mfu"], metrics["model_tflops_per_device"], rtol=1e-6)  # peak: 1 TFLOP/s
    counts = {(m["skipped_examples"], m["left_out_examples"]) for m in read_metrics(workdir) if "loss" in m}
    assert counts == {(0, len(CORRUPT | EMPTY_CAPTION) + 1)}  # left out: 2 corrupt, a blank caption, a missing file
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def micro_run_args(workdir, data_dir, total_steps, *extra):
    return ["--workdir", workdir, "--config.data.sources.shapes.config=tiny", "--config.data.tokenizer=shapes/tiny",
            "--config.evaluate.shapes_config=tiny", f"--config.data.data_dir={data_dir}", "--config.model_name=test-micro",
            "--config.data.shuffle_buffer=512", "--config.batch_size=32", f"--config.total_steps={total_steps}",
            "--config.optimizer.warmup_steps=2", *extra]


def test_a_kill_during_an_async_save_leaves_the_last_checkpoint_resumable(tiny_config, tmp_path):
    """SIGKILL the train command while a save is in flight; the re-run ends as an uninterrupted run."""
    total = 12
    workdir = str(tmp_path / "killed")
    checkpoints = os.path.join(workdir, "checkpoints")
    process = cli(*micro_run_args(workdir, tiny_config.data.data_dir, total, "--config.checkpoint_every=1",
                                  "--config.keep_checkpoints=3", "--config.log_every=1"))
    deadline = time.time() + 240
    while True:  # kill at a moment when a save is in flight (its temporary directory exists)
        assert process.poll() is None and time.time() < deadline, "the run ended before a save could be caught"
        names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
        if any("tmp" in name for name in names) and any(name.isdigit() for name in names):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.communicate(timeout=60)
    committed = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    assert committed < total
    state, _ = restore_run(workdir)
    assert int(state.step) == committed

    config = saved_config(workdir)  # what the command ran with; resume and compare in this process
    config.checkpoint_every = config.log_every = total  # saves and logs do not change the training
    resumed = train(config, workdir, evaluate_at_end=False)
    expected = train(config, str(tmp_path / "uninterrupted"), evaluate_at_end=False)
    assert int(resumed.step) == total
    assert_trees_equal(resumed.params, expected.params)
    assert_trees_equal(resumed.opt_state, expected.opt_state)
    assert restore_run(workdir)[1]["data_position"] == restore_run(str(tmp_path / "uninterrupted"))[1]["data_position"]
