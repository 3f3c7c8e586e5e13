"""Tests of the OpenAI CLIP BPE tokenizer: the algorithm on a tiny merges file, and id parity with OpenCLIP."""

import gzip
import pickle
import random
import sys
import unicodedata

import numpy as np
import pytest

from jclip.data import clip_tokenizer
from jclip.data.clip_tokenizer import ClipTokenizer, byte_to_unicode, find_vocab_file, read_merges
from open_clip_support import import_open_clip

# Rank order matters: "h e" before "l l" before "l o</w>"; "a a" tests left-to-right merging.
MERGES = ["h e", "l l", "l o</w>", "he ll", "hell o</w>", "a a", "' t</w>"]


@pytest.fixture(scope="module")
def merges_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(merges_path):
    return ClipTokenizer.load(merges_path)


def pieces(tokenizer, text):
    return [tokenizer.decoder[i] for i in tokenizer.encode(text)]


def test_byte_to_unicode_is_a_printable_bijection():
    table = byte_to_unicode()
    chars = list(table.values())
    assert sorted(table) == list(range(256)) and len(set(chars)) == 256
    assert not any(c.isspace() or unicodedata.category(c).startswith("C") for c in chars)
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))


def test_vocabulary_layout(tokenizer):
    # Bytes, bytes + "</w>", one id per merge in file order, then the two special tokens.
    assert tokenizer.vocab_size == 512 + len(MERGES) + 2
    assert (tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id) == (512 + len(MERGES), 513 + len(MERGES), 0)
    assert tokenizer.encoder["!"] == 0 and tokenizer.encoder["a"] == 64 and tokenizer.encoder["a</w>"] == 320
    assert tokenizer.encoder["he"] == 512 and tokenizer.encoder["hello</w>"] == 516


def test_bpe_merges_by_rank_with_end_of_word_marker(tokenizer):
    assert pieces(tokenizer, "hello") == ["hello</w>"]
    assert pieces(tokenizer, "llo") == ["ll", "o</w>"]  # "l l" outranks "l o</w>"
    assert pieces(tokenizer, "lo") == ["lo</w>"]
    assert pieces(tokenizer, "he") == ["h", "e</w>"]  # no rule for "h e</w>": word end is part of the symbol
    assert pieces(tokenizer, "aaa") == ["aa", "a</w>"]
    assert pieces(tokenizer, "aaaa") == ["aa", "a", "a</w>"]  # non-overlapping, left to right


def test_pre_tokenisation_splits_letters_digits_punctuation_and_contractions(tokenizer):
    (row,) = tokenizer(["Don't   stop42...!! naïve"])
    assert tokenizer.decode(row) == "don 't stop 4 2 ...!! naïve"
    assert pieces(tokenizer, "n't") == ["n</w>", "'t</w>"]


def test_cleaning_lower_cases_unescapes_html_and_repairs_text(tokenizer):
    expected = tokenizer.encode("hello & hello 's")
    assert tokenizer.encode("  HELLO\t&amp;amp;\n Hello’s ") == expected  # ftfy straightens the quote
    assert tokenizer.encode("helloâ€™s") == tokenizer.encode("hello's")  # mojibake repaired
    assert tokenizer.encode("") == []


def test_non_ascii_text_is_encoded_byte_by_byte(tokenizer):
    emoji = "🐱"
    assert len(tokenizer.encode(emoji)) == len(emoji.encode("utf-8"))
    (row,) = tokenizer([f"café {emoji} ΣΊΣΥΦΟΣ"])
    assert tokenizer.decode(row) == f"café {emoji} σίσυφος"


