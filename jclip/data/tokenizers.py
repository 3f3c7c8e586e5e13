"""The tokenizer named by `config.data.tokenizer`."""

from typing import Optional

from jclip.data import shapes
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.clip_tokenizer import ClipTokenizer
from jclip.data.sentencepiece_tokenizer import SentencePieceTokenizer


def load_tokenizer(name: str, data_dir: Optional[str] = None):
    """The tokenizer `name` names.

    - `"shapes/CONFIG"`: the BPE trained on that `shapes` dataset's captions;
    - `"clip"` or `"clip:PATH"`: OpenAI CLIP's BPE (merges file at PATH, or the one open_clip ships);
    - `"sentencepiece:PATH"`: a SentencePiece model file (SigLIP-style models);
    - `"siglip:PATH"`: the same with SigLIP's text cleaning (lower case, no punctuation), for SigLIP and
      SigLIP 2 weights (T5's `cc_en.32000` model, Gemma's 256k `tokenizer.model`);
    - a path ending in `.json`: a saved jclip `Tokenizer`.
    """
    if name.startswith("shapes/"):
        return Tokenizer.load(shapes.tokenizer_path(shapes.prepare(name.split("/", 1)[1], data_dir)))
    if name == "clip" or name.startswith("clip:"):
        return ClipTokenizer.load(name.partition(":")[2] or None)
    if name.startswith("sentencepiece:"):
        return SentencePieceTokenizer.load(name.partition(":")[2])
    if name.startswith("siglip:"):
        return SentencePieceTokenizer.load(name.partition(":")[2], clean=True)
    if name.endswith(".json"):
        return Tokenizer.load(name)
    raise ValueError(f"unknown tokenizer {name!r}; use 'shapes/CONFIG', 'clip', 'clip:PATH', "
                     "'sentencepiece:PATH', 'siglip:PATH' or the path of a tokenizer .json file")
