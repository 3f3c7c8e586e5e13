"""Tests of the `shapes` dataset: determinism, held-out discipline, captions vs labels vs pixels."""

import itertools
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jclip.data import shapes
from jclip.data.bpe_tokenizer import Tokenizer

TINY_SIZES = {"train": 512, "validation": 128, "test": 256}


def _read(data_dir: str) -> dict[str, list[dict]]:
    return {
        split: list(tfds.as_numpy(tfds.load("shapes/tiny", split=split, data_dir=data_dir)))
        for split in shapes.SPLITS
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shapes"))
    shapes.prepare("tiny", path)
    return path


@pytest.fixture(scope="module")
def splits(data_dir):
    return _read(data_dir)


def _objects(example: dict) -> list[tuple[str, str, str]]:
    """(shape, colour, size) names of the objects of a decoded example."""
    suffixes = ("",) if example["num_objects"] == 1 else ("", "2")
    return [
        (
            shapes.SHAPES[example["shape" + suffix]],
            shapes.COLOURS[example["colour" + suffix]],
            shapes.SIZES[example["size" + suffix]],
        )
        for suffix in suffixes
    ]


def test_tfds_load_reads_every_split(splits):
    for split, examples in splits.items():
        assert len(examples) == TINY_SIZES[split]
        image = examples[0]["image"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_build_is_deterministic(splits, tmp_path_factory):
    other_dir = str(tmp_path_factory.mktemp("again"))
    shapes.prepare("tiny", other_dir)
    again = _read(other_dir)
    for split in shapes.SPLITS:
        for a, b in zip(splits[split], again[split], strict=True):
            assert a["caption"] == b["caption"]
            np.testing.assert_array_equal(a["image"], b["image"])


def test_held_out_combinations_never_in_train_or_validation(splits):
    for split in ("train", "validation"):
        for example in splits[split]:
            assert not example["held_out"]
            for shape, colour, _ in _objects(example):
                assert (shape, colour) not in shapes.HELD_OUT, (split, example["caption"])


def test_held_out_combinations_occur_in_test(splits):
    objects = [obj for example in splits["test"] for obj in _objects(example)]
    held_out = [obj for obj in objects if obj[:2] in shapes.HELD_OUT]
    assert 0.07 < len(held_out) / len(objects) < 0.25  # 1/7 expected
    assert {obj[:2] for obj in held_out} == shapes.HELD_OUT
    for example in splits["test"]:
        assert example["held_out"] == any(obj[:2] in shapes.HELD_OUT for obj in _objects(example))


def test_held_out_set_keeps_every_shape_and_colour_in_train():
    assert len(shapes.HELD_OUT) == 5
    assert {shape for shape, _ in shapes.HELD_OUT} == set(shapes.SHAPES)
    assert len({colour for _, colour in shapes.HELD_OUT}) == 5


def test_captions_agree_with_labels(splits):
    phrases = dict(zip(shapes.RELATIONS, ("to the left of", "to the right of", "above", "below")))
    counts = {1: 0, 2: 0}
    for example in itertools.chain(*splits.values()):
        described = [f"a {size} {colour} {shape}" for shape, colour, size in _objects(example)]
        counts[int(example["num_objects"])] += 1
        if example["num_objects"] == 1:
            assert example["relation"] == 0
            assert (example["shape2"], example["colour2"], example["size2"]) == (5, 7, 2)  # "none"
            expected = described[0]
        else:
            relation = shapes.RELATIONS[example["relation"] - 1]
            expected = f"{described[0]} {phrases[relation]} {described[1]}"
        assert example["caption"].decode() == expected
    assert 0.4 < counts[1] / (counts[1] + counts[2]) < 0.6


def _palette_colour(pixels: np.ndarray) -> int:
    """Index of the palette colour nearest to the mean of the object's saturated pixels."""
    mean = pixels[pixels.max(-1) > 150].mean(0)
    return int(np.argmin(((shapes.COLOUR_RGB - mean) ** 2).sum(-1)))


def test_pixels_agree_with_labels(splits):
    """Object colour, size and side of the image as the caption says, read back from the PNGs."""
    for example in splits["train"][:200]:
        image = example["image"].astype(np.int32)
        if example["num_objects"] == 1:
            assert _palette_colour(image) == example["colour"]
            rows, cols = np.nonzero(image.max(-1) > 100)
            extent = max(np.ptp(rows), np.ptp(cols)) + 1
            assert (extent <= 21) if example["size"] == 0 else (extent >= 23), example["caption"]
        else:
            relation = shapes.RELATIONS[example["relation"] - 1]
            horizontal = relation in ("left of", "right of")
            halves = (image[:, :32], image[:, 32:]) if horizontal else (image[:32], image[32:])
            first, second = halves if relation in ("left of", "above") else halves[::-1]
            assert _palette_colour(first) == example["colour"], example["caption"]
            assert _palette_colour(second) == example["colour2"], example["caption"]


def test_each_shape_has_its_own_silhouette():
    for diameter in (16, 30):
        masks = {s: np.asarray(shapes.shape_mask(s, diameter)) / 255 for s in shapes.SHAPES}
        coverage = {shape: mask.mean() for shape, mask in masks.items()}
        assert coverage["square"] > 0.95
        assert abs(coverage["circle"] - np.pi / 4) < 0.05
        assert coverage["star"] < coverage["triangle"] < coverage["cross"] < coverage["circle"]
        for a, b in itertools.combinations(shapes.SHAPES, 2):
            assert np.abs(masks[a] - masks[b]).mean() > 0.1, (a, b, diameter)


def test_prepare_is_idempotent_and_writes_tokenizer(data_dir, capsys):
    builder = shapes.prepare("tiny", data_dir)
    path = shapes.tokenizer_path(builder)
    modified = os.path.getmtime(path)
    start = time.perf_counter()
    again = shapes.prepare("tiny", data_dir)
    assert time.perf_counter() - start < 1.0
    assert capsys.readouterr().out == ""  # nothing built, nothing announced
    assert again.data_dir == builder.data_dir and os.path.getmtime(path) == modified

    tokenizer = Tokenizer.load(path)
    caption = "a large purple star to the right of a small white cross"
    tokens = tokenizer([caption], length=16)[0]
    assert tokenizer.decode(tokens) == caption
    assert (tokens != 0).sum() == 2 + len(caption.split())  # every caption word is one token


def test_attribute_prompts_cover_every_single_object_description():
    prompts = shapes.attribute_prompts()
    assert len(prompts) == 70 == len({p["prompt"] for p in prompts})
    for p in prompts:
        size, colour = shapes.SIZES[p["size"]], shapes.COLOURS[p["colour"]]
        assert p["prompt"] == f"a {size} {colour} {shapes.SHAPES[p['shape']]}"
