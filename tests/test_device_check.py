"""benchmarks/device_check.sh in its tiny CPU form: every stage runs or says why not, into one JSON."""

import json
import os
import subprocess
import sys

from conftest import REPO

STAGES = ("env", "throughput_bf16", "loss_memory", "loss_tests", "train_step_tests", "sharded_tests_cpu",
          "loss_tests_highest", "demo", "throughput_fp32")


def test_tiny_device_check_writes_every_stage(shapes_data_dir, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}  # no outer xdist
    env["PYTHON"] = sys.executable
    completed = subprocess.run(["bash", "benchmarks/device_check.sh", "--tiny", "--out", str(tmp_path),
                                "--data-dir", shapes_data_dir], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    stages = report["stages"]
    assert tuple(stages) == STAGES
    for name in STAGES:
        expected = "skipped" if name in ("loss_tests_highest", "throughput_fp32") else "ok"
        assert stages[name]["status"] == expected, (name, stages[name].get("tail") or stages[name].get("reason"))
        if expected == "ok":
            assert (tmp_path / stages[name]["log"]).exists()
    assert report["machine"]["jax"]["platform"] == "cpu" and report["machine"]["packages"]["jax"]
    assert report["machine"]["matmul_precision"]["highest"] < 1e-5
    throughput = stages["throughput_bf16"]["figures"]
    assert throughput["model"] == "test-micro" and throughput["precision"] == "bf16"
    assert throughput["samples_per_s"] > 0 and 0 < throughput["mfu"] and throughput["gflops_per_sample"] > 0
    assert stages["loss_memory"]["figures"]["rows"][0]["temp_mib"] > 0
    for name in ("loss_tests", "train_step_tests", "sharded_tests_cpu"):
        assert stages[name]["figures"]["passed"] > 0 and not stages[name]["figures"]["failures"]
    assert stages["demo"]["figures"]["steps"] == 3 and stages["demo"]["figures"]["results"]["step"] == 3
    assert "device check (tiny)" in completed.stdout
