"""Per-device memory of a train step: replicated parameters against FSDP, with and without remat.

Compiles (does not run) the full train step of `--model` with AdamW on `--devices`
simulated devices and prints XLA's memory analysis per device: the state
(parameters and optimizer moments) the step keeps between steps, the temporary
buffers of forward and backward, and their sum, as ratios against replicated
parameters without remat.

    python benchmarks/fsdp_memory.py                       # ViT-B-32, 8 devices, 32 pairs per device
    python benchmarks/fsdp_memory.py --model ViT-L-14 --per_device_batch 8
"""

import argparse
import os

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="ViT-B-32")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--per_device_batch", type=int, default=32)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jclip import models, parallel  # noqa: E402
from jclip.cli import load_config_file  # noqa: E402
from jclip.train.optimizer import build_optimizer  # noqa: E402
from jclip.train.state import state_layout  # noqa: E402
from jclip.train.step import make_train_step  # noqa: E402

MIB = 2**20


def demo_config():
    return load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py")


def step_memory(parameter_sharding: str, remat: bool) -> dict[str, float]:
    model = models.create(args.model, remat=remat)
    config = models.model_config(args.model)
    size, length = config["vision"]["image_size"], config["text"]["context_length"]
    image_shape = (size, size, 3)
    optimizer = build_optimizer(demo_config())
    mesh = parallel.make_mesh()
    layout = state_layout(model, optimizer, image_shape, length, mesh, parameter_sharding)
    batch_size = args.per_device_batch * args.devices
    sharding = parallel.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32, sharding=sharding),
             "tokens": jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)}
    analysis = make_train_step(layout).lower(layout.abstract, batch).compile().memory_analysis()
    return {"state": analysis.argument_size_in_bytes / MIB, "temporaries": analysis.temp_size_in_bytes / MIB}


def main():
    rows = [(sharding, remat, step_memory(sharding, remat))
            for sharding in ("replicated", "fsdp") for remat in (False, True)]
    baseline = rows[0][2]["state"] + rows[0][2]["temporaries"]
    print(f"\n{args.model}, AdamW, {args.devices} devices x {args.per_device_batch} pairs; MiB per device "
          "(XLA's compiled memory analysis)\n")
    print("| parameters | remat | state (params + moments + batch) | temporaries | total | vs replicated |")
    print("|---|---|---:|---:|---:|---:|")
    for sharding, remat, memory in rows:
        total = memory["state"] + memory["temporaries"]
        print(f"| {sharding} | {'yes' if remat else 'no'} | {memory['state']:,.0f} | {memory['temporaries']:,.0f} "
              f"| {total:,.0f} | {total / baseline:.2f}x |")


if __name__ == "__main__":
    main()
