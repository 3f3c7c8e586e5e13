"""tf.data input: a deterministic, exactly resumable stream of global batches.

The stream is a pure function of (seed, position), where the position counts
the raw examples this process has drawn, skipped ones included:

- source s is read epoch after epoch, epoch e shuffled with seed (seed, s, e);
- with several sources, draw i comes from the source picked by a stateless
  uniform number of (seed, i // 1024) against the cumulative weights;
- draw i samples its caption and random crops from the stateless seed (seed, i).

So a run resumed at position p (saved in every checkpoint) sees exactly the
batches an uninterrupted run would have seen. An example whose image cannot be
read or decoded, or that has no caption, is skipped and counted, never a crash.

When every source is small (`Source.fits_in_memory`), the sources are decoded
once into an `in_memory.ExampleTable` instead, and the same draws pick its
rows, with almost no work per batch (with no example left out of the table,
these are the examples reading the sources per visit gives, in the same order).
"""

import functools
from typing import Callable, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jclip import parallel
from jclip.data import in_memory, preprocess
from jclip.data.negatives import hard_negatives
from jclip.data.sources import Source, encoded_image, text_captions

tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX.

# Examples decoded in parallel. A fixed number rather than AUTOTUNE: tf.data's autotuning runs a
# background model thread that, at the end of a run, could block the iterator's destructor forever
# (seen at exit after training).
DECODE_PARALLELISM = 2
CHOICE_BLOCK = 1024  # mixture draws share one stateless random call per block of this many


