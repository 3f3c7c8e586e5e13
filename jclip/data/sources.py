"""Resolving `config.data` to a dataset builder and its tokenizer."""

import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from jclip.data import shapes
from jclip.data.tokenizer import Tokenizer


def load_source(data: ConfigDict) -> tuple[tfds.core.DatasetBuilder, Tokenizer]:
    """The prepared dataset builder of `config.data` (built on first use) and its tokenizer."""
    if data.name != "shapes":
        raise ValueError(f"unknown dataset {data.name!r}; the built-in dataset is 'shapes'")
    builder = shapes.prepare(data.builder_config, data.data_dir)
    return builder, Tokenizer.load(shapes.tokenizer_path(builder))