def test_layout_start_tokens_end_then_zero_padding(tokenizer):
    texts = ["hello", "", "a lo"]
    tokens = tokenizer(texts, length=8)
    assert tokens.dtype == np.int32 and tokens.shape == (3, 8)
    e, s = tokenizer.end_id, tokenizer.start_id
    np.testing.assert_array_equal(tokens[0], [s, 516, e, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tokens[1], [s, e, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tokens[2], [s, 320, 514, e, 0, 0, 0, 0])
    assert tokenizer(texts).shape == (3, 77)  # OpenAI's context length by default


def test_truncation_keeps_end_token(tokenizer):
    text = " ".join(["hello"] * 100)
    full = tokenizer([text], length=128)[0]
    assert full[101] == tokenizer.end_id
    for length in (2, 3, 77, 101, 102):
        row = tokenizer([text], length=length)[0]
        assert row[0] == tokenizer.start_id and row[-1] == tokenizer.end_id
        np.testing.assert_array_equal(row[1:-1], full[1 : length - 1])


def test_written_special_tokens_are_special_as_in_openclip(tokenizer):
    assert tokenizer.encode("<END_of_text> hello") == [tokenizer.end_id, 516]


def test_pickled_copy_gives_identical_ids(tokenizer):
    # Input pipelines ship the tokenizer to worker processes.
    texts = ["hello hello aaa", "Don't stop!"]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer))(texts), tokenizer(texts))


def test_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="length"):
        tokenizer(["hello"], length=1)
    with pytest.raises(TypeError):
        tokenizer("hello", length=8)


def test_read_merges_rejects_malformed_lines(tmp_path):
    path = tmp_path / "merges.txt"
    path.write_text("#version: 0.2\nh e\nhel\n")
    with pytest.raises(ValueError, match="merges.txt:3"):
        read_merges(str(path))


def test_find_vocab_file_explicit_then_open_clip_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no CLIP BPE merges file"):
        find_vocab_file(str(tmp_path / "missing.txt.gz"))
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pass its path, or install"):
        find_vocab_file()
    monkeypatch.undo()

    package = tmp_path / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported to find the vocab')\n")
    (package / clip_tokenizer.VOCAB_FILE_NAME).write_bytes(b"")
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_vocab_file() == str(package / clip_tokenizer.VOCAB_FILE_NAME)


@pytest.fixture(scope="module")
def openai_tokenizer():
    try:
        return ClipTokenizer.load()
    except FileNotFoundError:
        pytest.skip("the OpenAI merges file ships with open_clip, which is not installed")


def test_openai_vocabulary_special_ids(openai_tokenizer):
    tokenizer = openai_tokenizer
    assert (tokenizer.vocab_size, tokenizer.start_id, tokenizer.end_id) == (49408, 49406, 49407)
    (row,) = tokenizer(["a photo of a cat."])
    np.testing.assert_array_equal(row[:8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])


PARITY_TEXTS = [
    "a photo of a cat.",
    "A Photo Of A DOG!!! What's up? I'm fine, you'll see; they'd've...",
    "naïve café — résumé, Ünïcödé, ΣΊΣΥΦΟΣ, 日本語のテキスト, 한국어, مرحبا",
    "emoji 🐱🐶👍🏽 😂😂 🏳️‍🌈 and !😁",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; AT&amp;T &quot;quoted&quot; &#39;x&#39;",
    "  multiple   spaces\n\tnew\u00a0lines \u2028 and tabs  ",
    "",
    "It’s “curly” quotes … ﬁne ligature, Ｆｕｌｌｗｉｄｔｈ １２３, doesnâ€™t",
    "2023-01-01 12:34 $100.00 50% x² ½ Ⅻ #hashtag @user http://example.com/a?b=c",
    "<start_of_text> written <END_OF_TEXT> special <<start_of_text>>",
    "x" * 300,
    " ".join(f"word{i}" for i in range(120)),
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings of ASCII, Latin, Greek, kana, combining marks, odd spaces and emoji, to probe every rule."""
    ranges = [(32, 0x250), (0x370, 0x3FF), (0x3040, 0x30FF), (0x1F300, 0x1F64F), (0x2000, 0x200D), (0x300, 0x310)]
    alphabet = [chr(c) for start, stop in ranges for c in range(start, stop)]
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(count)]


def test_token_ids_equal_openclip(openai_tokenizer):
    _, open_clip = import_open_clip()
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = PARITY_TEXTS + random_texts(500)
    expected = reference(texts).numpy()
    np.testing.assert_array_equal(openai_tokenizer(texts), expected)
    short = reference(texts, context_length=16).numpy()
    np.testing.assert_array_equal(openai_tokenizer(texts, length=16), short)
    assert (expected[len(PARITY_TEXTS) - 2 : len(PARITY_TEXTS), -1] == openai_tokenizer.end_id).all()  # truncated
