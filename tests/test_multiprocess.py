"""Training across several processes (jax.distributed on loopback, gloo collectives): the multi-host path."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, processes: int, *args) -> None:
    """`tests/<script> PROCESS_ID NUM_PROCESSES PORT *args` as `processes` processes joined on loopback."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # each worker sets its own device count
    launched = [subprocess.Popen([sys.executable, str(REPO / "tests" / script), str(i), str(processes), str(port),
                                  *map(str, args)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(processes)]
    outputs = [p.communicate(timeout=300)[0] for p in launched]
    for p, output in zip(launched, outputs):
        assert p.returncode == 0, output[-3000:]


def run_processes(workdir, data_dir, steps, processes=2):
    run_workers("multiprocess_worker.py", processes, workdir, data_dir, steps)


def run_topology(workdir, end_step, processes, devices_per_process, sharding, middle_step=None):
    """`tests/topology_worker.py` as `processes` processes of `devices_per_process` devices each."""
    run_workers("topology_worker.py", processes, devices_per_process, workdir, end_step, sharding,
                *([middle_step] if middle_step else []))
    return np.load(os.path.join(workdir, f"params_{end_step}.npz"))


def resume_copy(workdir, step, copy):
    """A copy of `workdir` whose latest checkpoint is `step`."""
    shutil.copytree(workdir, copy)
    checkpoints = os.path.join(copy, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    assert max(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == step
    return copy


def assert_params_close(actual, expected):
    """Equal up to summation order: within 1e-5, half a percent of one step (learning rate 2e-3)."""
    for key in expected.files:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-5)


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


def test_two_processes_train_and_resume_exactly(tmp_path, shapes_data_dir):
    run_processes(tmp_path / "straight", shapes_data_dir, steps=6)  # checkpoints at steps 3 and 6
    run_processes(resume_copy(tmp_path / "straight", 3, tmp_path / "resumed"), shapes_data_dir, steps=6)
    straight = np.load(tmp_path / "straight" / "params_step6.npz")
    resumed = np.load(tmp_path / "resumed" / "params_step6.npz")
    for key in straight.files:
        np.testing.assert_array_equal(straight[key], resumed[key])
    with open(tmp_path / "resumed" / "checkpoints" / "6" / "record" / "metadata") as f:
        record = json.load(f)
    assert record["data_position"] == [6 * 8, 6 * 8]  # each process drew its half of every batch
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_train_command_joins_a_multihost_job(tmp_path, shapes_data_dir):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
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
