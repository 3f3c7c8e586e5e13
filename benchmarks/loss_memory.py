"""Per-device temporary memory and forward+backward time of the losses: gathered vs ring vs blocked, and the
ring with the embeddings travelling in bfloat16 (`ring_dtype`).

Memory is XLA's compiled memory analysis (`temp_size_in_bytes`, per device), so it costs a
compilation only; time is the median of `--repeats` forward+backward calls after one warm-up, for
global batches up to `--max-timed-batch` (larger ones take minutes on a CPU host; pass
`--max-timed-batch 65536` on a quiet machine). Devices are simulated on the host CPU unless real
accelerators are present.

    python benchmarks/loss_memory.py                      # a few minutes on 2 CPU cores
    python benchmarks/loss_memory.py --batches 1024,4096 --loss clip
"""

import argparse
import os
import statistics
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jclip.losses import SIGLIP_INIT_BIAS, clip_loss, siglip_loss  # noqa: E402

LOSSES = {
    "clip": lambda zimg, ztxt, scale, **kw: clip_loss(zimg, ztxt, scale, **kw),
    "siglip": lambda zimg, ztxt, scale, **kw: siglip_loss(zimg, ztxt, scale, SIGLIP_INIT_BIAS, **kw),
}


def variants(devices, batch, block_size):
    """(name, loss keyword arguments) compared on this many devices; the first is the baseline.

    The block size is capped at the local batch, which the ring's blocks must divide.
    """
    block_size = min(block_size, batch // devices)
    if devices == 1:
        return [("gathered", {}), ("blocked", {"block_size": block_size})]
    return [
        ("gathered", {}),
        ("ring", {"ring": True}),
        ("gathered+blocked", {"block_size": block_size}),
        ("ring+blocked", {"ring": True, "block_size": block_size}),
        ("ring+blocked+bfloat16", {"ring": True, "block_size": block_size, "ring_dtype": "bfloat16"}),
    ]


def forward_backward(loss, devices, **kwargs):
    """jit of (zimg, ztxt, scale) -> (loss, gradients), per device over axis "data" if devices > 1."""
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    if devices == 1:
        return jax.jit(grad), None
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices])
    per_device = jax.shard_map(
        lambda zimg, ztxt, scale: grad(zimg, ztxt, scale, axis_name="data", **kwargs),
        mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P(), (P("data"), P("data"), P())),
    )
    return jax.jit(per_device), NamedSharding(mesh, P("data"))


def measure(loss, devices, batch, dim, kwargs, repeats, timed):
    if devices == 1:
        fn, sharding = forward_backward(lambda *a: loss(*a, **kwargs), 1)
    else:
        fn, sharding = forward_backward(loss, devices, **kwargs)
    shape = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
    compiled = fn.lower(shape, shape, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if not timed:
        return temp, None
    rng = np.random.default_rng(0)
    zimg, ztxt = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in rng.normal(size=(2, batch, dim)).astype(np.float32))
    if sharding is not None:
        zimg, ztxt = jax.device_put(zimg, sharding), jax.device_put(ztxt, sharding)
    scale = jnp.float32(10.0)
    jax.block_until_ready(compiled(zimg, ztxt, scale))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(zimg, ztxt, scale))
        times.append(time.perf_counter() - start)
    return temp, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="4096,16384,65536,1048576", help="global batch sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--devices", default="8,1", help="device counts, comma-separated")
    parser.add_argument("--loss", default="clip,siglip", help="losses, comma-separated: clip, siglip")
    parser.add_argument("--block-size", type=int, default=512, help="columns per block of the blocked variants")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--max-timed-batch", type=int, default=4096, help="larger batches get memory only")
    parser.add_argument("--variants", default=None,
                        help="only these variants, comma-separated; ratios are against the first one measured")
    args = parser.parse_args()
    wanted = None if args.variants is None else set(args.variants.split(","))

    print(f"dim {args.dim}, block size {args.block_size}, {jax.device_count()} {jax.devices()[0].platform} devices\n")
    print("| loss | devices | global batch | variant | temp MiB / device | vs first | fwd+bwd s | vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for loss_name in args.loss.split(","):
        for devices in map(int, args.devices.split(",")):
            for batch in map(int, args.batches.split(",")):
                baseline = None
                for name, kwargs in variants(devices, batch, args.block_size):
                    if wanted is not None and name not in wanted:
                        continue
                    temp, seconds = measure(
                        LOSSES[loss_name], devices, batch, args.dim, kwargs, args.repeats, batch <= args.max_timed_batch
                    )
                    baseline = baseline or (temp, seconds)
                    time_cells = ("—", "—") if seconds is None else (f"{seconds:.3f}", f"{seconds / baseline[1]:.2f}×")
                    print(
                        f"| {loss_name} | {devices} | {batch} | {name} | {temp / 2**20:,.1f} | {temp / baseline[0]:.3f}× "
                        f"| {time_cells[0]} | {time_cells[1]} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
