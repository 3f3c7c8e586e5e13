"""Input sources and the resumable pipeline, on data the tests make themselves."""

import io
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import CORRUPT, EMPTY_CAPTION, NUM_EXAMPLES, example, png
from jclip import parallel
from jclip.data import in_memory, pipeline, preprocess, prompts
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.sources import build_source, csv_source, tar_source, tfds_source


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tar")
    for shard in range(3):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as archive:
            for i in range(shard, NUM_EXAMPLES, 3):
                for suffix, payload in zip((".png", ".txt"), example(i)):
                    info = tarfile.TarInfo(f"{i:06d}{suffix}")
                    data = payload if isinstance(payload, bytes) else payload.encode()
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(root / "*.tar")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([f"picture number {i}" for i in range(NUM_EXAMPLES)] + ["a file that does not exist"], 400)


def first_captions(source):
    return [c[0].decode() for c in source.examples.map(lambda ex: ex["captions"]).as_numpy_iterator()]


def test_csv_and_tar_sources_read_every_example(csv_file, tar_shards):
    assert csv_source(csv_file, caption_column="title").num_examples == NUM_EXAMPLES + 1
    tar = tar_source(tar_shards)
    assert tar.num_examples == NUM_EXAMPLES
    assert sorted(first_captions(tar)) == sorted(example(i)[1] for i in range(NUM_EXAMPLES))


def test_two_processes_split_an_epoch_without_overlap(csv_file, tar_shards):
    for build in (lambda p, n: csv_source(csv_file, caption_column="title", process_index=p, process_count=n),
                  lambda p, n: tar_source(tar_shards, process_index=p, process_count=n)):
        halves = [first_captions(build(p, 2)) for p in (0, 1)]
        assert len(halves[0]) >= 8 and len(halves[1]) >= 8  # tar: whole shards per process (2 + 1 of 3)
        assert sorted(halves[0] + halves[1]) == sorted(first_captions(build(0, 1)))  # each example exactly once


SEED, SHUFFLE_BUFFER = 5, 100  # of the streams `read` makes


def read(sources, tokenizer, start=0, batches=3, batch_size=8, spec="decode|resize(8)|value_range(-1, 1)"):
    mesh = parallel.make_mesh()
    stream = pipeline.TrainInput(sources, tokenizer, mesh, batch_size=batch_size, text_length=16, seed=SEED,
                                 shuffle_buffer=SHUFFLE_BUFFER, image_preprocess=spec, start_position=start)
    finish = preprocess.batch_op(spec)  # what the train step applies on the devices
    out = []
    for _ in range(batches):
        batch = {k: np.asarray(v) for k, v in next(stream).items()}
        assert batch["image"].dtype == preprocess.batch_image_dtype(spec)
        out.append({**batch, "image": finish(batch["image"])})
    stream.close()
    return out, stream


def test_corrupt_images_and_missing_captions_are_skipped_and_counted(csv_file, tokenizer):
    """Batches hold the readable examples of the raw stream in its order, each image its caption's picture,
    and `skipped` counts the others drawn before them."""
    source = csv_source(csv_file, caption_column="title")
    batches, stream = read([(source, 1.0)], tokenizer, batches=5)  # 40 examples: more than an epoch of 25 rows
    unreadable = {f"{i}.png" for i in CORRUPT | EMPTY_CAPTION} | {"missing.png"}
    raw = pipeline.mixed_stream([(source, 1.0)], SEED, SHUFFLE_BUFFER, start=0).as_numpy_iterator()
    readable, skipped = [], 0
    while len(readable) < 40:
        name = os.path.basename(next(raw)["image_path"].decode())
        if name in unreadable:
            skipped += 1
        else:
            readable.append(int(name.removesuffix(".png")))
    numbers = [int(tokenizer.decode(t).split()[-1]) for b in batches for t in b["tokens"]]
    assert numbers == readable
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (40, 8, 8, 3) and images.dtype == np.float32
    for image, number in zip(images, numbers):
        np.testing.assert_allclose(image, 20 * number / 255 - 1, atol=1e-6)  # png(10 * number) in [-1, 1]
    assert stream.skipped == skipped and stream.position == 40 + skipped


def test_tokens_match_the_tokenizer_and_images_match_their_captions(tar_shards, tokenizer):
    batches, _ = read([(tar_source(tar_shards), 1.0)], tokenizer, batches=2, spec="decode|value_range(0, 1)")
    for batch in batches:
        for image, tokens in zip(batch["image"], batch["tokens"]):
            number = int(tokenizer.decode(tokens).split()[-1])
            np.testing.assert_array_equal(tokens, tokenizer([f"picture number {number}"], 16)[0])
            np.testing.assert_allclose(image, 10 * number / 255.0, atol=1e-6)


