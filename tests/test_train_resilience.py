"""Nothing is lost: non-finite losses, kills during a save, time-based and kept checkpoints, logs."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from conftest import REPO
from helpers import CORRUPT, EMPTY_CAPTION, assert_trees_equal, read_metrics, saved_config
from jclip import models, parallel
from jclip.checkpoint import CheckpointSaveError, Checkpointer, UnreadableCheckpointError, load_model
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


def test_hard_kills_at_each_moment_end_as_an_uninterrupted_run(shapes_data_dir, tmp_path):
    """SIGKILL during steps, during an asynchronous save and during an evaluation, restarted each time
    (benchmarks/kill_soak.py; `--kills 10` there for the report)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_soak", REPO / "benchmarks" / "kill_soak.py")
    kill_soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_soak)
    MOMENTS, soak = kill_soak.MOMENTS, kill_soak.soak

    result = soak(str(tmp_path), kills=3, seed=0, data_dir=shapes_data_dir)
    assert sorted(kill["moment"] for kill in result["kills"]) == sorted(MOMENTS)  # each moment once
    assert any(kill["logged_step"] > kill["committed_after"] for kill in result["kills"])  # steps were lost, redone
    assert result["equal"]


def damage(checkpoint_directory: str) -> None:
    """Cut the arrays' data files of a checkpoint to half their size, as a full disk or a bad copy leaves them."""
    for path in glob.glob(os.path.join(checkpoint_directory, "state", "*", "d", "*")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def test_an_unreadable_checkpoint_is_named_and_the_one_before_it_resumes(tiny_config, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    tiny_config.total_steps, tiny_config.checkpoint_every, tiny_config.keep_checkpoints = 4, 2, 3
    train(tiny_config, workdir, evaluate_at_end=False)
    damage(os.path.join(checkpoints, "4"))
    capsys.readouterr()

    mesh = parallel.make_mesh()
    with pytest.raises(UnreadableCheckpointError, match=r"checkpoints/4 cannot be read: OUT_OF_RANGE"):
        load_model(tiny_config, workdir, None, mesh, None)  # evaluation, a teacher, init_from: one line
    tiny_config.total_steps = 6
    tiny_config.resume_strict = True
    with pytest.raises(UnreadableCheckpointError, match=r"checkpoints/4 cannot be read \(OUT_OF_RANGE.*resume_strict"):
        train(tiny_config, workdir, evaluate_at_end=False)
    assert sorted(os.listdir(checkpoints)) == ["2", "4"] and not os.path.exists(os.path.join(workdir, "lock.json"))

    tiny_config.resume_strict = False
    assert int(train(tiny_config, workdir, evaluate_at_end=False).step) == 6
    output = capsys.readouterr().out
    assert "warning: checkpoint " + os.path.join(checkpoints, "4") + " cannot be read: OUT_OF_RANGE" in output
    assert (f"Moved the unreadable checkpoint(s) 4 to {os.path.join(workdir, 'damaged_checkpoints')} (delete them "
            "when you no longer need them); step 2 is the newest readable one.") in output
    assert f"Resuming from {checkpoints} at step 2." in output
    assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == ["4"]  # kept, never deleted
    assert [int(restore_run(workdir, step)[0].step) for step in (4, 6)] == [4, 6]  # saved anew, readable

    for step in ("4", "6"):
        damage(os.path.join(checkpoints, step))
    with open(os.path.join(checkpoints, "2", "record", "metadata"), "w") as f:
        f.write('{"data_posit')  # a torn record
    with pytest.raises(UnreadableCheckpointError, match=r"none of the 3 checkpoints in .*checkpoints can be read.*"
                                                        r"new --workdir"):
        train(tiny_config, workdir, evaluate_at_end=False)
    assert os.path.join(checkpoints, "2") + " cannot be read: Unterminated string" in capsys.readouterr().out
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]  # nothing moved when none can be read


def test_a_failed_save_stops_the_run_or_is_tried_again_and_the_one_before_stays(tiny_config, tmp_path, monkeypatch,
                                                                               capsys):
    """A full disk while checkpoint 2 is written (in the background: the failure shows at the next save)."""
    import errno

    from orbax.checkpoint._src.path import async_path

    committing = async_path.rename  # the last act of a save: its temporary directory renamed

    async def disk_full_at_step_2(source, target):
        if os.path.basename(str(target)) == "2":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await committing(source, target)

    monkeypatch.setattr(async_path, "rename", disk_full_at_step_2)
    tiny_config.total_steps, tiny_config.checkpoint_every, tiny_config.log_every = 4, 1, 4
    workdir = str(tmp_path / "stopped")
    with pytest.raises(CheckpointSaveError, match=r"saving checkpoint 2 in .*checkpoints failed: \[Errno 28\] No space "
                                                  r"left on device. The checkpoint of step 1 is intact: free space"):
        train(tiny_config, workdir, evaluate_at_end=False)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # the partial save removed
    assert int(restore_run(workdir)[0].step) == 1

    tiny_config.checkpoint_failure = "retry"
    workdir = str(tmp_path / "retried")
    assert int(train(tiny_config, workdir, evaluate_at_end=False).step) == 4
    assert "warning: saving checkpoint 2 in" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]  # the last 2 kept
