"""The order of the training stream's draws: which example draw i takes, a pure function of (seed, i).

- source s is read epoch after epoch, epoch e shuffled with seed (seed, s, e);
- with several sources, draw i comes from the source picked by a stateless
  uniform number of (seed, i // CHOICE_BLOCK) against the cumulative weights;
- draw i's random preprocessing (crops, flips) draws from the stateless seed
  (seed, i), `example_seed`.

Both batch sources of `jclip.data.pipeline.TrainInput` draw in this order:
examples read per visit (`pipeline.mixed_stream`) and rows of an in-memory
table (`in_memory.table_rows`), so they give the same examples in the same
order, and a run resumed at draw p continues exactly.
"""

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

CHOICE_BLOCK = 1024  # mixture draws share one stateless random call per block of this many


def example_seed(seed: int, index) -> tf.Tensor:
    """The stateless seed [2] of draw `index`: its caption (read per visit) and random preprocessing ops."""
    return tf.stack([tf.cast(seed, tf.int64), index])


def epochs(examples: tf.data.Dataset, num_examples: int, source_index: int, seed: int, shuffle_buffer: int,
           start: int) -> tf.data.Dataset:
    """`examples` (`num_examples` of them) from the `start`-th draw on, epoch after epoch, each shuffled anew."""
    first_epoch, offset = divmod(start, num_examples)
    buffer = min(shuffle_buffer, num_examples)

    def epoch(index):
        return examples.shuffle(buffer, seed=(seed * 1_000_003 + source_index) * 1_000_003 + index,
                                reshuffle_each_iteration=False)

    return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)


def _choices(block, seed: int, cumulative_weights) -> tf.Tensor:
    """The source index of each of the CHOICE_BLOCK draws of `block`."""
    uniform = tf.random.stateless_uniform([CHOICE_BLOCK], seed=tf.stack([tf.cast(seed, tf.int64), block]))
    return tf.searchsorted(cumulative_weights, uniform, side="right", out_type=tf.int64)


def _draws_per_source(position: int, seed: int, cumulative_weights, num_sources: int) -> list[int]:
    """How many of the first `position` draws went to each source."""
    counts = np.zeros(num_sources, np.int64)
    for block in range(-(-position // CHOICE_BLOCK)):
        choices = _choices(tf.constant(block, tf.int64), seed, cumulative_weights).numpy()
        counts += np.bincount(choices[: position - block * CHOICE_BLOCK], minlength=num_sources)
    return counts.tolist()


def mixture(streams: Sequence[Callable[[int], tf.data.Dataset]], weights: Sequence[float], seed: int,
            start: int) -> tf.data.Dataset:
    """Draws of the weighted mixture from draw `start` on; `streams[s](k)` is source s from its k-th draw on."""
    if len(streams) == 1:
        return streams[0](start)
    weights = np.array(weights, np.float64)
    if (weights <= 0).any():
        raise ValueError(f"source weights must be positive; got {weights.tolist()}")
    cumulative = tf.constant(np.cumsum(weights / weights.sum())[:-1], tf.float32)
    starts = _draws_per_source(start, seed, cumulative, len(streams))
    choices = (
        tf.data.Dataset.range(start // CHOICE_BLOCK, np.iinfo(np.int64).max)
        .flat_map(lambda block: tf.data.Dataset.from_tensor_slices(_choices(block, seed, cumulative)))
        .skip(start % CHOICE_BLOCK)
    )
    return tf.data.Dataset.choose_from_datasets([stream(k) for stream, k in zip(streams, starts)], choices)
