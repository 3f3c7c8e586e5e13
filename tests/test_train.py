"""The sharded train step, the loop, checkpoints and resume."""

import concurrent.futures
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from batches import random_batch
from conftest import REPO, load_config
from helpers import assert_trees_close, assert_trees_equal, cli, command_line, init_params, read_metrics, saved_config
from jclip import models, parallel
from jclip.checkpoint import Checkpointer, ModelMismatchError
from jclip.data import pipeline
from jclip.evaluate.from_checkpoint import evaluate_checkpoint
from jclip.host_memory import reuse_freed_memory
from jclip.train import loop
from jclip.train.loop import train
from jclip.train.optimizer import (build_optimizer, clip_trained_by_global_norm, learning_rate_schedule,
                                   weight_decay_mask)
from jclip.train.profiling import StepProfiler, parse_step_range
from jclip.train.state import state_layout
from jclip.train.step import make_gradient_step


def test_sharded_gradients_equal_single_device_gradients():
    model = models.create("test-micro")
    batch = random_batch(16)
    params = init_params(model, batch)
    results = {}
    for devices in (1, 2, 8):
        mesh = parallel.make_mesh(devices)
        step = make_gradient_step(model, mesh)
        results[devices] = jax.device_get(step(params, parallel.global_batch(batch, mesh)))
    loss_1, grads_1 = results[1]
    assert np.isfinite(loss_1) and loss_1 > 0
    for devices in (2, 8):
        loss_n, grads_n = results[devices]
        np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
        assert_trees_close(grads_n, grads_1, rtol=1e-4, atol_fraction=1e-6)
    assert abs(float(grads_1["logit_scale"])) > 0


def test_gradient_caching_equals_the_full_batch_gradient():
    model = models.create("test-micro")
    batch = random_batch(32)
    params = init_params(model, batch)
    full_loss, full_grads = jax.device_get(make_gradient_step(model, parallel.make_mesh(1))(params, batch))
    for devices, micro_batches in ((1, 4), (8, 2)):
        mesh = parallel.make_mesh(devices)
        step = make_gradient_step(model, mesh, micro_batches=micro_batches)
        loss, grads = jax.device_get(step(params, parallel.global_batch(batch, mesh)))
        np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
        assert_trees_close(grads, full_grads, rtol=1e-4, atol_fraction=1e-6)
    assert abs(float(full_grads["logit_scale"])) > 0


def test_weight_decay_skips_biases_norms_scale_and_position_embeddings():
    model = models.create("test-micro", vision={"num_registers": 2})
    batch = random_batch(2)
    params = model.init(jax.random.key(0), batch["image"], batch["tokens"])["params"]
    mask = weight_decay_mask(params)
    assert mask["image_tower"]["proj"]["kernel"] and mask["text_tower"]["token_embedding"]["embedding"]
    assert not mask["logit_scale"] and not mask["image_tower"]["pos_embedding"]
    assert not mask["image_tower"]["cls_token"] and not mask["text_tower"]["ln_final"]["scale"]
    assert not mask["image_tower"]["registers"]


def test_short_run_lowers_loss_and_evaluates(tiny_config, tmp_path, monkeypatch):
    tiny_config.total_steps = 40
    tiny_config.optimizer.learning_rate = 3e-3
    tiny_config.log_every = 5
    tiny_config.evaluate.every_steps = 20
    tiny_config.profile_steps = "3:5"
    workdir = str(tmp_path / "run")
    closed, close = [], pipeline.TrainInput.close
    monkeypatch.setattr(pipeline.TrainInput, "close", lambda stream: closed.append(close(stream)))
    train(tiny_config, workdir)
    assert len(closed) == 1  # the run ended its input's thread
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    lines = read_metrics(workdir)
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.85 * losses[0], losses
    evaluations = [m for m in lines if "eval/shapes/zero_shot/shape/all" in m]
    assert [m["step"] for m in evaluations] == [20]
    assert {"eval/compositionality/swap_attributes/accuracy", "eval/shape_probe/full/best"} <= set(evaluations[0])
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 40 and set(results["tasks"]) == set(tiny_config.evaluate.tasks)
    shapes_results = results["tasks"]["shapes"]
    assert set(shapes_results["zero_shot"]) == {"shape", "colour"}
    image_to_text = shapes_results["retrieval"]["image_to_text"]
    assert 0.0 <= image_to_text["R@1"] <= image_to_text["R@5"] <= 1.0
    assert os.path.exists(os.path.join(workdir, "plots", "compositionality.png"))
    os.remove(os.path.join(workdir, "results.json"))
    assert evaluate_checkpoint(tiny_config, workdir) == results  # what `python -m jclip.evaluate` does


