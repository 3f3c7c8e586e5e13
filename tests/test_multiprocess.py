"""Training across several processes (jax.distributed on loopback, gloo collectives): the multi-host path."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(workdir, data_dir, steps, stop_after=None, processes=2):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = [str(workdir), str(data_dir), str(steps)] + ([str(stop_after)] if stop_after else [])
    launched = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multiprocess_worker.py"), str(i),
                                  str(processes), str(port), *args], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    outputs = [p.communicate(timeout=300)[0] for p in launched]
    for p, output in zip(launched, outputs):
        assert p.returncode == 0, output[-3000:]


def test_two_processes_train_and_resume_exactly(tmp_path, shapes_data_dir):
    run_processes(tmp_path / "straight", shapes_data_dir, steps=6)
    run_processes(tmp_path / "resumed", shapes_data_dir, steps=6, stop_after=3)
    run_processes(tmp_path / "resumed", shapes_data_dir, steps=6)
    straight = np.load(tmp_path / "straight" / "params_step6.npz")
    resumed = np.load(tmp_path / "resumed" / "params_step6.npz")
    for key in straight.files:
        np.testing.assert_array_equal(straight[key], resumed[key])
    with open(tmp_path / "resumed" / "checkpoints" / "6" / "record" / "metadata") as f:
        record = json.load(f)
    assert record["data_position"] == [6 * 8, 6 * 8]  # each process drew its half of every batch
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]
