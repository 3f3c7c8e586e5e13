"""The examples under `examples/` run as a user would run them."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO


def test_losses_example_trains_three_ways_to_the_same_curve():
    result = subprocess.run([sys.executable, "examples/losses_in_your_jax_code.py", "--steps", "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    curves = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(curves) == ["explicit mesh", "auto mesh", "shard_map + ring"]
    first = curves["explicit mesh"]
    assert len(first) == 2 and first[1] < first[0]  # it learns
    for way, curve in curves.items():
        np.testing.assert_allclose(curve, first, rtol=1e-5, err_msg=way)