def input_options() -> tf.data.Options:
    """Deterministic order and no autotuning thread (see DECODE_PARALLELISM)."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def _epochs(examples: tf.data.Dataset, num_examples: int, source_index: int, seed: int, shuffle_buffer: int,
            start: int) -> tf.data.Dataset:
    """`examples` (`num_examples` of them) from the `start`-th draw on, epoch after epoch, each shuffled anew."""
    first_epoch, offset = divmod(start, num_examples)
    buffer = min(shuffle_buffer, num_examples)

    def epoch(index):
        return examples.shuffle(buffer, seed=(seed * 1_000_003 + source_index) * 1_000_003 + index,
                                reshuffle_each_iteration=False)

    return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)


def _source_stream(source: Source, source_index: int, seed: int, shuffle_buffer: int, start: int) -> tf.data.Dataset:
    """Source examples from its `start`-th draw on; one that fits in memory is read from its files once."""
    examples = source.examples.map(lambda example: {**example, "captions": text_captions(example["captions"])})
    if source.fits_in_memory:
        examples = examples.cache()
    return _epochs(examples, source.num_examples, source_index, seed, shuffle_buffer, start)


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


def _mixture(streams: Sequence[Callable[[int], tf.data.Dataset]], weights: Sequence[float], seed: int,
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


def mixed_stream(sources: Sequence[tuple[Source, float]], seed: int, shuffle_buffer: int,
                 start: int) -> tf.data.Dataset:
    """Raw examples of the weighted mixture of `sources` from draw `start` on."""
    streams = [functools.partial(_source_stream, source, index, seed, shuffle_buffer)
               for index, (source, _) in enumerate(sources)]
    return _mixture(streams, [weight for _, weight in sources], seed, start)


def table_rows(table: in_memory.ExampleTable, weights: Sequence[float], seed: int, shuffle_buffer: int,
               start: int) -> tf.data.Dataset:
    """Row numbers of `table` drawn as `mixed_stream` draws examples of its sources, from draw `start` on."""
    firsts = np.cumsum([0] + table.rows_per_source).tolist()

    def stream(source_index, start):
        rows = tf.data.Dataset.range(firsts[source_index], firsts[source_index + 1])
        return _epochs(rows, table.rows_per_source[source_index], source_index, seed, shuffle_buffer, start)

    return _mixture([functools.partial(stream, i) for i in range(len(weights))], weights, seed, start)


def _prepare(image_op, seed: int, image_files: bool):
    """(index, example) -> {"image", "caption", "index"}: image read and preprocessed, one caption sampled.

    An example without a caption fails here, like one with an unreadable image, so that `ignore_errors`
    drops both in this one function call per example (on a CPU a call costs as much as decoding). With
    no `image_files` among the sources, the image is the example's bytes, without a conditional (whose
    branches are function calls too).
    """
    def prepare(index, example):
        example_seed = tf.stack([tf.cast(seed, tf.int64), index])
        captions = example["captions"]
        with tf.control_dependencies([tf.debugging.assert_positive(tf.size(captions), "the example has no caption")]):
            pick = tf.random.stateless_uniform([], example_seed, maxval=tf.size(captions), dtype=tf.int32)
        return {"image": image_op(encoded_image(example, image_files), example_seed), "caption": captions[pick], "index": index}
    return prepare


class TrainInput:
    """Endless global batches `{"image", "tokens"}` of this process's share of the global batch.

    With `negative_kinds`, batches also carry `negative_tokens` `[B, K, L]`: K
    hard-negative captions per example (`jclip.data.negatives`), for NegCLIP-style
    losses.

    `position` is the number of raw examples this process has drawn for the
    batches handed out so far (save it in checkpoints and pass it back as
    `start_position` to resume); `skipped` counts the examples among them dropped
    for an unreadable image or a missing caption. One batch more is prefetched
    to the devices, so its transfer overlaps the step that runs before it.

    When every source is small enough, they are decoded once into an
    `in_memory.ExampleTable` and batches are gathered from it: then `left_out`
    counts the examples the table left out (instead of skipping them per visit).
    """

    def __init__(self, sources: Sequence[tuple[Source, float]], tokenizer, mesh: Mesh, *, batch_size: int,
                 text_length: int, seed: int, shuffle_buffer: int, image_preprocess: str, start_position: int = 0,
                 negative_kinds: Sequence[str] = (), negative_attributes: Sequence[str] = ()):
        parallel.check_batch_size(batch_size, mesh)
        self.tokenizer, self.mesh, self.text_length, self.seed = tokenizer, mesh, text_length, seed
        self.negative_kinds, self.negative_attributes = tuple(negative_kinds), tuple(negative_attributes)
        self.position, self.skipped = start_position, 0
        once, per_image, per_batch = preprocess.stages(image_preprocess)
        local_batch = batch_size // jax.process_count()
        self._table = in_memory.load_table([source for source, _ in sources], preprocess.compose(once),
                                           input_options()) if once else None
        if self._table is None:
            self.left_out = 0
            examples = mixed_stream(sources, seed, shuffle_buffer, start_position).enumerate(start_position)
            prepare = _prepare(preprocess.compose(once + per_image), seed, any(s.image_files for s, _ in sources))
            batches = (examples.map(prepare, num_parallel_calls=DECODE_PARALLELISM).ignore_errors()
                       .batch(local_batch, drop_remainder=True))
        else:
            self.left_out = self._table.left_out
            self._text_tokens = tokenizer(self._table.texts, text_length)
            batches = self._table_batches([weight for _, weight in sources], per_image, local_batch, shuffle_buffer,
                                          start_position)
        per_batch = preprocess.compose(per_batch)
        dataset = (batches.map(lambda batch: {**batch, "image": per_batch(batch["image"], None)})
                   .prefetch(2).with_options(input_options()))
        self._batches = dataset.as_numpy_iterator()
        self._ahead = None  # the next (global batch, position after it, skipped in it), prefetched

    def _table_batches(self, weights, per_image: preprocess.Ops, local_batch: int, shuffle_buffer: int,
                       start: int) -> tf.data.Dataset:
        """Batches `{"image", "row", "index"}` of table rows: images gathered for the whole batch at once,
        unless random per-image ops (crops, flips) need each image with its own seed."""
        images = self._table.images
        rows = table_rows(self._table, weights, self.seed, shuffle_buffer, start).enumerate(start)
        if not per_image:
            return rows.batch(local_batch, drop_remainder=True).map(
                lambda index, row: {"image": tf.gather(images, row), "row": row, "index": index})
        image_op = preprocess.compose(per_image)

        def example(index, row):
            seed = tf.stack([tf.cast(self.seed, tf.int64), index])
            return {"image": image_op(tf.gather(images, row), seed), "row": row, "index": index}
        return rows.map(example, num_parallel_calls=DECODE_PARALLELISM).batch(local_batch, drop_remainder=True)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        """The next global batch; the one after it is already on its way to the devices."""
        if self._ahead is None:
            self._ahead = self._device_batch(self.position)
        batch, self.position, skipped = self._ahead
        self.skipped += skipped
        self._ahead = self._device_batch(self.position)
        return batch

    def _captions_and_tokens(self, batch) -> tuple[list[str], np.ndarray]:
        """The batch's captions and their tokens; from the table, one caption sampled per row."""
        if self._table is None:
            captions = [c.decode("utf-8") for c in batch["caption"]]
            return captions, self.tokenizer(captions, self.text_length)
        starts = self._table.caption_starts[batch["row"]]
        counts = self._table.caption_starts[batch["row"] + 1] - starts
        texts = self._table.caption_texts[starts + in_memory.caption_choice(self.seed, batch["index"], counts)]
        return [self._table.texts[t] for t in texts], self._text_tokens[texts]

    def _device_batch(self, position: int) -> tuple[dict[str, jax.Array], int, int]:
        """(global batch, position after it, examples skipped in it), the copy to devices started."""
        batch = next(self._batches)
        last = int(batch["index"][-1])
        captions, tokens = self._captions_and_tokens(batch)
        local = {"image": batch["image"], "tokens": tokens}
        if self.negative_kinds:
            negatives = [n for caption, index in zip(captions, batch["index"]) for n in hard_negatives(
                caption, self.negative_kinds, seed=self.seed, index=int(index), attributes=self.negative_attributes)]
            tokens = self.tokenizer(negatives, self.text_length)
            local["negative_tokens"] = tokens.reshape(len(captions), len(self.negative_kinds), self.text_length)
        return parallel.global_batch(local, self.mesh), last + 1, last + 1 - position - len(captions)


def load_split(builder: tfds.core.DatasetBuilder, split: str, image_preprocess: str) -> dict[str, np.ndarray]:
    """A whole evaluation split as NumPy arrays: preprocessed images, captions as str, the other features."""
    image_op = preprocess.parse(image_preprocess)
    dataset = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
    ).map(lambda ex: {**ex, "image": image_op(ex["image"], tf.constant([0, 0], tf.int64))},
          num_parallel_calls=DECODE_PARALLELISM)
    columns: dict[str, list] = {}
    for example in dataset.batch(1024).with_options(input_options()).as_numpy_iterator():
        for key, value in example.items():
            columns.setdefault(key, []).append(value)
    arrays = {key: np.concatenate(value) for key, value in columns.items()}
    arrays["caption"] = np.array([c.decode("utf-8") for c in arrays["caption"]])
    return arrays
