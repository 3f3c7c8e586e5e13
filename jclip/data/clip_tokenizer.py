"""The OpenAI CLIP byte-level BPE tokenizer, giving the token ids of OpenAI / OpenCLIP checkpoints.

Radford et al. 2021 (arXiv 2103.00020), section 2.4: a lower-cased byte-pair
encoding (Sennrich et al. 2016) with a 49,152-entry vocabulary, texts bracketed
by `<start_of_text>` / `<end_of_text>` and capped at 76 (+1) tokens. The
algorithm, implemented here from its description:

1. clean the text: repair mojibake with `ftfy`, unescape HTML entities (twice,
   for doubly escaped web text), collapse whitespace, lower-case;
2. split it into words with the pattern `'s|'t|'re|'ve|'m|'ll|'d`, runs of
   letters, single digits, runs of other non-space characters (the special
   token strings, if written out in a text, are matched as the special tokens);
3. map each word's UTF-8 bytes to printable characters (the GPT-2 byte-to-
   unicode table), mark its last symbol with `</w>`, then repeatedly merge the
   adjacent pair with the best (lowest) rank in the merges file, all its
   occurrences left to right, until no ranked pair is left;
4. ids: 256 byte symbols, the same 256 with `</w>`, one id per merge in file
   order, then `<start_of_text>` and `<end_of_text>` (49406, 49407 with the
   OpenAI file; vocabulary size 49408).

The merges file is `bpe_simple_vocab_16e6.txt.gz`, which the `open_clip`
package ships; jclip does not ship a copy.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from jclip.data.bpe_tokenizer import pack_fixed_length

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77  # OpenAI CLIP's text length
MAX_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary budget: 49152 minus bytes and special tokens
END_OF_WORD = "</w>"
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
WORD_CACHE_SIZE = 1 << 18  # words whose ids are memoised before the memo is cleared


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable, non-space characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to
    U+0100 onwards in byte order, so that BPE symbols never contain whitespace
    or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy repair, HTML unescape (twice), collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def find_vocab_file(path: str | None = None) -> str:
    """`path` if given, else the merges file inside the installed `open_clip` package."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no CLIP BPE merges file at {path!r}")
        return path
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing torch
    if spec is not None and spec.submodule_search_locations:
        candidate = os.path.join(spec.submodule_search_locations[0], VOCAB_FILE_NAME)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"CLIP BPE merges file {VOCAB_FILE_NAME!r} not found: pass its path, or install the "
        "`open_clip_torch` package (pip install 'jclip[torch]'), which ships it"
    )


def read_merges(path: str) -> list[tuple[str, str]]:
    """The first `MAX_MERGES` merge rules of a merges file (gzipped or plain; first line is a header)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]
    while lines and not lines[-1]:
        lines.pop()
    merges = []
    for number, line in enumerate(lines[:MAX_MERGES], start=2):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: a merge rule is two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer with jclip's fixed-length encoding: ids identical to OpenCLIP's."""

    def __init__(self, merges: Sequence[tuple[str, str]]):
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START_OF_TEXT], self.encoder[END_OF_TEXT]
        self.pad_id = 0
        self.vocab_size = len(vocab)
        specials = "|".join(regex.escape(s) for s in (START_OF_TEXT, END_OF_TEXT))
        self.word_pattern = regex.compile(f"{specials}|{WORD_PATTERN}", regex.IGNORECASE)
        self._word_cache: dict[str, tuple[int, ...]] = {}  # a plain dict keeps the tokenizer picklable

    @classmethod
    def load(cls, path: str | None = None) -> ClipTokenizer:
        """From a merges file at `path`, or the one the installed `open_clip` package ships."""
        return cls(read_merges(find_vocab_file(path)))

    def bpe(self, word: str) -> list[str]:
        """The BPE pieces of one word (already in byte-symbol form), the last one ending in `</w>`."""
        pieces = [*word[:-1], word[-1] + END_OF_WORD]
        while len(pieces) > 1:
            pair = min(zip(pieces, pieces[1:]), key=lambda p: self.ranks.get(p, MAX_MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = merged
        return pieces

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised word, memoised: BPE dominates the cost and captions repeat words."""
        ids = self._word_cache.get(word)
        if ids is None:
            if word in (START_OF_TEXT, END_OF_TEXT):
                ids = (self.encoder[word],)
            else:
                symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids = tuple(self.encoder[piece] for piece in self.bpe(symbols))
            if len(self._word_cache) >= WORD_CACHE_SIZE:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned, lower-cased text, without start/end tokens or length limit."""
        return [i for word in self.word_pattern.findall(clean_text(text)) for i in self._word_ids(word)]

    def __call__(self, texts: Sequence[str], length: int = CONTEXT_LENGTH) -> np.ndarray:
        """Encodes `texts` to int32 `[N, length]`: start, tokens, end (kept on truncation), 0-padding."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
        return pack_fixed_length(
            [self.encode(t) for t in texts], length, start_id=self.start_id, end_id=self.end_id, pad_id=self.pad_id
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids: what follows the start token, up to the first end token.

        Padding is not skipped by value, because id 0 is also the symbol `!`.
        """
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.start_id:
            ids = ids[1:]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        symbols = "".join(self.decoder[i] for i in ids)
        text = bytes(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()
