"""Small sources decoded once and held in memory as arrays, for an input pipeline that costs almost no CPU.

On a CPU host the input pipeline shares the cores with the training step, and
for a small dataset (the demo's `shapes`, CIFAR-sized tfds datasets) most of
its cost is per example: decoding the same PNG again every epoch, a tf.data
function call to sample a caption, tokenizing a caption seen before. An
`ExampleTable` does that work once, when training starts: the images go
through the leading deterministic ops of the preprocessing (`preprocess.ONCE_OPS`,
e.g. decode and resize) into one uint8 array, and each row keeps its non-blank
captions as indices into the distinct caption texts, which are tokenized once.
`TableBatches` then draws row numbers in the order the sources' examples would
be drawn (`jclip.data.draw_order`), gathers a batch of rows and samples one caption
per row with `caption_choice`, all vectorised.

An example whose image cannot be decoded or that has no non-blank caption is
left out of the table (counted, and the first few named in a warning) instead
of being skipped at each visit, so a source's epoch is its table rows:
positions stay exact on resume. A source with no example left is an error.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from jclip.data import draw_order, preprocess
from jclip.data.preprocess import ImageOp
from jclip.data.sources import NAMED_SKIPPED, Source, encoded_image, first_few, text_captions

# The most memory the decoded images of this process's sources may take (estimated from each source's first
# image); sources beyond it are read and decoded per visit instead.
DECODED_IN_MEMORY_BYTES = 2**30
# Examples decoded in parallel while a table is built, and prepared in parallel by random per-image ops while
# batches are gathered from it (a fixed number, as `pipeline.DECODE_PARALLELISM`).
PARALLELISM = 2
LOAD_BATCH = 512  # examples batched for the copy into the table


@dataclasses.dataclass
class ExampleTable:
    """Examples of one or more sources, row by row: a decoded image and the row's captions."""

    images: tf.Tensor  # uint8 [rows, H, W, 3]: the leading deterministic preprocessing ops applied
    caption_starts: np.ndarray  # int64 [rows + 1]: row r's captions are caption_texts[starts[r]:starts[r + 1]]
    caption_texts: np.ndarray  # int64: the index in `texts` of each caption
    texts: list[str]  # the distinct caption texts
    rows_per_source: list[int]  # rows of each source, in order: source s has rows [sum(before s), ...)
    left_out: int  # examples left out: image not decodable, or no non-blank caption


@dataclasses.dataclass
class _SourceRows:
    images: list[tf.Tensor]  # uint8 [n, H, W, 3] each, in row order
    captions: list[list[str]]  # each row's non-blank captions
    left_out: int
    named: list[str]  # where the first few examples left out are (`Source.describe`)


def _rows(source: Source, image_op: ImageOp, byte_limit: int, options: tf.data.Options,
          shape: Optional[tuple[int, ...]]) -> Optional[_SourceRows]:
    """The rows of `source`; None when its decoded images would take more than `byte_limit` bytes or do not
    all have one shape (`shape`, when given); a ValueError when it has no example to keep."""
    def decoded(index, example):
        image = image_op(encoded_image(example, source.image_files), tf.constant([0, 0], tf.int64))
        return {"index": index, "pixels": tf.reshape(image, [-1]), "shape": tf.shape(image),
                "captions": text_captions(example["captions"])}

    batches = (source.examples.enumerate().map(decoded, num_parallel_calls=PARALLELISM).ignore_errors()
               .ragged_batch(LOAD_BATCH).prefetch(1).with_options(options))
    rows, left_out, next_index = _SourceRows([], [], 0, []), [], 0  # left_out: the first few left out
    with tqdm(total=source.num_examples, unit="example", desc=f"decode {source.name} into memory",
              mininterval=2.0, leave=False, disable=jax.process_index() != 0) as bar:
        for batch in batches:
            shapes = batch["shape"].numpy()
            shape = shape or tuple(shapes[0])
            if (shapes != shape).any() or batch["pixels"].dtype != tf.uint8 or (
                    int(np.prod(shape)) * source.num_examples > byte_limit):
                return None
            pixels = batch["pixels"]  # ragged, or dense when the ops give one static shape
            pixels = pixels.flat_values if isinstance(pixels, tf.RaggedTensor) else pixels
            has_caption = batch["captions"].row_lengths() > 0
            rows.images.append(tf.boolean_mask(tf.reshape(pixels, (-1, *shape)), has_caption))
            rows.captions += [[t.decode("utf-8") for t in row] for row in batch["captions"].to_list() if row]
            indices = batch["index"].numpy()
            kept = indices[has_caption.numpy()]
            left_out = (left_out + np.setdiff1d(np.arange(next_index, indices[-1] + 1), kept).tolist())[:NAMED_SKIPPED]
            next_index = int(indices[-1]) + 1
            bar.update(next_index - bar.n)
    rows.left_out = source.num_examples - len(rows.captions)
    left_out += range(next_index, source.num_examples)[:NAMED_SKIPPED]
    rows.named = [source.describe(k) for k in left_out[:NAMED_SKIPPED]]
    if not rows.captions:
        raise ValueError(f"none of the {source.num_examples} examples of source {source.name!r} has an image that can "
                         f"be read and decoded and a caption ({first_few(rows.named, rows.left_out)}): check its "
                         "image files and captions")
    return rows