def test_resume_continues_with_the_next_batch_exactly(csv_file, tar_shards, tokenizer):
    sources = [(csv_source(csv_file, caption_column="title"), 1.0), (tar_source(tar_shards), 3.0)]
    spec = "decode|inception_crop(8, 0.5)|flip_lr|value_range(-1, 1)"
    straight, _ = read(sources, tokenizer, batches=6, spec=spec)
    first, stream = read(sources, tokenizer, batches=3, spec=spec)
    resumed, _ = read(sources, tokenizer, start=stream.position, batches=3, spec=spec)
    for a, b in zip(straight, first + resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["image"], b["image"])
    with pipeline.TrainInput(sources, tokenizer, parallel.make_mesh(), batch_size=8, text_length=16, seed=6,
                             shuffle_buffer=100, image_preprocess=spec) as other_seed:
        assert not np.array_equal(np.asarray(next(other_seed)["tokens"]), straight[0]["tokens"])


def test_a_resumed_tar_stream_reads_only_what_it_draws(tmp_path, tokenizer, monkeypatch):
    """A tar source is drawn by sample numbers and read after: resuming at draw 3,000 of an epoch of 4,000 reads
    about a shuffle buffer's worth of samples, not the 3,000 before it. The samples are where they were."""
    image, path = png(0, 8, 8), tmp_path / "00000.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(4000):
            for suffix, data in ((".png", image), (".txt", f"picture number {i % NUM_EXAMPLES}".encode())):
                info = tarfile.TarInfo(f"{i:06d}{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    source = tar_source(str(path))
    reads, sample = [], type(source.read).sample
    monkeypatch.setattr(type(source.read), "sample", lambda self, k: reads.append(k) or sample(self, k))
    batches, _ = read([(source, 1.0)], tokenizer, start=3000, batches=1)
    assert 0 < len(reads) < 3 * SHUFFLE_BUFFER
    drawn = in_memory.table_rows([4000], [1.0], SEED, SHUFFLE_BUFFER, 3000).take(8).as_numpy_iterator()
    assert [tokenizer.decode(t) for t in batches[0]["tokens"]] == [f"picture number {k % NUM_EXAMPLES}" for k in drawn]


def test_mixture_follows_the_weights(csv_file, tar_shards):
    """Weights 1 : 3 draw a quarter of the examples from the CSV source, whose examples name an image file."""
    sources = [(csv_source(csv_file, caption_column="title"), 1.0), (tar_source(tar_shards), 3.0)]
    draws = 2000
    paths = pipeline.mixed_stream(sources, seed=0, shuffle_buffer=100, start=0).take(draws).map(
        lambda example: example["image_path"])
    from_csv = sum(path != b"" for path in paths.as_numpy_iterator())
    # 4 binomial standard errors, sqrt(0.25 * 0.75 / 2000) = 0.0097; equal weights would be 26 of them away.
    assert abs(from_csv / draws - 0.25) < 4 * np.sqrt(0.25 * 0.75 / draws)


def test_preprocessing_spec_errors_name_the_op():
    with pytest.raises(ValueError, match=r"unknown preprocessing op 'blur\(3\)'"):
        preprocess.parse("decode|blur(3)")
    with pytest.raises(ValueError, match="bad arguments for preprocessing op 'resize"):
        preprocess.parse("decode|resize(8, 8, 8)")


def test_resizes_and_crops_follow_torchvision():
    """`resize_small` makes the longer side int(size * long / short) and `center_crop` rounds its offsets half to
    even, as torchvision's Resize and CenterCrop (OpenCLIP's evaluation transform); `"bicubic"` is PIL's resize."""
    rng = np.random.default_rng(0)
    for height, width in ((300, 451), (227, 301), (100, 333), (64, 64), (65, 48)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        short, long = sorted((height, width))
        resized_long = int(64 * long / short)
        want_size = (64, resized_long) if height <= width else (resized_long, 64)
        for method in ("bilinear", "bicubic"):
            resized = preprocess.parse(f"resize_small(64, {method!r})")(tf.constant(image), None).numpy()
            assert resized.shape[:2] == want_size, (height, width, method)
        pil = np.asarray(Image.fromarray(image).resize(want_size[::-1], Image.BICUBIC))
        np.testing.assert_array_equal(preprocess.parse("resize_small(64, 'bicubic')")(tf.constant(image), None), pil)
        top, left = (int(round((size - 48) / 2.0)) for size in want_size)
        cropped = preprocess.parse("resize_small(64, 'bicubic')|center_crop(48)")(tf.constant(image), None)
        np.testing.assert_array_equal(cropped, pil[top:top + 48, left:left + 48])
    with pytest.raises(ValueError, match="resize method 'nearest'"):
        preprocess.parse("resize_small(64, 'nearest')")
    with pytest.raises(ValueError, match="takes uint8 images"):
        preprocess.parse("value_range(0, 1)|resize(8, 'bicubic')")(tf.zeros([4, 4, 3], tf.uint8), None)


def test_evaluation_preprocessing_follows_the_training_value_range():
    assert (preprocess.evaluation_spec(224, "decode|inception_crop(224, 0.9, 1.0)|flip_lr|clip_normalize")
            == "decode|resize_small(224)|center_crop(224)|clip_normalize")
    assert (preprocess.evaluation_spec(64, "decode|value_range(-1, 1)")
            == "decode|resize_small(64)|center_crop(64)|value_range(-1, 1)")
    assert preprocess.evaluation_spec(32, "decode|resize_small(40)|center_crop(32)") == (
        "decode|resize_small(32)|center_crop(32)")
    assert (preprocess.evaluation_spec(224, "decode|resize(224)|value_range(-1, 1)")  # big_vision's SigLIP squash
            == "decode|resize(224)|value_range(-1, 1)")


def test_preprocessing_stages_give_the_images_of_the_whole_spec():
    images = [tf.constant(png(value, 10 + value // 40, 14 + value // 40)) for value in (0, 60, 200)]
    seeds = [tf.constant([3, i], tf.int64) for i in range(len(images))]
    for spec, names in (("decode|resize(8)|value_range(-1, 1)", (["decode", "resize"], [], ["value_range"])),
                        ("decode|inception_crop(8, 0.5)|flip_lr|clip_normalize",
                         (["decode"], ["inception_crop", "flip_lr"], ["clip_normalize"])),
                        ("decode|center_crop(8)|flip_lr|resize(6)",
                         (["decode", "center_crop"], ["flip_lr", "resize"], [])),
                        ("decode|value_range(0, 1)|resize(8)", (["decode"], ["value_range", "resize"], []))):
        stages = preprocess.stages(spec)
        assert [[name for name, _ in ops] for ops in stages] == list(names)
        once, per_image, per_batch = map(preprocess.compose, stages)
        kept = [once(image, seed) for image, seed in zip(images, seeds)]
        assert all(k.dtype == tf.uint8 for k in kept)  # what an ExampleTable stores
        prepared = [per_image(k, seed) for k, seed in zip(kept, seeds)]
        expected = np.stack([preprocess.parse(spec)(image, seed) for image, seed in zip(images, seeds)])
        np.testing.assert_array_equal(per_batch(tf.stack(prepared), None), expected)
        np.testing.assert_array_equal(preprocess.batch_op(spec)(np.stack(prepared)), expected)  # NumPy
        on_device = jax.jit(preprocess.batch_op(spec))(jnp.asarray(np.stack(prepared)))  # in the train step
        np.testing.assert_allclose(on_device, expected, rtol=1e-6, atol=1e-6)
        assert on_device.dtype == expected.dtype


def test_a_small_tfds_source_is_read_from_its_files_once(shapes_data_dir, tmp_path):
    import glob
    import shutil

    from jclip.data.sources import shapes_source

    data_dir = shutil.copytree(shapes_data_dir, tmp_path / "datasets")
    source = shapes_source("tiny", split="validation", data_dir=str(data_dir))
    assert source.fits_in_memory
    stream = pipeline.mixed_stream([(source, 1.0)], seed=0, shuffle_buffer=10_000, start=0).as_numpy_iterator()
    first_epoch = [next(stream)["captions"].tolist() for _ in range(source.num_examples)]
    for path in glob.glob(str(data_dir / "**" / "*.tfrecord*"), recursive=True):
        os.remove(path)
    second_epoch = [next(stream)["captions"].tolist() for _ in range(source.num_examples)]  # from memory
    assert sorted(second_epoch) == sorted(first_epoch) and second_epoch != first_epoch  # reshuffled


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no tar shards match"):
        tar_source(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="no CSV file at"):
        csv_source(str(tmp_path / "nothing.csv"))
    with pytest.raises(ValueError, match="unknown source kind 'parquet'"):
        build_source({"kind": "parquet"})
    with pytest.raises(ValueError, match="is not prepared"):
        tfds_source("mnist", data_dir=str(tmp_path))


def coco_like_examples(*args, **kwargs):
    """Examples shaped like tfds's coco_captions: an encoded image and several captions."""
    def generate():
        for i in range(20):
            yield {"image": png(10 * i), "captions": {"text": [f"picture number {i}", f"number {i} picture"]}}
    signature = {"image": tf.TensorSpec([], tf.string), "captions": {"text": tf.TensorSpec([None], tf.string)}}
    return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
        tf.data.experimental.assert_cardinality(20))


def test_tfds_source_with_several_captions_samples_one_per_visit(tokenizer):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20, as_dataset_fn=coco_like_examples):
        source = tfds_source("coco_captions", split="train", caption_key="captions/text")
        batches, _ = read([(source, 1.0)], tokenizer, batches=5, batch_size=8)  # two epochs
    assert source.num_examples == 20
    captions = [tokenizer.decode(t) for b in batches for t in b["tokens"]]
    assert {c for c in captions if c.startswith("picture")} and {c for c in captions if c.startswith("number")}


def test_classification_source_on_mock_imagenet():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        source = tfds_source("imagenet2012", split="train", caption_key=None, label_key="label", templates="simple",
                             class_names="imagenet")
        captions = [c.decode() for c in source.examples.map(lambda ex: ex["captions"]).unbatch().as_numpy_iterator()]
    assert source.num_examples == 20 and len(captions) == 20 * 7
    names = prompts.imagenet_class_names()
    filled = {template.format(name) for template in prompts.templates("simple") for name in names}
    assert set(captions) <= filled


def test_converted_arrayrecord_dataset_reads_like_the_csv(csv_file, tmp_path, tokenizer):
    from jclip.data.to_tfds import convert

    directory = convert(csv_source(csv_file, caption_column="title"), "my_pairs", str(tmp_path))
    assert any(f.endswith(".array_record-00000-of-00001") or "array_record" in f for f in os.listdir(directory))
    converted = tfds_source(directory, caption_key="captions")
    assert converted.num_examples == NUM_EXAMPLES + 1
    assert sorted(first_captions(converted)) == sorted(first_captions(csv_source(csv_file, caption_column="title")))
    batches, stream = read([(converted, 1.0)], tokenizer, batches=2)
    # Small: decoded once into memory, without the 2 corrupt images, the empty caption and the missing file.
    assert stream.left_out == 4 and stream.skipped == 0
    assert all(tokenizer.decode(t).startswith("picture") for b in batches for t in b["tokens"])


def test_hard_negatives_perturb_order_and_binding():
    from jclip.data.negatives import hard_negatives

    caption = "a small red circle to the left of a large blue square"
    swapped, words, trigrams = hard_negatives(caption, ("swap_attributes", "swap_words", "shuffle_trigrams"),
                                              seed=0, index=3, attributes=(("red", "blue"), ("small", "large")))
    assert swapped in (
        "a small blue circle to the left of a large red square", "a large red circle to the left of a small blue square")
    assert sorted(words.split()) == sorted(caption.split()) and words != caption
    assert sorted(trigrams.split()) == sorted(caption.split()) and trigrams != caption
    assert hard_negatives(caption, ("swap_words",), seed=0, index=3) == hard_negatives(caption, ("swap_words",), seed=0, index=3)
    assert hard_negatives("a dog", ("swap_attributes",), seed=0, index=0, attributes=(("red", "blue"),)) == ["dog a"]
    with pytest.raises(ValueError, match="unknown hard-negative kind"):
        hard_negatives(caption, ("antonyms",), seed=0, index=0)


def test_batches_carry_hard_negative_tokens(tar_shards, tokenizer):
    with pipeline.TrainInput([(tar_source(tar_shards), 1.0)], tokenizer, parallel.make_mesh(), batch_size=8,
                             text_length=16, seed=0, shuffle_buffer=100, image_preprocess="decode|resize(8)",
                             negative_kinds=("swap_words", "shuffle_trigrams")) as stream:
        batch = {k: np.asarray(v) for k, v in next(stream).items()}
    assert batch["negative_tokens"].shape == (8, 2, 16)
    for tokens, negatives in zip(batch["tokens"], batch["negative_tokens"]):
        caption = tokenizer.decode(tokens)
        for negative in negatives:
            assert sorted(tokenizer.decode(negative).split()) == sorted(caption.split())
            assert tokenizer.decode(negative) != caption


def test_unknown_tokenizer_name_is_a_clear_error():
    from jclip.data.tokenizers import load_tokenizer

    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        load_tokenizer("gpt2")