def test_the_profiler_starts_and_stops_once_the_next_batch_is_made(tmp_path, monkeypatch):
    """`StepProfiler` settles the batch thread before it starts and stops a trace; a closed TrainInput's
    thread has ended, the batch it was making dropped."""
    events = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory: events.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append("stop"))
    profiler = StepProfiler("1:3", str(tmp_path / "profile"), settle=lambda: events.append("settle"))
    for step in range(4):
        profiler.before(step)
        profiler.after(step, jnp.zeros(()))
    assert events == ["settle", "start", "settle", "stop"]
    made = []

    class Stream(pipeline.TrainInput):  # its batches are numbers, made slowly
        def __init__(self):
            self.position, self.skipped, self._ahead = 0, 0, None
            self._maker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jclip-batches-test")

        def _device_batch(self, position):
            time.sleep(0.2)
            made.append(position)
            return position, position + 1, 0

    with Stream() as stream:
        assert next(stream) == 0 and made == [0]
    assert made == [0, 1] and stream._ahead is None and not any(
        thread.name.startswith("jclip-batches-test") for thread in threading.enumerate())


def restore_params(config, workdir):
    mesh = parallel.make_mesh()
    model = models.CLIP(**config.model)
    layout = state_layout(model, build_optimizer(config), (64, 64, 3), config.data.text_length, mesh)
    state, record = Checkpointer(workdir, config.model.to_dict(), save_every=1).restore(layout.abstract)
    return state, record


def test_checkpoint_restores_identical_state_and_cpu_steps_never_queue(tiny_config, tmp_path, monkeypatch):
    """Also: on CPU the loop queues a step only when the step before is done (one step's temporary buffers at
    a time). Each step's metrics come 50 ms late, so a loop that queued steps would find them pending."""
    step_outputs, pending_at_dispatch = [], []
    original_step = loop.config_train_step

    def late_step(config, layout):
        step = original_step(config, layout)
        delay = jax.jit(lambda tree: jax.pure_callback(lambda x: (time.sleep(0.05), x)[1], tree, tree))

        def stepped(state, batch):
            pending_at_dispatch.append(not all(x.is_ready() for x in jax.tree.leaves(step_outputs[-1:])))
            state, metrics = step(state, batch)
            step_outputs.append(delay(metrics))
            return state, step_outputs[-1]
        return stepped

    monkeypatch.setattr(loop, "config_train_step", late_step)
    workdir = str(tmp_path / "run")
    final = train(tiny_config, workdir, evaluate_at_end=False)
    assert pending_at_dispatch == [False] * tiny_config.total_steps
    restored, record = restore_params(tiny_config, workdir)
    assert int(restored.step) == tiny_config.total_steps
    assert record["data_position"] == [tiny_config.total_steps * tiny_config.batch_size]
    assert_trees_equal(restored.params, final.params)
    assert_trees_equal(restored.opt_state, final.opt_state)


