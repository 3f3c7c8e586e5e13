"""Evaluation images: one process's slice of a dataset, decoded and preprocessed in batches."""

from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from jclip import parallel
from jclip.data import pipeline, preprocess
from jclip.data.sources import encoded_image

# Skipped image files a warning names (the first ones of each process).
NAMED_SKIPPED = 5


class LocalImages:
    """This process's `count` examples of `examples` (`{"image": bytes, "image_path": str, ...}`), in order.

    `batches(size)` yields the preprocessed images; the other fields that
    `fields(example)` picks (labels, captions) are collected into `self.fields`
    on the way, in the same order, so they line up with the embeddings.

    An image that cannot be read or decoded stops the batches with an error naming the dataset, or, with
    `skip_unreadable`, is left out (with its fields): the batches then yield fewer than `count` examples,
    and `skipped` counts the ones left out once the batches are all read.
    """

    def __init__(self, name: str, examples: tf.data.Dataset, count: int, image_preprocess: str,
                 fields: Optional[Callable[[dict], dict]] = None, skip_unreadable: bool = False):
        self.name, self.count, self.skip_unreadable, self.spec = name, count, skip_unreadable, image_preprocess
        image_op = preprocess.parse(image_preprocess)
        pick = fields or (lambda example: {})
        self._paths = examples.map(lambda ex: ex["image_path"])  # to name the skipped files
        self._examples = examples.enumerate().map(
            lambda index, ex: {"image": image_op(encoded_image(ex), tf.constant([0, 0], tf.int64)),
                               "_index": index, **pick(ex)},
            num_parallel_calls=pipeline.DECODE_PARALLELISM,
        )
        if skip_unreadable:
            self._examples = self._examples.ignore_errors()
        self.fields: dict[str, list] = {}
        self._indices: list[int] = []  # which of the `count` examples the batches yielded

    def batches(self, size: int) -> Iterator[Any]:
        """The preprocessed images in batches of at most `size` (arrays, or NaFlex patch inputs)."""
        self.fields, self._indices = {}, []
        # padded: a field may vary in length (several captions per image); strings pad with "".
        batches = self._examples.padded_batch(size).prefetch(1).with_options(pipeline.input_options()).as_numpy_iterator()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except tf.errors.InvalidArgumentError as error:
                raise ValueError(f"an image of {self.name} cannot be read or decoded "
                                 f"({error.message.splitlines()[0]}); remove or re-encode it") from None
            self._indices.extend(int(i) for i in batch["_index"])
            for key, value in batch.items():
                if key not in ("image", "_index"):
                    self.fields.setdefault(key, []).extend(value)
            yield batch["image"]
        if len(self._indices) > self.count or (not self.skip_unreadable and len(self._indices) != self.count):
            raise ValueError(f"{self.name} yielded {len(self._indices)} examples, expected {self.count}")

    @property
    def skipped(self) -> int:
        """The examples left out for an unreadable image (once `batches` has yielded them all)."""
        return self.count - len(self._indices)

    def skipped_files(self, limit: int = NAMED_SKIPPED) -> list[str]:
        """The image paths (or "#index" for images without a file) of the first `limit` skipped examples."""
        if not self.skipped:
            return []
        yielded = set(self._indices)
        missing = [i for i in range(self.count) if i not in yielded][:limit]
        paths = {}
        for index, path in enumerate(self._paths.take(missing[-1] + 1).as_numpy_iterator()):
            if index in missing:
                paths[index] = path.decode("utf-8", "replace") or f"#{index}"
        return [paths[i] for i in missing]

    def gather_skipped(self) -> int:
        """The examples every process skipped; process 0 prints a warning naming the first few files. Every
        process calls this together (after `batches`)."""
        counts = parallel.gather_from_processes(np.array([self.skipped], np.int64))
        total = int(counts.sum())
        if total:
            named = parallel.gather_strings(self.skipped_files())
            if jax.process_index() == 0:
                more = f" (the first {len(named)} named)" if len(named) < total else ""
                print(f"warning: skipped {total} image(s) of {self.name} that cannot be read or decoded{more}: "
                      + ", ".join(named), flush=True)
        return total
