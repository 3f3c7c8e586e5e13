"""tf.data input: a deterministic, exactly resumable stream of global batches.

The stream is a pure function of (seed, position), where the position counts
the raw examples this process has drawn, skipped ones included: which example
each draw takes is `jclip.data.draw_order`'s, and the caption it samples and
its random crops are fixed functions of (seed, draw). So a run resumed at
position p (saved in every checkpoint) sees exactly the batches an
uninterrupted run would have seen.

`TrainInput` takes its local batches from one of two batch sources:

- `PerVisitBatches` read and decode each example at each visit; an example
  whose image cannot be read or decoded, or that has no caption, is skipped and
  counted (the run's first few named in warnings), never a crash; but a stream
  whose draws give no usable example for `MAX_DRAWS_WITHOUT_EXAMPLE` draws in a
  row (fewer for small sources) stops with an error naming its sources;
- when every source is small (`Source.fits_in_memory`), `in_memory.TableBatches`
  gather rows of the sources decoded once into an `in_memory.ExampleTable`,
  with almost no work per batch (with no example left out of the table, these
  are the examples reading the sources per visit gives, in the same order).
"""

import concurrent.futures
import functools
import itertools
from typing import Iterator, Optional, Protocol, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jclip import parallel
from jclip.data import draw_order, in_memory, preprocess
from jclip.data.negatives import hard_negatives
from jclip.data.sources import NAMED_SKIPPED, Source, encoded_image, text_captions

tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX.

# Examples decoded in parallel. A fixed number rather than AUTOTUNE: tf.data's autotuning runs a
# background model thread that, at the end of a run, could block the iterator's destructor forever
# (seen at exit after training).
DECODE_PARALLELISM = 2
# A stream read per visit stops with an error once this many draws in a row (or twice its sources' examples, when
# fewer) have given no usable example: then (nearly) every example is bad, and skipping them would go on forever.
MAX_DRAWS_WITHOUT_EXAMPLE = 100_000
_NO_EXAMPLE = "no usable example"  # the message of `_usable`'s error