def test_run_stopped_by_ctrl_c_resumes_exactly(tiny_config, csv_file, tmp_path, monkeypatch):
    """2N steps straight equal N steps + Ctrl-C (SIGINT) + restart + N steps: params, optimizer state, data
    position. The data is read per visit from a CSV whose unusable examples `skipped_examples` counts."""
    tiny_config.data.sources = ConfigDict({"pairs": dict(kind="csv", path=csv_file, caption_column="title")})
    tiny_config.data.preprocess = "decode|resize(64)|value_range(-1, 1)"
    uninterrupted = train(tiny_config, str(tmp_path / "a"), evaluate_at_end=False)
    _, uninterrupted_record = restore_params(tiny_config, str(tmp_path / "a"))
    drawn = uninterrupted_record["data_position"][0]
    logged = read_metrics(str(tmp_path / "a"))[-1]
    assert logged["skipped_examples"] == drawn - tiny_config.total_steps * tiny_config.batch_size > 0
    assert logged["left_out_examples"] == 0
    original, calls = pipeline.TrainInput.__next__, []

    def interrupted_at_step_6(self):  # Ctrl-C while step 6 runs
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(pipeline.TrainInput, "__next__", interrupted_at_step_6)
    workdir = str(tmp_path / "b")
    try:
        stopped = train(tiny_config, workdir, evaluate_at_end=False)
    except KeyboardInterrupt:  # a test failure, not the end of the pytest session
        pytest.fail("Ctrl-C interrupted the run instead of stopping it with a checkpoint")
    assert int(stopped.step) == 6 == tiny_config.total_steps // 2
    monkeypatch.setattr(pipeline.TrainInput, "__next__", original)
    resumed = train(tiny_config, workdir, evaluate_at_end=False)
    assert int(resumed.step) == tiny_config.total_steps
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
    assert restore_params(tiny_config, workdir)[1]["data_position"] == uninterrupted_record["data_position"]
    steps = [m["step"] for m in read_metrics(workdir)]  # no step logged twice
    assert steps == sorted(set(steps)) and steps[-1] == tiny_config.total_steps
    assert read_metrics(workdir)[-1]["skipped_examples"] == logged["skipped_examples"]  # counted across the resume


def test_bad_profile_steps_and_host_memory_opt_out(monkeypatch):
    for spec in ("5", "5:5", "a:b", "-1:3"):
        with pytest.raises(ValueError, match="use 'a:b' with 0 <= a < b"):
            parse_step_range(spec)
    assert parse_step_range("10:15") == (10, 15)
    monkeypatch.setenv("JCLIP_HOST_MALLOC", "default")
    assert reuse_freed_memory() is False


def test_prepared_cpu_host_runs_a_step_before_the_call_returns():
    """With `prepare_host` (as the entry points), a one-device CPU computation is done when its call returns, so
    the next one never allocates its buffers beside it; without it, the call returns at once."""
    program = ("import sys\n"
               "from jclip.host_memory import prepare_host\n"
               "if sys.argv[1] == 'prepared': prepare_host()\n"
               "import jax, jax.numpy as jnp\n"
               "slow = jax.jit(lambda x: jax.lax.fori_loop(0, 8, lambda i, y: jnp.tanh(y @ y), x))\n"
               "x = jnp.ones((1500, 1500)) / 1500\n"
               "print(slow(x).block_until_ready() is not None and slow(x).is_ready())\n")
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ready = {how: subprocess.run([sys.executable, "-c", program, how], env=environment, capture_output=True,
                                 text=True, check=True).stdout.split()[-1] for how in ("prepared", "default")}
    assert ready == {"prepared": "True", "default": "False"}


def test_bad_batch_size_is_a_clear_error(tiny_config, tmp_path):
    tiny_config.batch_size = 30
    with pytest.raises(ValueError, match=r"batch_size=30 is not divisible by the number of devices \(8\)"):
        train(tiny_config, str(tmp_path / "run"))


