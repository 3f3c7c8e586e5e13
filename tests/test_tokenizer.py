"""Tests of the fixed-length BPE tokenizer: round trip, padding, truncation, persistence."""

import os

import numpy as np
import pytest

from helpers import CAPTIONS
from jclip.data.bpe_tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CAPTIONS * 20, vocab_size=400)


def test_special_token_ids(tokenizer):
    assert tokenizer.pad_id == 0
    assert len({tokenizer.pad_id, tokenizer.start_id, tokenizer.end_id}) == 3
    assert tokenizer.vocab_size > 256  # every byte plus the learned merges


def test_round_trip(tokenizer):
    tokens = tokenizer(CAPTIONS, length=32)
    assert [tokenizer.decode(row) for row in tokens] == CAPTIONS


def test_normalises_case_and_handles_unseen_characters(tokenizer):
    (row,) = tokenizer(["A Small  RED Über-circle!"], length=32)
    assert tokenizer.decode(row) == "a small red über-circle!"


def test_layout_start_tokens_end_then_zero_padding(tokenizer):
    tokens = tokenizer(CAPTIONS, length=32)
    assert tokens.dtype == np.int32 and tokens.shape == (len(CAPTIONS), 32)
    assert (tokens[:, 0] == tokenizer.start_id).all()
    for row in tokens:
        (end,) = np.flatnonzero(row == tokenizer.end_id)
        assert (row[1:end] != 0).all()
        assert (row[end + 1 :] == 0).all()
    # Learned merges: a caption word is one token, so captions are far shorter than their bytes.
    assert (tokens[0] != 0).sum() == 2 + len(CAPTIONS[0].split())


def test_truncation_keeps_end_token(tokenizer):
    full = tokenizer(CAPTIONS[1:2], length=64)[0]
    num_content = int((full != 0).sum()) - 2
    for length in (2, 5, num_content + 1, num_content + 2):
        row = tokenizer(CAPTIONS[1:2], length=length)[0]
        assert row[-1] == tokenizer.end_id
        assert row[0] == tokenizer.start_id
        np.testing.assert_array_equal(row[1:-1], full[1 : length - 1])


def test_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        tokenizer(CAPTIONS, length=1)
    with pytest.raises(TypeError):
        tokenizer("a small red circle", length=8)


def test_save_load_gives_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(str(path))
    assert os.listdir(path.parent) == ["tokenizer.json"]  # no temporary file left behind
    loaded = Tokenizer.load(str(path))
    texts = CAPTIONS + ["something never seen in training, 123"]
    np.testing.assert_array_equal(loaded(texts, 16), tokenizer(texts, 16))
    assert (loaded.start_id, loaded.end_id, loaded.vocab_size) == (
        tokenizer.start_id,
        tokenizer.end_id,
        tokenizer.vocab_size,
    )


def test_load_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(path)
