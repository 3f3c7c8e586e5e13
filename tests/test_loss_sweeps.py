"""benchmarks/loss_sweeps.py at its smallest (2 steps, 1 seed), so the script behind the README's loss tables
cannot rot, and its tolerance measure against the definition."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from jclip.data import shapes

sys.path.insert(0, str(REPO / "benchmarks"))
import loss_sweeps  # noqa: E402  (a script, importable once benchmarks/ is on the path)


def sweep(workdir, data_dir):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["JCLIP_DATA_DIR"] = data_dir
    completed = subprocess.run(
        [sys.executable, "benchmarks/loss_sweeps.py", "--claims", "dcl,temperature", "--seeds", "1",
         "--examples", "16", "--batches", "8", "--temperatures", "0.1", "--temperature-batch", "8",
         "--dcl-temperature", "0.1",
         "--parallel", "3", "--shapes-config", "tiny", "--model", "test-micro", "--workdir", str(workdir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_the_smallest_sweep_writes_its_tables_and_figures_and_a_second_call_reuses_the_runs(shapes_data_dir, tmp_path):
    out = sweep(tmp_path, shapes_data_dir)
    assert "3 runs in" in out and "3 to do" in out
    runs = ("clip_tau0.1_batch8_seed0", "dcl_tau0.1_batch8_seed0", "clip_batch8_seed0")  # clip at τ 0.1: shared
    assert all((tmp_path / run / "sweep_result.json").exists() for run in runs)
    tables = (tmp_path / "tables.md").read_text()
    assert "### dcl against clip by batch size (both at a fixed τ = 0.1;" in tables and "| 8 (2) |" in tables
    assert "| 0.1 (10) |" in tables and "| learned (ends at" in tables
    assert "siglip" not in tables
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"dcl.png", "temperature.png"}
    fixed = json.loads((tmp_path / "clip_tau0.1_batch8_seed0" / "sweep_result.json").read_text())
    assert abs(fixed["result"]["scale"] - 10.0) < 1e-4  # optimizer.frozen kept the scale at 1/τ
    assert fixed["setting"] == {"examples": 16, "shapes_config": "tiny", "model": "test-micro"}

    other = loss_sweeps.argparse.Namespace(workdir=str(tmp_path), examples=24, shapes_config="tiny", model="test-micro")
    with pytest.raises(SystemExit, match=r"was trained with \{'examples': 16, .* use another --workdir"):
        loss_sweeps.collect(loss_sweeps.planned_runs(loss_sweeps.argparse.Namespace(
            claims=["dcl"], seeds=1, batches=[8], dcl_temperature=0.1)), other)

    again = sweep(tmp_path, shapes_data_dir)
    assert "0 to do" in again and tables == (tmp_path / "tables.md").read_text()


def test_tolerance_is_the_mean_similarity_of_different_images_of_one_shape():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 5))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    none = len(shapes.SHAPES)
    data = {"shape": np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2]),
            "shape2": np.array([none] * 9 + [0, 1, 2])}  # the last three have a second object: left out
    pairs = [z[i] @ z[j] for i in range(9) for j in range(9) if i != j and data["shape"][i] == data["shape"][j]]
    np.testing.assert_allclose(loss_sweeps.tolerance(z, data), np.mean(pairs), rtol=1e-12)