def input_options() -> tf.data.Options:
    """Deterministic order and no autotuning thread (see DECODE_PARALLELISM)."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def _source_stream(source: Source, source_index: int, seed: int, shuffle_buffer: int, start: int) -> tf.data.Dataset:
    """Source examples from its `start`-th draw on; one that fits in memory is read from its files once, one with
    `references` is drawn (and skipped to `start`) by them and read after."""
    def with_captions(example):
        return {**example, "captions": text_captions(example["captions"])}

    if source.references is not None and not source.fits_in_memory:
        drawn = draw_order.epochs(source.references, source.num_examples, source_index, seed, shuffle_buffer, start)
        return drawn.map(source.read, num_parallel_calls=DECODE_PARALLELISM).map(with_captions)
    examples = source.examples.map(with_captions)
    if source.fits_in_memory:
        examples = examples.cache()
    return draw_order.epochs(examples, source.num_examples, source_index, seed, shuffle_buffer, start)


def mixed_stream(sources: Sequence[tuple[Source, float]], seed: int, shuffle_buffer: int,
                 start: int) -> tf.data.Dataset:
    """Raw examples of the weighted mixture of `sources` from draw `start` on."""
    empty = [source.name for source, _ in sources if source.num_examples == 0]
    if empty:
        raise ValueError(f"source(s) {empty} have no examples (for this process): check their path or pattern")
    streams = [functools.partial(_source_stream, source, index, seed, shuffle_buffer)
               for index, (source, _) in enumerate(sources)]
    return draw_order.mixture(streams, [weight for _, weight in sources], seed, start)


def _prepare(image_op, seed: int, image_files: bool):
    """(index, example) -> {"image", "caption", "index"}: image read and preprocessed, one caption sampled.

    An example without a caption fails here, like one with an unreadable image, so that `ignore_errors`
    drops both in this one function call per example (on a CPU a call costs as much as decoding). With
    no `image_files` among the sources, the image is the example's bytes, without a conditional (whose
    branches are function calls too).
    """
    def prepare(index, example):
        example_seed = draw_order.example_seed(seed, index)
        captions = example["captions"]
        with tf.control_dependencies([tf.debugging.assert_positive(tf.size(captions), "the example has no caption")]):
            pick = tf.random.stateless_uniform([], example_seed, maxval=tf.size(captions), dtype=tf.int32)
        return {"image": image_op(encoded_image(example, image_files), example_seed), "caption": captions[pick], "index": index}
    return prepare


def _draw_limit(sources: Sequence[tuple[Source, float]]) -> int:
    """The draws in a row without a usable example after which a stream read per visit stops."""
    return min(MAX_DRAWS_WITHOUT_EXAMPLE, 2 * sum(source.num_examples for source, _ in sources))


def _usable(prepared: tf.data.Dataset, limit: int) -> tf.data.Dataset:
    """The elements of `prepared` that do not fail (`ignore_errors`); an error (`_NO_EXAMPLE`) once `limit` draws
    in a row have failed.

    `ignore_errors` alone would look for a usable example forever. So a marker (index -1, dropped here) comes after
    every quarter of `limit` draws, failed or not (`choose_from_datasets` takes a choice for a failing draw too),
    and a fifth marker in a row is the error.
    """
    every = -(-limit // 4)
    marker = tf.nest.map_structure(lambda spec: tf.zeros([size or 1 for size in spec.shape], spec.dtype),
                                   prepared.element_spec)
    markers = tf.data.Dataset.from_tensors({**marker, "index": tf.constant(-1, tf.int64)}).repeat()
    choices = (tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat(every)
               .concatenate(tf.data.Dataset.from_tensors(tf.constant(1, tf.int64))).repeat())

    def count_markers(in_a_row, element):
        in_a_row = (in_a_row + 1) * tf.cast(element["index"] < 0, tf.int64)  # an example starts again from 0
        with tf.control_dependencies([tf.debugging.assert_less(in_a_row, tf.constant(5, tf.int64), _NO_EXAMPLE)]):
            return tf.identity(in_a_row), element

    return (tf.data.Dataset.choose_from_datasets([prepared, markers], choices).ignore_errors()
            .scan(tf.constant(0, tf.int64), count_markers).filter(lambda element: element["index"] >= 0))


def _drawn_examples(sources: Sequence[tuple[Source, float]], seed: int, shuffle_buffer: int,
                    start: int) -> Iterator[tuple[Source, int]]:
    """(source, number of the example in it) of each draw of `mixed_stream` from `start` on, to name skipped draws:
    example numbers drawn as the table rows of the sources' sizes (`in_memory.table_rows`), no data read. Lazy:
    nothing is built before the first is asked for."""
    sizes = [source.num_examples for source, _ in sources]
    firsts = np.cumsum([0] + sizes)
    numbers = in_memory.table_rows(sizes, [weight for _, weight in sources], seed, shuffle_buffer, start)
    for block in numbers.batch(1024).with_options(input_options()).as_numpy_iterator():
        indices = np.searchsorted(firsts, block, side="right") - 1
        yield from zip([sources[i][0] for i in indices], (block - firsts[indices]).tolist())


def _no_example_error(sources: Sequence[tuple[Source, float]]) -> ValueError:
    """The error of a stream that has stopped for want of a usable example (`_usable`)."""
    names = ", ".join(repr(source.name) for source, _ in sources)
    return ValueError(f"{_draw_limit(sources)} draws in a row from the training source(s) {names} gave no usable "
                      "example (an image that can be read and decoded, with a caption): nearly every example is "
                      "bad. Check the sources' image files (and image_root) and captions")


class BatchSource(Protocol):
    """Where `TrainInput` takes its local batches from: examples read per visit, or rows of an in-memory table."""

    batches: tf.data.Dataset  # local batches with "image" (before the per-batch ops) and "index" (each one's draw)
    left_out: int  # examples never drawn: left out when the sources were loaded

    def captions_and_tokens(self, batch: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
        """The captions of a batch of `batches` and their tokens."""


class PerVisitBatches:
    """A batch source: local batches `{"image", "caption", "index"}` of the examples of `mixed_stream`, each read
    and decoded at each visit; a draw with an unreadable image or no caption is dropped (`TrainInput.skipped`),
    and too many of them in a row are an error (`_usable`)."""

    left_out = 0

    def __init__(self, sources: Sequence[tuple[Source, float]], tokenizer, *, local_batch: int, text_length: int,
                 seed: int, shuffle_buffer: int, image_op: preprocess.ImageOp, start: int):
        self.tokenizer, self.text_length = tokenizer, text_length
        examples = mixed_stream(sources, seed, shuffle_buffer, start).enumerate(start)
        prepare = _prepare(image_op, seed, any(source.image_files for source, _ in sources))
        prepared = examples.map(prepare, num_parallel_calls=DECODE_PARALLELISM)
        self.batches = _usable(prepared, _draw_limit(sources)).batch(local_batch, drop_remainder=True)

    def captions_and_tokens(self, batch: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
        """The batch's captions, tokenized."""
        captions = [caption.decode("utf-8") for caption in batch["caption"]]
        return captions, self.tokenizer(captions, self.text_length)


