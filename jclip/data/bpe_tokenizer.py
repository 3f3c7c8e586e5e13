"""Byte-level BPE tokenizer producing fixed-length token arrays for the text tower.

Every text becomes `<start_of_text> tokens... <end_of_text>` padded with 0 to a
fixed length, so that batches are dense `int32 [N, L]` arrays. When a text is
too long it is truncated but the last position is still `<end_of_text>` (the
OpenAI CLIP convention): the text tower pools its output at the end-of-text
token, so that token must be present in every row.

The BPE runs on bytes (GPT-2 style), so no character is ever unknown; text is
lower-cased and whitespace-collapsed first, and pre-tokenised on
whitespace/punctuation boundaries.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD = "<pad>"
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
SPECIAL_TOKENS = (PAD, START_OF_TEXT, END_OF_TEXT)  # ids 0, 1, 2 in that order


def pack_fixed_length(
    sequences: Sequence[Sequence[int]], length: int, *, start_id: int | None, end_id: int, pad_id: int
) -> np.ndarray:
    """int32 `[N, length]` rows `[start] ids... end pad...`, truncating `ids` so `end` always fits.

    The end token is kept on truncation because the text tower pools at it.
    `start_id=None` writes no start token (SigLIP's convention).
    """
    first = 0 if start_id is None else 1
    if length < first + 1:
        raise ValueError(f"length must be >= {first + 1} to hold the start/end tokens, got {length}")
    rows = np.full((len(sequences), length), pad_id, np.int32)
    for row, ids in zip(rows, sequences):
        ids = list(ids[: length - first - 1])
        if start_id is not None:
            row[0] = start_id
        row[first : first + len(ids)] = ids
        row[first + len(ids)] = end_id
    return rows


class Tokenizer:
    """A trained BPE `tokenizers.Tokenizer` plus the fixed-length encoding convention."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        if None in ids or ids[0] != 0:
            raise ValueError(f"tokenizer must define {SPECIAL_TOKENS} with {PAD} = 0, got {ids}")
        self.pad_id, self.start_id, self.end_id = ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000) -> Tokenizer:
        """Learns BPE merges from `texts`; merging stops early once every word is one token."""
        backend = tokenizers.Tokenizer(models.BPE())
        backend.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.Lowercase(),
                normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
                normalizers.Strip(),
            ]
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def save(self, path: str) -> None:
        """Writes the tokenizer as JSON; atomic, so readers never see a partial file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temp_path = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.backend.save(temp_path)
            os.replace(temp_path, path)
        finally:
            if os.path.exists(temp_path):  # only when saving failed
                os.remove(temp_path)

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path!r}")
        return cls(tokenizers.Tokenizer.from_file(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Encodes `texts` to int32 `[N, length]`: start, tokens, end, then 0-padding."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
        # One text at a time: for captions, `encode_batch`'s thread pool costs more CPU than it saves, and its
        # threads compete with the training step for the cores.
        ids = [self.backend.encode(text, add_special_tokens=False).ids for text in texts]
        return pack_fixed_length(ids, length, start_id=self.start_id, end_id=self.end_id, pad_id=self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, without special tokens or padding."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True).strip()
