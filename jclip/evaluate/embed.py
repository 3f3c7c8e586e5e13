"""Embedding a whole evaluation set, sharded over every device of every process.

Each process reads its own share of the examples and feeds them in fixed-size
batches; a process that runs out first (or a last, partial batch) is padded
with zeros and a mask, so every process runs the same number of steps of one
compiled shape, and padded rows are dropped before anything is counted. The
embeddings of all processes come back to every process in a canonical order
(process 0's examples, then process 1's, ...), so results do not depend on the
device count, and with contiguous per-process slices not on the process count.
"""

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jclip import parallel
from jclip.data import naflex


def embed_stream(encode: Callable, params, local_batches: Iterable[Any], local_count: int, batch_size: int,
                 mesh: Mesh, example: Any) -> np.ndarray:
    """`encode(params, batch)` of this process's examples and every other process's.

    `local_batches` yields this process's examples in chunks of at most
    `batch_size / process_count` rows, at most `local_count` of them (fewer when it
    skips some, e.g. unreadable images; a stream that must yield exactly
    `local_count` checks that itself when it ends, as `LocalImages` does); `example`
    is one zero example (shape and dtype of the padding). The examples are
    arrays, or dicts of arrays (NaFlex patch inputs). Returns [all examples,
    dim], process 0's rows first.
    """
    parallel.check_batch_size(batch_size, mesh, what="config.evaluate.batch_size")
    sharding = parallel.batch_sharding(mesh)
    encode = jax.jit(encode, out_shardings=sharding)  # params keep their layout (replicated or FSDP)
    local_size = batch_size // jax.process_count()
    counts = multihost_utils.process_allgather(np.int32(local_count)).reshape(-1)
    steps = math.ceil(int(counts.max()) / local_size)
    batches = iter(local_batches)
    outputs, keys = [], []
    position = 0
    empty = jax.tree.map(lambda x: x[None][:0], example)
    for _ in range(steps):
        chunk = next(batches, empty) if position < local_count else empty
        rows = naflex.row_count(chunk)
        if rows > local_size:
            raise ValueError(f"a chunk of {rows} examples; at most {local_size} per process per batch")
        if _shapes(chunk, rows=True) != _shapes(example):
            raise ValueError(f"evaluation inputs have shape {_shapes(chunk, rows=True)} but the model takes "
                             f"{_shapes(example)}; make the preprocessing resize images to config.data.image_size "
                             "(or, for a NaFlex model, keep its naflex op's patch size)")
        padded = naflex.pad_rows(jax.tree.map(lambda x, like: np.asarray(x, like.dtype), chunk, example), local_size)
        # Which example each row is: (process, position), or position -1 for padding.
        key = np.stack([np.full(local_size, jax.process_index()),
                        np.where(np.arange(local_size) < rows, position + np.arange(local_size), -1)], 1)
        position += rows
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), padded)
        global_keys = jax.make_array_from_process_local_data(sharding, key.astype(np.int32))
        embeddings = multihost_utils.process_allgather(encode(params, batch), tiled=True)
        global_keys = multihost_utils.process_allgather(global_keys, tiled=True)
        real = global_keys[:, 1] >= 0
        outputs.append(np.asarray(embeddings)[real])
        keys.append(np.asarray(global_keys)[real])
    rest = next(batches, None)  # the stream ends here (and checks what it yielded)
    if position > local_count or (rest is not None and naflex.row_count(rest)):
        raise ValueError(f"the evaluation data yielded more than the {local_count} examples expected")
    if not any(len(output) for output in outputs):
        raise ValueError("nothing to embed: the evaluation set is empty, or none of its images can be read")
    keys = np.concatenate(keys)
    return np.concatenate(outputs)[np.lexsort((keys[:, 1], keys[:, 0]))]


def _shapes(inputs, rows: bool = False):
    """The shapes of model inputs (an image array, or a patch input's arrays), without the rows axis if `rows`."""
    return jax.tree.map(lambda x: tuple(np.shape(x)[1:] if rows else np.shape(x)), inputs)


def process_slice(count: int) -> slice:
    """This process's contiguous share of `count` examples (process p gets rows [p*n/P, (p+1)*n/P))."""
    index, processes = jax.process_index(), jax.process_count()
    return slice(count * index // processes, count * (index + 1) // processes)


def embed_all(encode: Callable, params, inputs: Any, batch_size: int, mesh: Mesh) -> np.ndarray:
    """`encode(params, batch)` of all `inputs` (held by every process; arrays, or dicts of arrays), in their
    order, on every process."""
    rows = process_slice(naflex.row_count(inputs))
    local = jax.tree.map(lambda x: x[rows], inputs)
    count, local_size = naflex.row_count(local), batch_size // jax.process_count()
    chunks = (jax.tree.map(lambda x: x[start:start + local_size], local) for start in range(0, count, local_size))
    example = jax.tree.map(lambda x: np.zeros_like(x[0]), inputs)
    return embed_stream(encode, params, chunks, count, batch_size, mesh, example)
