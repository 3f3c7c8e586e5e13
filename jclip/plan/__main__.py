"""`python -m jclip.plan --config CONFIG --memory GiB [--devices N] [--config.FIELD=VALUE ...]`

Prints, for the config's training step and each setting of the planner's ladder (`jclip.plan`), the
per-device memory and the model's FLOPs per step at the config's batch size, and the largest global batch that fits in
`--memory` GiB per device with that setting. `--devices N` plans for N devices: the accelerators when there
are N, else N simulated on the host CPU (whose compiled memory is close to, not equal to, an
accelerator's: plan on the accelerator where you can).
"""

import os
import sys


def _simulated_devices(argv) -> None:
    """`--devices N` becomes N host devices, set before JAX starts (they are used where accelerators are fewer)."""
    for index, argument in enumerate(argv):
        value = argument.split("=", 1)[1] if argument.startswith("--devices=") else (
            argv[index + 1] if argument == "--devices" and index + 1 < len(argv) else None)
        if value and value.isdigit():
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={value}".strip()


_simulated_devices(sys.argv)

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jclip import cli, parallel  # noqa: E402
from jclip.plan import GiB, applied, ladder, largest_batch, step_cost  # noqa: E402

flags.DEFINE_float("memory", None, "Memory per device, in GiB, that the step must fit in.")
flags.DEFINE_integer("devices", None, "Plan for this many devices (default: all of this machine's).")


def plan_mesh(devices: int) -> Mesh:
    """A data-parallel mesh of `devices` accelerators, or of as many simulated host CPU devices."""
    for platform in (None, "cpu"):
        available = jax.devices(platform) if platform else jax.devices()
        if len(available) >= devices:
            return Mesh(np.array(available[:devices]), (parallel.DATA_AXIS,))
    raise ValueError(f"--devices={devices}: this machine has {len(jax.devices())} devices and JAX started with "
                     f"{len(jax.devices('cpu'))} host devices; pass --devices as a number before JAX starts")


def _size(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2**20:.1f} MiB"


def plan(config, workdir):
    del workdir
    memory = cli.FLAGS.memory
    if memory is None or memory <= 0:
        raise ValueError("give --memory, the memory per device in GiB (e.g. --memory 80)")
    mesh = plan_mesh(cli.FLAGS.devices or len(jax.devices()))
    devices = mesh.devices.size
    parallel.check_batch_size(config.batch_size, mesh)
    settings = ladder(config)
    thriftiest = settings[-1]
    unit = devices * dict(thriftiest.changes).get("micro_batches", 1)
    smallest = step_cost(applied(config, thriftiest, unit, devices), mesh)
    if smallest.bytes > memory * GiB:
        raise ValueError(f"not even a batch of {unit} pairs fits in {memory:g} GiB per device: with every memory "
                         f"saver ({thriftiest.name}) the step needs {_size(smallest.bytes)}; give more memory or "
                         "devices, or a smaller model")
    print(f"{config.model_name if 'model_name' in config else 'model'} on {devices} {mesh.devices.flat[0].platform} "
          f"device(s), {memory:g} GiB each; global batch {config.batch_size} as configured\n")
    print(f"| setting | memory / device at batch {config.batch_size} | of which state + batch | model TFLOP / step | "
          "largest batch that fits | its memory / device |")
    print("|---|---:|---:|---:|---:|---:|")
    best = None
    for setting in settings:
        at_config = step_cost(applied(config, setting, config.batch_size, devices), mesh)
        fits = largest_batch(config, setting, mesh, int(memory * GiB),
                             first=smallest if setting == thriftiest else None)
        largest = ("does not fit", "—") if fits is None else (f"{fits.batch:,}", _size(fits.bytes))
        print(f"| {setting.name} | {_size(at_config.bytes)} | {_size(at_config.state_bytes)} | "
              f"{at_config.flops / 1e12:.4g} | {largest[0]} | {largest[1]} |", flush=True)
        if fits is not None and (best is None or fits.batch > best[1].batch):
            best = (setting, fits)
    changes = " ".join(f"--config.{path}={value}" for path, value in best[0].changes) or "(the config as it is)"
    print(f"\nLargest global batch: {best[1].batch:,} ({best[0].name}): {changes} --config.batch_size={best[1].batch}")


def run():
    cli.run_command(plan, workdir_required=False)


if __name__ == "__main__":
    run()
