"""The tokenizer named by `config.data.tokenizer`."""

from typing import Optional

from jclip.data import shapes
from jclip.data.tokenizer import Tokenizer


def load_tokenizer(name: str, data_dir: Optional[str] = None) -> Tokenizer:
    """`"shapes/CONFIG"`: the BPE trained on that `shapes` dataset; a `.json` path: a saved `Tokenizer`."""
    if name.startswith("shapes/"):
        return Tokenizer.load(shapes.tokenizer_path(shapes.prepare(name.split("/", 1)[1], data_dir)))
    if name.endswith(".json"):
        return Tokenizer.load(name)
    raise ValueError(f"unknown tokenizer {name!r}; use 'shapes/CONFIG' or the path of a tokenizer .json file")
