"""Embedding a whole evaluation set, sharded over the mesh, in fixed-size padded batches."""

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jclip import parallel


def embed_all(encode: Callable, params, inputs: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
    """`encode(params, batch)` over all `inputs`, `batch_size` rows at a time.

    Every process holds all `inputs` and gets all outputs; the devices of all
    processes share the work. The last batch is padded with zeros to the full
    size (one compiled shape, divisible by the device count) and the padded rows
    are dropped afterwards, so results do not depend on the device count.
    """
    parallel.check_batch_size(batch_size, mesh, what="config.evaluate.batch_size")
    sharding = parallel.batch_sharding(mesh)
    encode = jax.jit(encode, out_shardings=sharding)  # params keep their layout (replicated or FSDP)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        batch = jax.make_array_from_callback(padded.shape, sharding, lambda index: padded[index])
        embeddings = multihost_utils.process_allgather(encode(params, batch), tiled=True)
        outputs.append(np.asarray(embeddings)[: len(chunk)])
    return np.concatenate(outputs)