def load_table(sources: Sequence[Source], image_op: ImageOp, options: tf.data.Options) -> Optional[ExampleTable]:
    """All examples of `sources` decoded by `image_op` (deterministic: it gets no seed), read with the tf.data
    `options`; None when some source is not small (`Source.fits_in_memory`), or the decoded images would not
    fit in `DECODED_IN_MEMORY_BYTES` or do not share one shape. A warning names the first few examples left out of
    each source; a source with none kept is a ValueError."""
    if not sources or not all(source.fits_in_memory for source in sources):
        return None
    parts, shape, used = [], None, 0
    for source in sources:
        part = _rows(source, image_op, DECODED_IN_MEMORY_BYTES - used, options, shape)
        if part is None:
            return None
        shape = tuple(part.images[0].shape[1:])
        used += sum(images.shape[0] for images in part.images) * int(np.prod(shape))
        parts.append(part)
    for source, part in zip(sources, parts):
        if part.left_out:
            print(f"warning: left out {part.left_out} example(s) of {source.name} whose image cannot be read or "
                  f"decoded or that have no caption: {first_few(part.named, part.left_out)}", flush=True)
    texts: dict[str, int] = {}
    rows = [row for part in parts for row in part.captions]
    return ExampleTable(
        images=tf.concat([images for part in parts for images in part.images], axis=0),
        caption_starts=np.cumsum([0] + [len(row) for row in rows], dtype=np.int64),
        caption_texts=np.array([texts.setdefault(text, len(texts)) for row in rows for text in row], np.int64),
        texts=list(texts),
        rows_per_source=[len(part.captions) for part in parts],
        left_out=sum(part.left_out for part in parts),
    )


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: uint64 -> uint64, every output bit depending on every input bit."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def caption_choice(seed: int, draws: np.ndarray, caption_counts: np.ndarray) -> np.ndarray:
    """Which of its `caption_counts` captions each draw samples: uniform, a fixed function of (seed, draw)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed % 2**64], np.uint64) * golden + golden)
        bits = _mix(key + np.asarray(draws).astype(np.uint64) * golden)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.minimum((uniform * caption_counts).astype(np.int64), caption_counts - 1)


def table_rows(rows_per_source: Sequence[int], weights: Sequence[float], seed: int, shuffle_buffer: int,
               start: int) -> tf.data.Dataset:
    """Row numbers of a table of sources of `rows_per_source` rows (source s has rows [sum(before s), ...)),
    drawn as `pipeline.mixed_stream` draws examples of its sources, from draw `start` on."""
    firsts = np.cumsum([0] + list(rows_per_source)).tolist()

    def stream(source_index, start):
        rows = tf.data.Dataset.range(firsts[source_index], firsts[source_index + 1])
        return draw_order.epochs(rows, rows_per_source[source_index], source_index, seed, shuffle_buffer, start)

    return draw_order.mixture([functools.partial(stream, i) for i in range(len(weights))], weights, seed, start)


class TableBatches:
    """A batch source of `pipeline.TrainInput`: local batches `{"image", "row", "index"}` of `table` rows.

    The images are gathered for the whole batch at once, unless random per-image
    ops (crops, flips) need each image with its own seed; each row's caption is
    sampled when the batch is handed out (`captions_and_tokens`).
    """

    def __init__(self, table: ExampleTable, weights: Sequence[float], tokenizer, *, local_batch: int,
                 text_length: int, seed: int, shuffle_buffer: int, per_image: preprocess.Ops, start: int):
        self.table, self.seed, self.left_out = table, seed, table.left_out
        self.text_tokens = tokenizer(table.texts, text_length)  # each distinct caption tokenized once
        rows = table_rows(table.rows_per_source, weights, seed, shuffle_buffer, start).enumerate(start)
        if per_image:
            image_op = preprocess.compose(per_image)

            def example(index, row):
                image = image_op(tf.gather(table.images, row), draw_order.example_seed(seed, index))
                return {"image": image, "row": row, "index": index}
            self.batches = rows.map(example, num_parallel_calls=PARALLELISM).batch(local_batch, drop_remainder=True)
        else:
            self.batches = rows.batch(local_batch, drop_remainder=True).map(
                lambda index, row: {"image": tf.gather(table.images, row), "row": row, "index": index})

    def captions_and_tokens(self, batch: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
        """The batch's captions and their tokens, one caption sampled per row."""
        starts = self.table.caption_starts[batch["row"]]
        counts = self.table.caption_starts[batch["row"] + 1] - starts
        texts = self.table.caption_texts[starts + caption_choice(self.seed, batch["index"], counts)]
        return [self.table.texts[t] for t in texts], self.text_tokens[texts]
