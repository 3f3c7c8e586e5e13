"""Small sources decoded once into an ExampleTable: the same batches as reading them per visit, exact resume."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import png
from jclip import parallel
from jclip.data import in_memory, pipeline
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.sources import Source


def small_source(name: str, numbers, captions_per_example: int = 1, corrupt=(), blank=(), sizes=None) -> Source:
    """An in-memory source of images filled with `number` and captions "picture number {number}"."""
    images = [b"not an image" if n in corrupt else png(n, *(sizes or {}).get(n, (10, 12))) for n in numbers]
    captions = [[" " if n in blank else f"picture number {n}" if c == 0 else f"number {n} picture"
                 for c in range(captions_per_example)] for n in numbers]
    examples = tf.data.Dataset.from_tensor_slices({"image": images, "image_path": [""] * len(images),
                                                   "captions": captions})
    return Source(name, examples, len(images), fits_in_memory=True)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([f"picture number {n} number {n} picture" for n in range(256)], 400)


def stream(sources, tokenizer, spec="decode|resize(8)|value_range(0, 1)", start=0, seed=5):
    return pipeline.TrainInput(sources, tokenizer, parallel.make_mesh(), batch_size=8, text_length=16, seed=seed,
                               shuffle_buffer=100, image_preprocess=spec, start_position=start)


def take(batches, count):
    return [{key: np.asarray(value) for key, value in next(batches).items()} for _ in range(count)]


def number(tokenizer, tokens) -> int:
    return next(int(word) for word in tokenizer.decode(tokens).split() if word.isdigit())


def test_table_batches_equal_the_per_visit_batches(tokenizer, monkeypatch):
    sources = [(small_source("a", range(0, 60, 3)), 1.0), (small_source("b", range(100, 190, 5)), 2.0)]
    from_table = stream(sources, tokenizer)
    assert isinstance(from_table._source, in_memory.TableBatches)
    monkeypatch.setattr(in_memory, "DECODED_IN_MEMORY_BYTES", 0)  # too big: read and decoded per visit
    per_visit = stream(sources, tokenizer)
    assert isinstance(per_visit._source, pipeline.PerVisitBatches)
    for a, b in zip(take(from_table, 12), take(per_visit, 12)):  # several epochs of both sources
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])  # one caption each: no sampling to differ
    assert from_table.position == per_visit.position == 96


def test_images_match_their_captions_and_bad_examples_are_left_out(tokenizer):
    source = small_source("s", range(0, 250, 10), corrupt={30, 70}, blank={120})
    batches = stream([(source, 1.0)], tokenizer)
    seen = set()
    for batch in take(batches, 9):  # three epochs of 22 rows
        for image, tokens in zip(batch["image"], batch["tokens"]):
            seen.add(number(tokenizer, tokens))
            np.testing.assert_array_equal(image, number(tokenizer, tokens))  # value_range(0, 1) is the step's
    assert seen == set(range(0, 250, 10)) - {30, 70, 120}
    assert batches.left_out == 3 and batches.skipped == 0 and batches.position == 72


@pytest.mark.parametrize("spec", ["decode|value_range(-1, 1)", "decode|inception_crop(8, 0.5)|flip_lr|clip_normalize"])
def test_table_batches_resume_exactly(tokenizer, spec):
    sources = [(small_source("a", range(40), captions_per_example=2), 1.0), (small_source("b", range(50, 80)), 3.0)]
    straight = take(stream(sources, tokenizer, spec), 6)
    first = stream(sources, tokenizer, spec)
    head = take(first, 3)
    tail = take(stream(sources, tokenizer, spec, start=first.position), 3)
    for a, b in zip(straight, head + tail):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    other_seed = take(stream(sources, tokenizer, spec, seed=6), 1)[0]
    assert not np.array_equal(other_seed["tokens"], straight[0]["tokens"])


def test_each_visit_samples_one_of_the_captions(tokenizer):
    batches = stream([(small_source("s", range(4), captions_per_example=2), 1.0)], tokenizer)
    captions = [tokenizer.decode(t) for batch in take(batches, 25) for t in batch["tokens"]]
    first = sum(c.startswith("picture") for c in captions)
    assert 0.4 < first / len(captions) < 0.6 and all(c.startswith(("picture", "number")) for c in captions)


def test_sources_that_do_not_fit_are_read_per_visit(monkeypatch):
    options = pipeline.input_options()
    decode = lambda image, seed: tf.io.decode_png(image, channels=3)
    assert in_memory.load_table([small_source("s", range(4))], decode, options).images.shape == (4, 10, 12, 3)
    varied = small_source("varied", range(4), sizes={2: (12, 12)})
    assert in_memory.load_table([varied], decode, options) is None  # images of different shapes
    assert in_memory.load_table([small_source("a", range(4)), small_source("b", range(4), sizes={0: (5, 5),
                                 1: (5, 5), 2: (5, 5), 3: (5, 5)})], decode, options) is None  # sources differ
    large = small_source("large", range(4))
    large.fits_in_memory = False
    assert in_memory.load_table([large], decode, options) is None
    monkeypatch.setattr(in_memory, "DECODED_IN_MEMORY_BYTES", 4 * 10 * 12 * 3 - 1)
    assert in_memory.load_table([small_source("s", range(4))], decode, options) is None


def test_caption_choice_is_uniform_and_a_function_of_seed_and_draw():
    draws = np.arange(30_000)
    picks = in_memory.caption_choice(0, draws, np.full(len(draws), 3))
    assert set(np.unique(picks)) == {0, 1, 2}
    assert np.abs(np.bincount(picks) / len(draws) - 1 / 3).max() < 0.01
    np.testing.assert_array_equal(picks, in_memory.caption_choice(0, draws, np.full(len(draws), 3)))
    assert (picks != in_memory.caption_choice(1, draws, np.full(len(draws), 3))).mean() > 0.6
    assert (in_memory.caption_choice(0, draws, np.ones(len(draws), np.int64)) == 0).all()
