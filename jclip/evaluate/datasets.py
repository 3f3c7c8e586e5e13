"""Evaluation images: one process's slice of a dataset, decoded and preprocessed in batches."""

from typing import Callable, Iterator, Optional

import numpy as np
import tensorflow as tf

from jclip.data import pipeline, preprocess
from jclip.data.sources import encoded_image


class LocalImages:
    """This process's `count` examples of `examples` (`{"image": bytes, "image_path": str, ...}`), in order.

    `batches(size)` yields the preprocessed images; the other fields that
    `fields(example)` picks (labels, captions) are collected into `self.fields`
    on the way, in the same order, so they line up with the embeddings.
    """

    def __init__(self, name: str, examples: tf.data.Dataset, count: int, image_preprocess: str,
                 fields: Optional[Callable[[dict], dict]] = None):
        self.name, self.count = name, count
        image_op = preprocess.parse(image_preprocess)
        pick = fields or (lambda example: {})
        self._examples = examples.map(
            lambda ex: {"image": image_op(encoded_image(ex), tf.constant([0, 0], tf.int64)), **pick(ex)},
            num_parallel_calls=pipeline.DECODE_PARALLELISM,
        )
        self.fields: dict[str, list] = {}

    def batches(self, size: int) -> Iterator[np.ndarray]:
        self.fields = {}
        # padded: a field may vary in length (several captions per image); strings pad with "".
        batches = self._examples.padded_batch(size).prefetch(1).with_options(pipeline.input_options()).as_numpy_iterator()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except tf.errors.InvalidArgumentError as error:
                raise ValueError(f"an image of {self.name} cannot be read or decoded "
                                 f"({error.message.splitlines()[0]}); remove or re-encode it") from None
            for key, value in batch.items():
                if key != "image":
                    self.fields.setdefault(key, []).extend(value)
            yield batch["image"]
