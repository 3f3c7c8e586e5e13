"""tf.data input: a deterministic, resumable stream of global batches.

The stream is a pure function of (seed, position): epoch e is the split
shuffled with seed (seed, e), and a run resumed at step s starts reading at
example s * local_batch of that sequence. So a resumed run sees exactly the
batches an uninterrupted run would have seen. Each process reads its own
slice of the split (`tfds.split_for_jax_process`) and contributes
global_batch / process_count examples to every global batch.
"""

from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jclip import parallel
from jclip.data.tokenizer import Tokenizer

tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX.


# Images decoded in parallel. A fixed number rather than AUTOTUNE: tf.data's autotuning runs a
# background model thread that, at the end of a run, could block the iterator's destructor forever
# (seen at exit after training); and two cores decode far faster than the model consumes.
DECODE_PARALLELISM = 2


def _input_options() -> tf.data.Options:
    """Deterministic order and no autotuning thread (see DECODE_PARALLELISM)."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """PNG/JPEG bytes -> float32 [H, W, 3] in [-1, 1]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def _examples(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """The split in its stored order, images still encoded (decoding comes after skipping)."""
    return builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
    )


def train_batches(
    builder: tfds.core.DatasetBuilder, tokenizer: Tokenizer, mesh: Mesh, *,
    batch_size: int, text_length: int, seed: int, shuffle_buffer: int, start_step: int = 0,
    split: str = "train",
) -> Iterator[dict[str, jax.Array]]:
    """Endless global batches `{"image", "tokens"}` of `batch_size`, starting at `start_step`."""
    parallel.check_batch_size(batch_size, mesh)
    local_batch = batch_size // jax.process_count()
    process_split = tfds.split_for_jax_process(split)
    num_examples = builder.info.splits[process_split].num_examples
    if num_examples == 0:
        raise ValueError(f"split {process_split!r} of {builder.name} is empty for process {jax.process_index()}")
    position = start_step * local_batch
    first_epoch, offset = divmod(position, num_examples)
    examples = _examples(builder, process_split)

    def epoch(index):
        return examples.shuffle(min(shuffle_buffer, num_examples), seed=seed * 1_000_003 + index,
                                reshuffle_each_iteration=False)

    stream = (
        tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
        .flat_map(epoch)
        .skip(offset)
        .map(lambda ex: {"image": decode_image(ex["image"]), "caption": ex["caption"]},
             num_parallel_calls=DECODE_PARALLELISM)
        .batch(local_batch, drop_remainder=True)
        .prefetch(2)
        .with_options(_input_options())
    )
    for batch in stream.as_numpy_iterator():
        captions = [c.decode("utf-8") for c in batch["caption"]]
        local = {"image": batch["image"], "tokens": tokenizer(captions, text_length)}
        yield parallel.global_batch(local, mesh)


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """A whole (evaluation) split as NumPy arrays: decoded images, captions as str, labels."""
    dataset = _examples(builder, split).map(
        lambda ex: {**ex, "image": decode_image(ex["image"])}, num_parallel_calls=DECODE_PARALLELISM
    )
    columns: dict[str, list] = {}
    for example in dataset.batch(1024).with_options(_input_options()).as_numpy_iterator():
        for key, value in example.items():
            columns.setdefault(key, []).append(value)
    arrays = {key: np.concatenate(value) for key, value in columns.items()}
    arrays["caption"] = np.array([c.decode("utf-8") for c in arrays["caption"]])
    return arrays