class TrainInput:
    """Endless global batches `{"image", "tokens"}` of this process's share of the global batch.

    The images are those of `image_preprocess` but for its trailing per-pixel
    ops (`preprocess.stages`), which the train step applies on the devices:
    `preprocess.batch_op(image_preprocess)` of these images is what the spec gives.

    With `negative_kinds`, batches also carry `negative_tokens` `[B, K, L]`: K
    hard-negative captions per example (`jclip.data.negatives`), for NegCLIP-style
    losses.

    `position` is the number of raw examples this process has drawn for the
    batches handed out so far (save it in checkpoints and pass it back as
    `start_position` to resume); `skipped` counts the examples among them dropped
    for an unreadable image or a missing caption, and warnings name the first
    `NAMED_SKIPPED` of them (`Source.describe`). The next batch is made (taken
    from tf.data, tokenized, sent to the devices) in a thread, so that this work
    overlaps the step that runs before it, also where the step runs synchronously
    on the CPU (`jclip.host_memory.synchronous_cpu_dispatch`); `close()` (or
    leaving a `with` block) ends the thread.

    The local batches come from one of the two `BatchSource`s (see above); from
    an `in_memory.TableBatches`, `left_out` counts the examples its table left
    out (instead of skipping them per visit).
    """

    def __init__(self, sources: Sequence[tuple[Source, float]], tokenizer, mesh: Mesh, *, batch_size: int,
                 text_length: int, seed: int, shuffle_buffer: int, image_preprocess: str, start_position: int = 0,
                 negative_kinds: Sequence[str] = (), negative_attributes: Sequence[str] = ()):
        parallel.check_batch_size(batch_size, mesh)
        self.tokenizer, self.mesh, self.text_length, self.seed = tokenizer, mesh, text_length, seed
        self.negative_kinds, self.negative_attributes = tuple(negative_kinds), tuple(negative_attributes)
        self.position, self.skipped = start_position, 0
        self._sources, self._named, self._names = sources, 0, set()  # skipped draws named so far, and their names
        self._drawn = _drawn_examples(sources, seed, shuffle_buffer, start_position)  # where each draw's example is
        self._next_draw = start_position  # the draw `_drawn` gives next
        once, per_image, _ = preprocess.stages(image_preprocess)
        common = dict(local_batch=batch_size // jax.process_count(), text_length=text_length, seed=seed,
                      shuffle_buffer=shuffle_buffer, start=start_position)
        table = in_memory.load_table([source for source, _ in sources], preprocess.compose(once),
                                     input_options()) if once else None
        self._source: BatchSource
        if table is None:
            self._source = PerVisitBatches(sources, tokenizer, image_op=preprocess.compose(once + per_image), **common)
        else:
            self._source = in_memory.TableBatches(table, [weight for _, weight in sources], tokenizer,
                                                  per_image=per_image, **common)
        self.left_out = self._source.left_out
        self._batches = self._source.batches.prefetch(2).with_options(input_options()).as_numpy_iterator()
        # The next (global batch, position after it, skipped in it), made in a thread while the caller steps.
        self._ahead: Optional[concurrent.futures.Future] = None
        self._maker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jclip-batches")

    def __iter__(self):
        return self

    def __enter__(self) -> "TrainInput":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def wait(self) -> None:
        """Return once the batch being made in the thread, if any, is made: then no JAX work of this stream is
        under way (the trainer starts and stops the profiler at such moments)."""
        if self._ahead is not None:
            concurrent.futures.wait([self._ahead])

    def close(self) -> None:
        """End the thread: the batch being made is finished and dropped. A run calls it when it ends, so that
        no batch is made beside what comes after (evaluation, the next run in the same process)."""
        self.wait()
        self._ahead = None
        self._maker.shutdown(wait=True)

    def __next__(self) -> dict[str, jax.Array]:
        """The next global batch; the one after it is already on its way to the devices."""
        if self._ahead is None:
            self._ahead = self._maker.submit(self._device_batch, self.position)
        batch, self.position, skipped = self._ahead.result()
        self.skipped += skipped
        self._ahead = self._maker.submit(self._device_batch, self.position)
        return batch

    def _device_batch(self, position: int) -> tuple[dict[str, jax.Array], int, int]:
        """(global batch, position after it, examples skipped in it), the copy to devices started."""
        try:
            batch = next(self._batches)
        except tf.errors.InvalidArgumentError as error:
            if _NO_EXAMPLE not in error.message:
                raise
            raise _no_example_error(self._sources) from None
        last = int(batch["index"][-1])
        captions, tokens = self._source.captions_and_tokens(batch)
        if last + 1 - position > len(captions) and self._named < NAMED_SKIPPED:
            self._name_skipped(batch["index"], position)
        local = {"image": batch["image"], "tokens": tokens}
        if self.negative_kinds:
            negatives = [n for caption, index in zip(captions, batch["index"]) for n in hard_negatives(
                caption, self.negative_kinds, seed=self.seed, index=int(index), attributes=self.negative_attributes)]
            tokens = self.tokenizer(negatives, self.text_length)
            local["negative_tokens"] = tokens.reshape(len(captions), len(self.negative_kinds), self.text_length)
        return parallel.global_batch(local, self.mesh), last + 1, last + 1 - position - len(captions)

    def _name_skipped(self, indices: np.ndarray, position: int) -> None:
        """A warning naming the example of each draw from `position` to the last of `indices` that is not among them
        (skipped), up to the run's first NAMED_SKIPPED draws (an example skipped again is not named again); then one
        saying that the others are only counted."""
        skipped = np.setdiff1d(np.arange(position, indices[-1] + 1), indices)[:NAMED_SKIPPED - self._named].tolist()
        for draw in skipped:
            source, number = next(itertools.islice(self._drawn, draw - self._next_draw, None))
            self._next_draw = draw + 1
            name = source.describe(number)
            if name not in self._names:
                self._names.add(name)
                print(f"warning: skipped {name}: its image cannot be read or decoded, or it has no caption", flush=True)
        self._named += len(skipped)
        if self._named == NAMED_SKIPPED:
            print("warning: further skipped examples are counted (skipped_examples in the metrics), not named",
                  flush=True)


def load_split(builder: tfds.core.DatasetBuilder, split: str, image_preprocess: str) -> dict[str, np.ndarray]:
    """A whole evaluation split as NumPy arrays: preprocessed images (or NaFlex patch inputs), captions as str,
    the other features."""
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
    arrays = {key: jax.tree.map(lambda *parts: np.concatenate(parts), *value) for key, value in columns.items()}
    arrays["caption"] = np.array([c.decode("utf-8") for c in arrays["caption"]])
    return arrays
