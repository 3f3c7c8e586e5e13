"""The memory planner: what it compiles is the trainer's step, the batch it finds fits and uses the memory,
and bad input is one line."""

import subprocess
import sys

import pytest

from conftest import load_config
from helpers import REPO
from jclip import parallel
from jclip.plan import Setting, applied, ladder, largest_batch, step_cost

MiB = 2**20


@pytest.fixture(scope="module")
def micro_config():
    config = load_config("shapes_tiny")
    config.model_name = "test-micro"
    from jclip.models import model_config

    config.model = model_config("test-micro")
    config.data.image_size, config.data.text_length = 64, 16
    return config


def test_the_ladder_adds_one_memory_saver_at_a_time(micro_config):
    settings = ladder(micro_config)
    assert [s.name for s in settings] == ["as configured", "+ ring losses with blocks", "+ remat", "+ FSDP",
                                          "+ micro_batches=2", "+ micro_batches=4"]
    assert dict(settings[-1].changes) == {"losses.clip.ring": True, "model.remat": True,
                                          "parameter_sharding": "fsdp", "micro_batches": 4}
    ring = applied(micro_config, settings[-1], 256, 2)
    assert (ring.batch_size, ring.losses.clip.block_size, ring.micro_batches) == (256, 32, 4)  # 256 / 2 / 4 rows


def test_memory_grows_with_the_batch_and_a_ring_saves_it(micro_config):
    mesh = parallel.make_mesh(2)
    plain, ring = Setting("plain"), ladder(micro_config)[1]
    small, large = (step_cost(applied(micro_config, plain, batch, 2), mesh) for batch in (64, 1024))
    assert small.state_bytes == large.state_bytes - (1024 - 64) // 2 * (64 * 64 * 3 + 16 * 4)  # uint8 images, tokens
    assert large.bytes > small.bytes and large.flops == 16 * small.flops
    assert step_cost(applied(micro_config, ring, 1024, 2), mesh).temporary_bytes < large.temporary_bytes


def test_the_largest_batch_fits_and_uses_the_memory(micro_config):
    mesh = parallel.make_mesh(2)
    fits = largest_batch(micro_config, Setting("plain"), mesh, 24 * MiB)
    assert fits.batch % 2 == 0 and 0.85 * 24 * MiB <= fits.bytes <= 24 * MiB
    assert largest_batch(micro_config, Setting("plain"), mesh, 1 * MiB) is None


@pytest.mark.parametrize("arguments, message", [
    ([], "error: give --memory, the memory per device in GiB (e.g. --memory 80)"),
    (["--memory", "0.0001"], "error: not even a batch of 8 pairs fits in 0.0001 GiB per device: with every memory "
                             "saver (+ micro_batches=4) the step needs"),
    (["--memory", "1", "--config.batch_size=15"], "error: config.batch_size=15 is not divisible by the number of "
                                                  "devices (2)"),
])
def test_bad_input_is_one_line(arguments, message):
    done = subprocess.run([sys.executable, "-m", "jclip.plan", "--config", "configs/shapes_tiny.py", "--devices", "2",
                           "--config.model_name=test-micro", "--config.data.image_size=64",
                           "--config.data.text_length=16", *arguments],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
