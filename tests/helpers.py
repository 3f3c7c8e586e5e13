"""Helpers the test modules share: tree comparisons, small test data, a training run's files and command, and
worker processes joined on loopback. (Fixtures are in conftest.py.)

Tree comparisons: `assert_trees_equal` to the last bit; `assert_trees_close` within

    |actual - expected| <= atol + atol_fraction * largest + rtol * |expected|

entry by entry, where `largest` is the largest |entry| of the whole expected tree, or with `per_leaf=True` of
the entry's own leaf. The absolute part scaled by the largest entry is what float32 sums call for: their
rounding errors grow with the largest terms, and entries that are zero up to rounding (attention key
biases' gradients) have no scale of their own for `rtol` to use.
"""

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import REPO


def _same_structure(actual, expected):
    """Both trees' leaves, paired with their paths; fails unless the trees have one structure."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"trees differ in structure: {jax.tree.structure(actual)} and {jax.tree.structure(expected)}")
    paths_and_leaves = jax.tree.leaves_with_path(expected)
    return [(jax.tree_util.keystr(path), a, e) for (path, e), a in zip(paths_and_leaves, jax.tree.leaves(actual))]


def assert_trees_equal(actual, expected):
    """One structure, every leaf equal to the last bit."""
    for path, a, e in _same_structure(actual, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=path)


def _largest(leaf) -> float:
    return float(np.max(np.abs(np.asarray(leaf)), initial=0.0))


def assert_trees_close(actual, expected, *, rtol, atol=0.0, atol_fraction=0.0, per_leaf=False):
    """One structure, every entry within `atol + atol_fraction * largest + rtol * |expected|` (the module
    docstring): `largest` of the whole `expected` tree, or with `per_leaf=True` of each leaf."""
    pairs = _same_structure(actual, expected)
    largest = max((_largest(e) for _, _, e in pairs), default=0.0)
    for path, a, e in pairs:
        scale = _largest(e) if per_leaf else largest
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol + atol_fraction * scale,
                                   err_msg=path)


def init_params(model, batch):
    """`model`'s parameters initialised from key 0 on the batch's first example."""
    return model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]


# Shape captions, for tokenizers trained on the fly.
CAPTIONS = [
    "a small red circle",
    "a large blue star to the left of a small white cross",
    "a small orange triangle above a large purple square",
    "a large green cross below a small yellow circle",
    "a large white square to the right of a small red star",
]

# Image–caption pairs `example(i)` for i < NUM_EXAMPLES ("picture number i", a picture of grey value 10 i),
# some unusable: conftest.py's `csv_file` lists them, plus a row whose file is missing.
NUM_EXAMPLES = 24
CORRUPT = {3, 10}  # not images
EMPTY_CAPTION = {7}


def png(value: int, height: int = 12, width: int = 16) -> bytes:
    """A PNG of one grey `value`."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def example(i: int) -> tuple[bytes, str]:
    """The encoded image and the caption of pair `i`."""
    image = b"not an image" if i in CORRUPT else png(10 * i)
    return image, "" if i in EMPTY_CAPTION else f"picture number {i}"


def read_metrics(workdir) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_config(workdir) -> ConfigDict:
    """The config a run wrote beside its checkpoints."""
    with open(os.path.join(workdir, "config.json")) as f:
        return ConfigDict(json.load(f))


def cli(*args, **kwargs) -> subprocess.Popen:
    """`python -m jclip.train --config configs/shapes_tiny.py *args` started on the CPU, its output piped."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "jclip.train", "--config", "configs/shapes_tiny.py", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def command_line(config_file, *overrides) -> ConfigDict:
    """The config `python -m jclip.train --config CONFIG_FILE *overrides` trains: absl's config flags parse the
    file and the overrides (in this process), then `--config.model_name` picks its model (`jclip.cli`)."""
    from absl import flags
    from ml_collections import config_flags

    from jclip.cli import model_from_command_line

    argv = ["jclip.train", "--config", str(config_file), *overrides]
    values = flags.FlagValues()  # the overrides are read from sys.argv, or as here from `sys_argv`
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    with warnings.catch_warnings():  # absl's config-file flag loads the file with the deprecated `load_module`
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        values(argv)
    model_from_command_line(values.config, config_flags.get_override_values(values["config"]), str(config_file))
    return values.config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, processes: int, *args, timeout: float = 300) -> list[str]:
    """`tests/<script> PROCESS_ID NUM_PROCESSES PORT *args` as `processes` processes joined on loopback.

    Returns each process's output. Fails if any process exits non-zero or if they have not all
    exited within `timeout` seconds (a hang, e.g. processes waiting in different collectives):
    then every process is killed.
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # each worker sets its own device count
    logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]  # files, not pipes: no process blocks on output
    launched = [subprocess.Popen([sys.executable, str(REPO / "tests" / script), str(i), str(processes), str(port),
                                  *map(str, args)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                for i, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in launched:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        for p in launched:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{output[-3000:]}"
                       for i, (p, output) in enumerate(zip(launched, outputs)))
    if hung:
        pytest.fail(f"{script}: not every process exited within {timeout} s; killed\n{report}")
    assert all(p.returncode == 0 for p in launched), report
    return outputs