def test_checkpoint_of_another_model_is_refused(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.total_steps = 4
    train(tiny_config, workdir, evaluate_at_end=False)
    tiny_config.model.text.depth = 2
    with pytest.raises(ModelMismatchError, match=r"text.depth: checkpoint has 1, config has 2"):
        train(tiny_config, workdir)


def test_unknown_config_key_is_one_clear_line(tmp_path):
    process = cli("--workdir", str(tmp_path), "--config.batch_sise=8")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert 'Did you mean "batch_size"' in output and "Traceback" not in output, output


def test_a_config_file_that_customises_its_model_refuses_another_model_name(tmp_path):
    """`--config.model_name` replaces config.model; a file's own changes to its model would be lost, so that stops."""
    config_file = tmp_path / "wider.py"
    config_file.write_text(f"import runpy\n\ndef get_config():\n"
                           f"    config = runpy.run_path({str(REPO / 'configs' / 'shapes_tiny.py')!r})['get_config']()\n"
                           f"    config.model.embed_dim = 256\n    return config\n")
    process = subprocess.run([sys.executable, "-m", "jclip.train", "--config", str(config_file), "--workdir",
                              str(tmp_path / "run"), "--config.model_name=test-micro"], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert process.returncode != 0 and "Traceback" not in process.stderr, process.stderr
    assert "customises config.model (embed_dim)" in process.stderr and "--config.model.FIELD=VALUE" in process.stderr
    # Naming the file's own model again changes nothing: its customisation and the overrides stay.
    from jclip.cli import load_config_file, model_from_command_line

    config = load_config_file(config_file)
    model_from_command_line(config, {"model_name": "shapes-tiny"}, str(config_file))
    assert config.model.embed_dim == 256


def test_execution_options_are_command_line_fields_that_keep_the_model(tiny_config, tmp_path):
    """The README's `model.dtype`, `matmul_dtype`, `remat` and `vision.patch_dropout` are fields the command line
    sets; they choose how the model computes, not what, so a checkpoint resumes under other values, and a record
    written before configurations spelt them out matches too."""
    config = command_line(REPO / "configs" / "shapes_tiny.py", "--config.model.dtype=bfloat16",
                          "--config.model.matmul_dtype=bfloat16", "--config.model.remat=True",
                          "--config.model.vision.patch_dropout=0.5")
    assert (config.model.dtype, config.model.matmul_dtype, config.model.remat, config.model.vision.patch_dropout) == (
        "bfloat16", "bfloat16", True, 0.5)
    workdir = str(tmp_path / "run")
    tiny_config.total_steps = 2
    train(tiny_config, workdir, evaluate_at_end=False)
    tiny_config.total_steps = 3
    tiny_config.model.matmul_dtype, tiny_config.model.remat, tiny_config.model.vision.patch_dropout = "bfloat16", True, 0.25
    assert int(train(tiny_config, workdir, evaluate_at_end=False).step) == 3
    older = {k: v for k, v in models.model_config("test-micro").items() if k not in models.registry.EXECUTION_DEFAULTS}
    older["vision"] = {k: v for k, v in older["vision"].items() if k != "patch_dropout"}
    assert models.architecture_differences(older, tiny_config.model.to_dict()) == []
    assert models.architecture_differences(older, models.model_config("test-micro", embed_dim=8)) == [
        ("embed_dim", 16, 8)]


def test_sigterm_saves_and_rerun_resumes(tiny_config, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    args = ["--workdir", workdir, "--config.data.sources.shapes.config=tiny", "--config.data.tokenizer=shapes/tiny",
            "--config.evaluate.shapes_config=tiny",
            f"--config.data.data_dir={tiny_config.data.data_dir}", "--config.model_name=test-micro",
            "--config.model.text.depth=2", "--config.batch_size=32",
            "--config.total_steps=100000", "--config.checkpoint_every=100000", "--config.log_every=1"]
    process = cli(*args)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and len(read_metrics(workdir)) >= 3):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Stopped at step" in output
    saved = int(output.split("Stopped at step ")[1].split()[0])
    assert saved >= 3
    config = saved_config(workdir)  # the command's own config; re-run it in this process
    # --config.model_name picked the model, and the --config.model.* override applies on top of it
    assert config.model.to_dict() == models.model_config("test-micro", text={"depth": 2})
    config.total_steps = saved + 2
    assert int(train(config, workdir, evaluate_at_end=False).step) == saved + 2
    assert f"at step {saved}" in capsys.readouterr().out
    assert read_metrics(workdir)[-1]["step"] == saved + 2


def test_train_step_clamps_scale_at_max():
    from jclip.train.state import create_train_state
    from jclip.train.step import make_train_step

    layout = state_layout(models.create("test-micro"), build_optimizer(load_config("shapes_tiny")), (32, 32, 3), 16,
                          parallel.make_mesh(2))
    state = create_train_state(layout, jax.random.key(0))
    state = state.replace(params={**state.params, "logit_scale": jnp.log(jnp.float32(150.0))})
    state, metrics = make_train_step(layout)(state, parallel.global_batch(random_batch(8), layout.mesh))
    assert float(metrics["scale"]) == pytest.approx(150.0)
    assert float(jnp.exp(state.params["logit_scale"])) == pytest.approx(100.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    config = load_config("shapes_tiny")
    config.optimizer.schedule = schedule
    rates = [float(learning_rate_schedule(config)(step)) for step in (0, 50, 100, 500, 999)]
    peak = config.optimizer.learning_rate
    assert rates[0] == 0 and rates[1] == pytest.approx(peak / 2) and rates[2] == pytest.approx(peak)
    assert rates[3] <= rates[2] and rates[4] <= rates[3]
    if schedule in ("cosine", "linear"):
        assert rates[4] == pytest.approx(config.optimizer.end_learning_rate, abs=1e-5)


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor"])
def test_optimizers_freeze_groups_and_scale_rates(name):
    """Frozen groups and multiplier 0 get no update; multiplier 0.5 halves its group's updates, decay included."""
    config = load_config("shapes_tiny")
    config.optimizer.name = name
    config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
    config.optimizer.grad_clip_norm = float("inf")  # clipping, which freezing changes, is tested on its own
    model = models.create("test-micro")
    batch = random_batch(2)
    params = model.init(jax.random.key(0), batch["image"], batch["tokens"])["params"]
    grads = jax.tree.map(jnp.ones_like, params)

    def first_update():
        optimizer = build_optimizer(config)
        return jax.device_get(optimizer.update(grads, optimizer.init(params), params)[0])

    plain = first_update()
    config.optimizer.frozen = ("image_tower",)
    config.optimizer.lr_multipliers = {"logit_scale": 0.0, "text_tower": 0.5}
    updates = first_update()
    assert all(np.abs(u).max() == 0 for u in jax.tree.leaves(updates["image_tower"]))
    assert updates["logit_scale"] == 0 != plain["logit_scale"]
    assert all(np.abs(u).max() > 0 for u in jax.tree.leaves(plain["text_tower"]))
    assert_trees_close(updates["text_tower"], jax.tree.map(lambda full: full / 2, plain["text_tower"]), rtol=1e-5)
    config.optimizer.frozen = ("vision_tower",)
    with pytest.raises(ValueError, match=r"unknown parameter groups \['vision_tower'\]"):
        build_optimizer(config).init(params)


def test_frozen_groups_do_not_count_in_the_clipping_norm():
    """Clipping sees only the groups that train (big_vision): a frozen group's large gradient changes nothing."""
    rng = np.random.default_rng(0)
    trained = {"text_tower": {"w": rng.normal(size=(4, 3)).astype(np.float32)}, "logit_scale": np.float32(3.0)}
    clip = clip_trained_by_global_norm(1.0, frozen=("image_tower",))
    for frozen_gradient in (0.0, 1e6):
        updates = {**trained, "image_tower": {"w": np.full((5,), frozen_gradient, np.float32)}}
        clipped, _ = clip.update(updates, clip.init(updates))
        want, _ = optax.clip_by_global_norm(1.0).update(trained, optax.EmptyState())
        assert_trees_close({k: clipped[k] for k in trained}, want, rtol=1e-6)
    assert jax.tree.structure(clip.init(trained)) == jax.tree.structure(optax.clip_by_global_norm(1.0).init(trained))


def test_nonfinite_updates_are_skipped_when_asked():
    config = load_config("shapes_tiny")
    config.optimizer.skip_nonfinite = True
    params = {"w": jnp.ones((2, 2))}
    optimizer = build_optimizer(config)
    state = optimizer.init(params)
    updates, state = optimizer.update({"w": jnp.full((2, 2), jnp.nan)}, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0 and int(state.total_notfinite) == 1
