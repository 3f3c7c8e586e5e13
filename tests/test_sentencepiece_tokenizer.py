"""Tests of the SentencePiece tokenizer on tiny models trained on the fly."""

import pickle

import numpy as np
import pytest
import sentencepiece

from helpers import CAPTIONS
from jclip.data.sentencepiece_tokenizer import SentencePieceTokenizer, canonicalize
from jclip.data.tokenizers import load_tokenizer

VOCAB_SIZE = 40


def train_model(directory, name, **ids) -> str:
    """A `VOCAB_SIZE`-piece model of `CAPTIONS`; `ids` sets its special pieces (sentencepiece's `pad_id=`, ...)."""
    prefix = str(directory / name)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 20), model_prefix=prefix, vocab_size=VOCAB_SIZE, minloglevel=2, **ids
    )
    return prefix + ".model"


@pytest.fixture(scope="module")
def t5_style_model(tmp_path_factory):
    """Ids laid out as in T5's / SigLIP's c4_en vocabulary: pad 0, eos 1, unk 2 (and a bos, 3)."""
    return train_model(tmp_path_factory.mktemp("spm"), "t5", pad_id=0, eos_id=1, unk_id=2, bos_id=3)


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """sentencepiece's default layout: unk 0, bos 1, eos 2, no pad piece."""
    return train_model(tmp_path_factory.mktemp("spm"), "default")


def pooled_ids(tokens):
    """The id at which jclip's text tower pools: the last non-zero position of each row."""
    last = np.maximum((tokens != 0).sum(axis=1) - 1, 0)
    return tokens[np.arange(len(tokens)), last]


def test_special_ids_come_from_the_model(t5_style_model):
    tokenizer = SentencePieceTokenizer.load(t5_style_model)
    assert (tokenizer.pad_id, tokenizer.end_id, tokenizer.start_id) == (0, 1, None)
    assert tokenizer.vocab_size == VOCAB_SIZE


def test_layout_tokens_end_then_padding(t5_style_model):
    tokenizer = SentencePieceTokenizer.load(t5_style_model)
    tokens = tokenizer(CAPTIONS + ["", "Ünseen ©haracters!"], length=64)
    assert tokens.dtype == np.int32 and tokens.shape == (7, 64)
    expected = tokenizer.processor.encode(CAPTIONS, out_type=int)
    for row, ids in zip(tokens, expected):
        np.testing.assert_array_equal(row[: len(ids) + 1], ids + [1])
        assert (row[len(ids) + 1 :] == 0).all()
    np.testing.assert_array_equal(tokens[5, :2], [1, 0])  # empty text: just the end token
    assert tokenizer.processor.unk_id() in tokens[6]
    assert (pooled_ids(tokens) == tokenizer.end_id).all()


def test_siglip_padding_with_the_end_id(t5_style_model):
    tokenizer = SentencePieceTokenizer.load(t5_style_model, pad_id=1)
    tokens = tokenizer(CAPTIONS, length=64)
    zero_padded = SentencePieceTokenizer.load(t5_style_model)(CAPTIONS, length=64)
    np.testing.assert_array_equal(tokens, np.where(zero_padded == 0, 1, zero_padded))
    assert (tokens != 0).all() and (pooled_ids(tokens) == tokenizer.end_id).all()


@pytest.mark.parametrize("add_start", [False, True])
def test_truncation_keeps_end_token(t5_style_model, add_start):
    tokenizer = SentencePieceTokenizer.load(t5_style_model, add_start=add_start)
    full = tokenizer(CAPTIONS[1:2], length=80)[0]
    first = int(add_start)
    if add_start:
        assert full[0] == tokenizer.start_id == 3
    num_content = int((full != 0).sum()) - first - 1
    for length in (first + 1, first + 3, num_content + first, num_content + first + 1):
        row = tokenizer(CAPTIONS[1:2], length=length)[0]
        assert row[-1] == tokenizer.end_id
        np.testing.assert_array_equal(row[:-1], full[: length - 1])


def test_decode_round_trip(t5_style_model):
    for pad_id in (0, 1):
        tokenizer = SentencePieceTokenizer.load(t5_style_model, pad_id=pad_id, add_start=True)
        assert [tokenizer.decode(row) for row in tokenizer(CAPTIONS, length=64)] == CAPTIONS


def test_pickled_copy_gives_identical_ids(t5_style_model):
    # Input pipelines ship the tokenizer to worker processes.
    tokenizer = SentencePieceTokenizer.load(t5_style_model, pad_id=1, add_start=True)
    copy = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(copy(CAPTIONS, length=64), tokenizer(CAPTIONS, length=64))


def test_rejects_incompatible_special_ids(t5_style_model, default_model, tmp_path):
    no_bos_model = train_model(tmp_path, "no_bos", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    with pytest.raises(ValueError, match="pad_id must be 0 .* or the end id"):
        SentencePieceTokenizer.load(t5_style_model, pad_id=3)
    with pytest.raises(ValueError, match="not an id"):
        SentencePieceTokenizer.load(t5_style_model, end_id=VOCAB_SIZE)
    with pytest.raises(ValueError, match="defines no piece for pad_id"):
        SentencePieceTokenizer.load(default_model)
    with pytest.raises(ValueError, match="needs a bos piece"):
        SentencePieceTokenizer.load(no_bos_model, add_start=True)
    with pytest.raises(ValueError, match="pad_id 0 is the content piece '<unk>'"):
        SentencePieceTokenizer.load(default_model, pad_id=0)
    assert SentencePieceTokenizer.load(default_model, pad_id=2).end_id == 2  # padded with its eos
    with pytest.raises(FileNotFoundError):
        SentencePieceTokenizer.load(str(tmp_path / "missing.model"))
    tokenizer = SentencePieceTokenizer.load(t5_style_model)
    with pytest.raises(ValueError, match="length"):
        tokenizer(CAPTIONS, length=0)
    with pytest.raises(TypeError):
        tokenizer(CAPTIONS[0], length=8)


def test_siglip_spec_cleans_texts_as_big_vision_before_encoding(t5_style_model):
    """`siglip:PATH` lower-cases and strips punctuation (OpenCLIP's clean="canonicalize") before encoding."""
    assert canonicalize("  A Photo_of a DOG!  (big) ") == "a photo of a dog big"
    siglip = load_tokenizer(f"siglip:{t5_style_model}")
    plain = load_tokenizer(f"sentencepiece:{t5_style_model}")
    texts = ["A RED Circle, left of a Square!", "a_blue  triangle."]
    np.testing.assert_array_equal(siglip(texts, 32), plain([canonicalize(t) for t in texts], 32))
    assert not np.array_equal(siglip(texts, 32), plain(texts, 32))
