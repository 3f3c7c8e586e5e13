"""Training across several processes (jax.distributed on loopback, gloo collectives): the multi-host path."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from conftest import REPO
from helpers import assert_trees_close, assert_trees_equal, free_port, read_metrics, run_workers
from multiprocess_worker import worker_config
import xla_flags


def run_processes(workdir, data_dir, steps, *sigterm_after, processes=2):
    """`tests/multiprocess_worker.py`: `train()` to `steps` in `processes` processes; returns their outputs."""
    return run_workers("multiprocess_worker.py", processes, workdir, data_dir, steps,
                       *([",".join(map(str, sigterm_after))] if sigterm_after else []))


def run_topology(workdir, end_step, processes, devices_per_process, sharding, middle_step=None):
    """`tests/topology_worker.py` as `processes` processes of `devices_per_process` devices each."""
    run_workers("topology_worker.py", processes, devices_per_process, workdir, end_step, sharding,
                *([middle_step] if middle_step else []))
    return np.load(os.path.join(workdir, f"params_{end_step}.npz"))


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def resume_copy(workdir, step, copy):
    """A copy of `workdir` whose latest checkpoint is `step`, without the parameter files
    (`params_*.npz`) its runs wrote: whatever a run in the copy is compared by, it wrote itself."""
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("params_*.npz"))
    checkpoints = os.path.join(copy, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    assert checkpoint_steps(copy)[-1] == step
    return copy


def read_record(workdir, step) -> dict:
    with open(os.path.join(workdir, "checkpoints", str(step), "record", "metadata")) as f:
        return json.load(f)


def assert_params_close(actual, expected):
    """Equal up to summation order: within 1e-5, half a percent of one step (learning rate 2e-3)."""
    assert_trees_close(dict(actual), dict(expected), rtol=1e-4, atol=1e-5)


def test_two_hosts_of_four_devices_equal_one_host_of_eight_and_resume_each_other(tmp_path):
    """2 processes × 4 devices (FSDP) train like 1 process × 8 devices (replicated), and each resumes
    the other's checkpoint: the checkpoint is independent of the topology and the sharding."""
    one_host = run_topology(tmp_path / "one_host", 4, 1, 8, "replicated", middle_step=2)
    two_hosts = run_topology(tmp_path / "two_hosts", 4, 2, 4, "fsdp", middle_step=2)
    assert_params_close(two_hosts, one_host)
    halfway = np.load(tmp_path / "one_host" / "params_2.npz")
    assert not np.allclose(halfway["arr_0"], one_host["arr_0"], rtol=1e-4, atol=1e-5)  # steps 3, 4 matter
    two_then_one = resume_copy(tmp_path / "two_hosts", 2, tmp_path / "two_then_one")
    assert_params_close(run_topology(two_then_one, 4, 1, 8, "replicated"), one_host)
    one_then_two = resume_copy(tmp_path / "one_host", 2, tmp_path / "one_then_two")
    assert_params_close(run_topology(one_then_two, 4, 2, 4, "fsdp"), one_host)


def test_two_processes_resume_exactly_stop_together_on_sigterm_and_resume_on_one(tmp_path, shapes_data_dir, capsys):
    """`train()` in 2 processes: resumed, it continues exactly as the straight run; SIGTERM reaching
    the processes a step apart stops both at one step, saved once; and 1 process resumes the
    2 processes' checkpoint from an even split of the examples they drew."""
    straight = tmp_path / "straight"
    run_processes(straight, shapes_data_dir, 8)  # checkpoints at steps 3, 6 and 8
    losses = [m["loss"] for m in read_metrics(straight)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert read_record(straight, 6)["data_position"] == [6 * 8, 6 * 8]  # each process drew its half of every batch

    # Resumed at step 3, process 0 gets SIGTERM after step 4, process 1 after step 5 (or while it saves, if
    # the run stops first). JAX's preemption service stops both at the step after the last one either had
    # asked about at the notice (4 or later), and that step is saved once.
    stopped = resume_copy(straight, 3, tmp_path / "stopped")
    outputs = run_processes(stopped, shapes_data_dir, 8, 4, 5)
    stops = [re.findall(r"Stopped at step (\d+) on request", output) for output in outputs]
    assert all("at step 3." in output for output in outputs) and "SIGTERM after step 4" in outputs[0]
    assert len(stops[0]) == 1 and stops[0] == stops[1], "\n".join(output[-3000:] for output in outputs)
    stop = int(stops[0][0])
    assert 4 <= stop < 8 and checkpoint_steps(stopped) == sorted({3, stop, *([6] if stop > 6 else [])})
    assert read_record(stopped, stop)["data_position"] == [stop * 8, stop * 8]
    # The same command again continues from the stop, exactly as the straight run.
    for output in run_processes(stopped, shapes_data_dir, 8):
        assert f"at step {stop}." in output, output[-3000:]
    expected = np.load(straight / "params_step8.npz")
    resumed = np.load(stopped / "params_step8.npz")
    assert_trees_equal(dict(resumed), dict(expected))
    assert read_record(stopped, 8)["data_position"] == [8 * 8, 8 * 8]

    # One process (this one) resumes step 3 of the two: it continues from the 2 × 24 examples drawn.
    from jclip.train.loop import train

    one_process = resume_copy(straight, 3, tmp_path / "one_process")
    capsys.readouterr()
    state = train(worker_config(shapes_data_dir, 6), str(one_process), evaluate_at_end=False)
    assert "written by 2 processes" in capsys.readouterr().out and int(state.step) == 6
    assert read_record(one_process, 6)["data_position"] == [2 * 3 * 8 + 3 * 16]


def test_even_split_of_the_data_position_over_another_process_count(monkeypatch):
    """`start_position`: the same count continues each process's own position; another count splits the sum."""
    import jax

    from jclip.train.loop import start_position

    record = {"data_position": [30, 31, 35]}
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    assert start_position(record, None) == 35
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert start_position(record, None) == 48


def test_train_command_joins_a_multihost_job(tmp_path, shapes_data_dir):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags.with_devices(2)}
    args = ["--config", "configs/shapes_tiny.py", "--workdir", str(tmp_path / "run"), "--multihost",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--config.data.sources.shapes.config=tiny", "--config.data.tokenizer=shapes/tiny",
            f"--config.data.data_dir={shapes_data_dir}", "--config.evaluate.shapes_config=tiny",
            "--config.model.vision.depth=1", "--config.model.text.depth=1", "--config.model.vision.width=32",
            "--config.model.text.width=32", "--config.model.vision.stem=patch", "--config.model.vision.num_heads=2",
            "--config.model.text.num_heads=2", "--config.model.embed_dim=16", "--config.batch_size=16",
            "--config.total_steps=2", "--config.evaluate.batch_size=64"]
    launched = [subprocess.Popen([sys.executable, "-m", "jclip.train", *args, f"--process_id={i}"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in launched]
    assert all(p.returncode == 0 for p in launched), outputs[0][-3000:] + outputs[1][-3000:]
    assert "Evaluation of" in outputs[0] and "Evaluation of" not in outputs[1]  # process 0 reports
