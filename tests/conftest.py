"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

import xla_flags

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # workers set their own
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags.with_devices(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent compilation cache for the session, inherited by the worker processes the tests
# start: the same train steps compiled again (new runs, other processes) load instead of compiling.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jclip-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SKIPPED_WITHOUT_TORCH = []  # node ids of the tests skipped because the torch extra is missing


def pytest_runtest_logreport(report):
    """Note the tests skipped for lack of the torch extra: their reasons name it or open_clip."""
    if report.skipped and isinstance(report.longrepr, tuple) and (
            "torch extra" in report.longrepr[2] or "open_clip" in report.longrepr[2]):
        SKIPPED_WITHOUT_TORCH.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """One line at the end: how many tests the missing torch extra skipped, and how to run them."""
    if SKIPPED_WITHOUT_TORCH:
        terminalreporter.write_line(
            f"{len(SKIPPED_WITHOUT_TORCH)} test(s) skipped for lack of the torch extra (torch, open_clip): the "
            "OpenCLIP comparisons. `make test` installs it (or pip install -e '.[torch]').", yellow=True, bold=True)


def load_config(name: str):
    """`configs/<name>.py`'s `get_config()`, as the command line would load it."""
    from jclip.cli import load_config_file

    return load_config_file(REPO / "configs" / f"{name}.py")


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A data dir holding the `shapes/tiny` dataset and its tokenizer, built once per session."""
    from jclip.data import shapes

    data_dir = str(tmp_path_factory.mktemp("datasets"))
    shapes.prepare("tiny", data_dir)
    return data_dir


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory) -> str:
    """A TSV (columns filepath, title) of helpers.py's image–caption pairs, 4 of its 25 rows unusable: the
    CORRUPT images, the EMPTY_CAPTION and a last row whose file is missing."""
    import csv

    from helpers import NUM_EXAMPLES, example

    root = tmp_path_factory.mktemp("csv")
    with open(root / "pairs.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i in range(NUM_EXAMPLES):
            image, caption = example(i)
            (root / f"{i}.png").write_bytes(image)
            writer.writerow([f"{i}.png", caption])
        writer.writerow(["missing.png", "a file that does not exist"])
    return str(root / "pairs.tsv")


def shrunk_demo_config(shapes_data_dir: str):
    """The demo config shrunk to the `tiny` dataset and the `test-micro` model: seconds per run."""
    from jclip.models import model_config

    config = load_config("shapes_tiny")
    config.data.sources.shapes.config = "tiny"
    config.data.tokenizer = "shapes/tiny"
    config.data.data_dir = shapes_data_dir
    config.data.shuffle_buffer = 512
    config.model_name = "test-micro"
    config.model = model_config("test-micro")
    config.batch_size = 32
    config.total_steps = 12
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.checkpoint_every = 4
    config.evaluate.shapes_config = "tiny"
    config.evaluate.batch_size = 64
    return config


@pytest.fixture
def tiny_config(shapes_data_dir):
    """`shrunk_demo_config`, fresh for each test."""
    return shrunk_demo_config(shapes_data_dir)
