"""jclip's losses in your own JAX code: a toy two-tower model trained with optax, three ways.

    python examples/losses_in_your_jax_code.py [--steps 50]

The same model, data and optimizer are trained on 8 devices (simulated on the CPU unless the
machine has accelerators):

1. global arrays on an explicit mesh (this JAX's default): the batch is sharded over the mesh
   axis "data" and the loss is called as on one device. It runs per device over that axis: each
   device keeps its rows and gathers the other side's embeddings, so it holds only its own rows of
   the logits;
2. global arrays on an auto mesh: the same code; XLA propagates the shardings;
3. `jax.shard_map` with `axis_name="data"` and `ring=True`: per-device code whose embeddings
   travel around the ring, for batches too large to gather.

All three compute the loss and gradients of the whole batch, so their loss curves agree; the
script prints them side by side and checks that they do.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jclip.losses import CLIP_INIT_LOG_SCALE, clamp_log_scale, clip_loss

IMAGE_DIM, TEXT_DIM, HIDDEN, EMBED, BATCH = 32, 16, 64, 16, 64


def init_params(key):
    """Two layers per tower and the learnable log inverse temperature t (scale = exp(t))."""
    keys = jax.random.split(key, 4)
    dense = lambda key, fan_in, fan_out: jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in)
    return {
        "image": {"w1": dense(keys[0], IMAGE_DIM, HIDDEN), "w2": dense(keys[1], HIDDEN, EMBED)},
        "text": {"w1": dense(keys[2], TEXT_DIM, HIDDEN), "w2": dense(keys[3], HIDDEN, EMBED)},
        "log_scale": jnp.asarray(CLIP_INIT_LOG_SCALE),
    }


def encode(params, images, texts):
    """Unit-length image and text embeddings and the scale, as a CLIP model outputs them."""

    def tower(weights, x):
        z = jax.nn.gelu(x @ weights["w1"]) @ weights["w2"]
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    return tower(params["image"], images), tower(params["text"], texts), jnp.exp(params["log_scale"])


def make_batches(steps, seed=0):
    """Paired toy data: an image and its caption are two noisy views of one latent vector."""
    rng = np.random.default_rng(seed)
    to_image, to_text = rng.normal(size=(8, IMAGE_DIM)), rng.normal(size=(8, TEXT_DIM))
    for _ in range(steps):
        latent = rng.normal(size=(BATCH, 8))
        images = latent @ to_image + 0.3 * rng.normal(size=(BATCH, IMAGE_DIM))
        texts = latent @ to_text + 0.3 * rng.normal(size=(BATCH, TEXT_DIM))
        yield np.float32(images), np.float32(texts)


optimizer = optax.adamw(1e-2, weight_decay=1e-4)


def apply_update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {**params, "log_scale": clamp_log_scale(params["log_scale"])}, opt_state


@jax.jit
def global_step(params, opt_state, images, texts):
    """Ways 1 and 2: the loss of global arrays, written as for one device."""

    def loss_fn(params):
        return clip_loss(*encode(params, images, texts))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return *apply_update(params, opt_state, grads), loss


def ring_step(mesh):
    """Way 3: per-device code under `jax.shard_map`, the embeddings passed around the ring."""

    def per_device_loss(params, images, texts):  # this device's rows of the batch
        return clip_loss(*encode(params, images, texts), axis_name="data", ring=True)

    loss_fn = jax.shard_map(per_device_loss, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())

    @jax.jit
    def step(params, opt_state, images, texts):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, texts)
        return *apply_update(params, opt_state, grads), loss

    return step


def train(way, steps):
    """The loss curve of `steps` updates, trained the `way` given."""
    kind = AxisType.Auto if way == "auto mesh" else AxisType.Explicit
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(kind,))
    step = ring_step(mesh) if way == "shard_map + ring" else global_step
    with jax.set_mesh(mesh):
        params = jax.device_put(init_params(jax.random.key(0)), P())  # replicated on every device
        opt_state = optimizer.init(params)
        curve = []
        for images, texts in make_batches(steps):
            images, texts = jax.device_put((images, texts), P("data"))  # split by rows over the devices
            params, opt_state, loss = step(params, opt_state, images, texts)
            curve.append(float(loss))
    return curve


WAYS = ("explicit mesh", "auto mesh", "shard_map + ring")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    curves = {way: train(way, args.steps) for way in WAYS}
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices, global batch {BATCH}")
    print(f"{'step':>5} " + " ".join(f"{way:>18}" for way in WAYS))
    for step in range(args.steps):
        if step < 3 or step == args.steps - 1 or (step + 1) % 10 == 0:
            print(f"{step + 1:>5} " + " ".join(f"{curves[way][step]:>18.6f}" for way in WAYS))
    difference = max(abs(a - b) / abs(b) for way in WAYS[1:] for a, b in zip(curves[way], curves[WAYS[0]]))
    print(f"largest relative difference between the curves: {difference:.1e}")
    print(json.dumps(curves))
    if difference > 1e-4:
        raise SystemExit("the three ways should give the same loss curve")


if __name__ == "__main__":
    main()
