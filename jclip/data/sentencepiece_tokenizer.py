"""SentencePiece tokenizer with jclip's fixed-length encoding, for SigLIP-style text towers.

SigLIP (Zhai et al. 2023, arXiv 2303.15343) tokenises with a SentencePiece
model (Kudo & Richardson 2018), e.g. big_vision's T5 "c4_en" vocabulary
(pad 0, end-of-sequence 1, unknown 2), adds no start token, appends the end
token and keeps it on truncation ("sticky" eos), and pads with the end id 1.

Rows end their content with the end token (kept on truncation) and are padded
with either 0 or the end id, matching the text tower's pooling: padding with 0
suits `pool="eos"` (the last non-zero position is the end token, provided id 0
is never content, as in T5's vocabulary), padding with the end id suits
`pool="last"` (SigLIP). The padding id must be a control piece, so that
padding never reads as text.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece

from jclip.data.bpe_tokenizer import pack_fixed_length


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """big_vision's text cleaning for SigLIP and SigLIP 2 (OpenCLIP's `clean="canonicalize"`): underscores to
    spaces, punctuation removed, lower case, runs of whitespace to one space."""
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


class SentencePieceTokenizer:
    """A `sentencepiece.SentencePieceProcessor` producing int32 `[N, length]` rows for the text tower."""

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        *,
        pad_id: int | None = None,
        end_id: int | None = None,
        add_start: bool = False,
        clean: bool = False,
    ):
        """`pad_id` / `end_id` default to the model's pad / eos pieces; `add_start` writes its bos first;
        `clean` applies `canonicalize` to every text first, as SigLIP and SigLIP 2 were trained.

        For SigLIP's big_vision convention with the T5 vocabulary, pass `pad_id=1` (= its eos).
        """
        self.processor = processor
        self.clean = clean
        self.vocab_size = processor.get_piece_size()
        self.pad_id = self._special_id("pad_id", pad_id, processor.pad_id())
        self.end_id = self._special_id("end_id", end_id, processor.eos_id())
        if add_start and processor.bos_id() < 0:
            raise ValueError("add_start=True needs a bos piece, but the SentencePiece model defines none")
        self.start_id = processor.bos_id() if add_start else None
        if self.pad_id not in (0, self.end_id):
            raise ValueError(
                f"pad_id must be 0 (for the text tower's pool='eos') or the end id {self.end_id} "
                f"(for pool='last'), so that pooling lands on an end token; got {self.pad_id}"
            )
        if not (processor.is_control(self.pad_id) or processor.is_unused(self.pad_id)):
            raise ValueError(
                f"pad_id {self.pad_id} is the content piece {processor.id_to_piece(self.pad_id)!r}, so padding "
                "would read as text; pass the end id as pad_id, or use a model trained with --pad_id=0 (as T5's)"
            )

    def _special_id(self, name: str, given: int | None, from_model: int) -> int:
        if given is None and from_model < 0:
            raise ValueError(f"the SentencePiece model defines no piece for {name}; pass {name}=...")
        value = from_model if given is None else given
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{name}={value} is not an id of this model's vocabulary [0, {self.vocab_size})")
        return value

    @classmethod
    def load(
        cls, path: str, *, pad_id: int | None = None, end_id: int | None = None, add_start: bool = False,
        clean: bool = False,
    ) -> SentencePieceTokenizer:
        """From a SentencePiece `.model` file; arguments as in the constructor."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SentencePiece model file at {path!r}")
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
        return cls(processor, pad_id=pad_id, end_id=end_id, add_start=add_start, clean=clean)

    def __call__(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Encodes `texts` to int32 `[N, length]`: [start], tokens, end (kept on truncation), padding."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
        texts = [canonicalize(text) for text in texts] if self.clean else list(texts)
        sequences = self.processor.encode(texts, out_type=int)
        return pack_fixed_length(sequences, length, start_id=self.start_id, end_id=self.end_id, pad_id=self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids: up to the first end token, without start token or padding."""
        ids = [int(i) for i in ids]
        if self.start_id is not None and ids and ids[0] == self.start_id:
            ids = ids[1:]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.processor.decode([i for i in ids if i != self.pad_id])
