"""Damaged training data: each bad example is skipped (or left out) and counted, the first few named in warnings;
a file that cannot be used at all, or a source with no usable example, is one clear error before training."""

import gzip
import io
import json
import queue
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf

from helpers import png
from jclip import parallel
from jclip.data import pipeline
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.sources import Source, csv_source, tar_source

SEED, SHUFFLE_BUFFER = 3, 50


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([f"picture number {i}" for i in range(20)], 300)


def write_tar(path, members) -> str:
    """A tar file of (name, bytes) members, in order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def good_sample(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:03d}.png", png(10 * i, 8, 8)), (f"{i:03d}.txt", f"picture number {i}".encode())]


def captions(source) -> list[str]:
    return [c[0].decode() for c in source.examples.map(lambda ex: ex["captions"]).as_numpy_iterator()]


def train_input(sources, tokenizer):
    return pipeline.TrainInput(sources, tokenizer, parallel.make_mesh(), batch_size=8, text_length=16, seed=SEED,
                               shuffle_buffer=SHUFFLE_BUFFER, image_preprocess="decode|resize(8)")


def bad_draws(sources, draws: int, bad) -> int:
    """How many of the first `draws` raw examples of the stream are `bad`."""
    raw = pipeline.mixed_stream(sources, SEED, SHUFFLE_BUFFER, start=0).take(draws).as_numpy_iterator()
    return sum(bool(bad(example)) for example in raw)


def within(seconds: float, function):
    """`function()`, failing the test if it has not returned or raised after `seconds` (it is left running)."""
    outcome = queue.Queue()

    def attempt():
        try:
            outcome.put((True, function()))
        except Exception as error:  # handed to the test's thread
            outcome.put((False, error))
    threading.Thread(target=attempt, daemon=True).start()
    try:
        returned, value = outcome.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"still running after {seconds} s")
    if not returned:
        raise value
    return value


def test_a_truncated_tar_shard_gives_its_samples_before_the_cut(tmp_path, capsys):
    whole = write_tar(tmp_path / "whole.tar", [m for i in range(6) for m in good_sample(i)])
    with tarfile.open(whole) as archive:
        cut = archive.getmember("003.png").offset_data + 10  # a partial download: inside sample 3's image
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "00000.tar").write_bytes(data[:cut])
    source = tar_source(str(tmp_path / "cut" / "*.tar"))
    assert source.num_examples == 3
    assert captions(source) == ["picture number 0", "picture number 1", "picture number 2"]
    assert f"tar shard {tmp_path / 'cut' / '00000.tar'} is cut short after 3 sample(s)" in capsys.readouterr().out
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "00000.tar").write_bytes(data[:100])  # not even one whole header
    with pytest.raises(ValueError, match=r"stub/00000.tar cannot be opened as a tar file .*Download it again"):
        tar_source(str(tmp_path / "stub" / "*.tar"))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar").write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match=r"gz/00000.tar is compressed: .* decompress it"):
        tar_source(str(tmp_path / "gz" / "*.tar"))


def test_tar_shard_sizes_come_from_sizes_json_or_stats_and_a_wrong_one_is_skipped_with_a_warning(tmp_path, capsys):
    """Shards whose sizes the dataset states (img2dataset's _stats.json, OpenCLIP's sizes.json) are not read at
    the start; a stated size larger than the shard gives empty samples (skipped and counted) and a warning."""
    write_tar(tmp_path / "a.tar", [m for i in range(6) for m in good_sample(i)])
    write_tar(tmp_path / "b.tar", [m for i in range(6, 11) for m in good_sample(i)])
    (tmp_path / "a_stats.json").write_text(json.dumps({"successes": 6, "failed_to_download": 3}))
    (tmp_path / "sizes.json").write_text(json.dumps({"b.tar": 7}))
    source = tar_source(str(tmp_path / "*.tar"))
    assert source.num_examples == 13 and not source.read.indices  # no shard indexed yet
    assert captions(source) == [f"picture number {i}" for i in range(11)] + ["", ""]
    assert f"tar shard {tmp_path / 'b.tar'} holds 5 samples, not the 7" in capsys.readouterr().out
    assert source.describe(7) == f"{tmp_path / 'b.tar'} sample '007'"


def test_tar_samples_without_a_decodable_image_are_skipped_counted_and_named(tmp_path, tokenizer, capsys):
    shard = write_tar(tmp_path / "00000.tar", [m for i in range(10) for m in good_sample(i)] + [
        ("text.jpg", b"an HTML error page"), ("text.txt", b"picture number 11"),
        ("caption_only.json", json.dumps({"caption": "picture number 12"}).encode())])
    sources = [(tar_source(str(tmp_path / "*.tar")), 1.0)]
    stream = train_input(sources, tokenizer)
    batches = [next(stream) for _ in range(3)]
    numbers = {int(tokenizer.decode(t).split()[-1]) for b in batches for t in np.asarray(b["tokens"])}
    assert numbers <= set(range(10))
    assert stream.skipped == bad_draws(sources, stream.position, lambda ex: not ex["image"].startswith(b"\x89PNG"))
    assert stream.skipped >= 2
    out = capsys.readouterr().out
    assert f"skipped {shard} sample 'text': its image cannot be read or decoded" in out
    assert f"skipped {shard} sample 'caption_only'" in out


def test_csv_rows_that_do_not_parse_are_left_out_and_a_quote_that_never_closes_is_an_error(tmp_path, capsys):
    rows = "".join(f"{i}.png,picture number {i}\n" for i in range(10))  # lines 2-11
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,caption\n" + rows + "10.png\n11.png,picture number 11,extra\n"
                    '12.png,"picture" number 12\n13.png,picture number 13\n')
    source = csv_source(str(path))
    assert source.num_examples == 11
    assert captions(source) == [f"picture number {i}" for i in [*range(10), 13]]
    warning = capsys.readouterr().out
    assert f"{path}: left out 3 row(s)" in warning
    assert "line 12 (1 fields for 2 columns), line 13 (3 fields for 2 columns), line 14 (" in warning
    runaway = tmp_path / "runaway.csv"
    runaway.write_text('filepath,caption\n0.png,picture number 0\n1.png,"picture number 1\n' + rows)
    with pytest.raises(ValueError, match=r"runaway.csv: the quoted field that starts on line 3 never closes"):
        csv_source(str(runaway))


def test_captions_that_are_not_utf8_are_read_with_replacement_characters(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"filepath,caption\n0.png,picture number 0\n1.png,caf\xe9 number 1\n2.png,picture number 2\n")
    assert captions(csv_source(str(path))) == ["picture number 0", "caf\ufffd number 1", "picture number 2"]
    assert f"{path}: the captions of 1 row(s) are not valid UTF-8 (at line(s) 3)" in capsys.readouterr().out
    write_tar(tmp_path / "00000.tar", [("0.png", png(0, 8, 8)), ("0.txt", b"caf\xe9 number 0"),
                                       ("1.png", png(10, 8, 8)), ("1.json", b'{"caption": "caf\xe9 number 1"}')])
    assert captions(tar_source(str(tmp_path / "*.tar"))) == ["caf\ufffd number 0", "caf\ufffd number 1"]


def test_an_image_path_that_is_a_directory_is_skipped_counted_and_named(tmp_path, tokenizer, capsys):
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(png(10 * i, 8, 8))
    (tmp_path / "folder.png").mkdir()
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,caption\n" + "".join(f"{i}.png,picture number {i}\n" for i in range(10))
                    + "folder.png,picture number 10\n")
    tar = write_tar(tmp_path / "00000.tar", [m for i in range(10, 16) for m in good_sample(i)])
    sources = [(csv_source(str(path)), 2.0), (tar_source(tar), 1.0)]  # named by where the mixture's draws are
    stream = train_input(sources, tokenizer)
    for _ in range(4):
        next(stream)
    assert stream.skipped == bad_draws(sources, stream.position, lambda ex: ex["image_path"].endswith(b"folder.png"))
    assert stream.skipped >= 2
    named = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert named == [f"warning: skipped {path} line 12: its image cannot be read or decoded, or it has no caption"]


def test_a_source_of_only_bad_examples_stops_with_an_error_naming_it(tmp_path, tokenizer):
    path = tmp_path / "missing_files.csv"
    path.write_text("filepath,caption\n" + "".join(f"{i}.png,picture number {i}\n" for i in range(6)))
    stream = train_input([(csv_source(str(path)), 1.0)], tokenizer)
    with pytest.raises(ValueError, match=r"12 draws in a row from the training source\(s\) 'missing_files.csv' gave "
                                         "no usable example"):
        within(30, lambda: next(stream))


def test_an_in_memory_source_of_only_bad_examples_is_an_error_naming_it(tokenizer):
    examples = tf.data.Dataset.from_tensor_slices({"image": [b"not an image"] * 3 + [png(0, 8, 8)],
                                                   "image_path": [""] * 4, "captions": [["picture"]] * 3 + [[" "]]})
    broken = Source("broken", examples, 4, fits_in_memory=True)
    with pytest.raises(ValueError, match=r"none of the 4 examples of source 'broken' has an image that can be read "
                                         r"and decoded and a caption \(broken example 0, .*broken example 3\)"):
        train_input([(broken, 1.0)], tokenizer)


def test_converting_a_csv_with_a_directory_as_image_path_keeps_it_as_an_empty_image(tmp_path):
    """`jclip.data.to_tfds.convert` writes the row with no image bytes (training skips it), instead of failing."""
    import tensorflow_datasets as tfds

    from jclip.data.to_tfds import convert

    (tmp_path / "0.png").write_bytes(png(10, 8, 8))
    (tmp_path / "folder.png").mkdir()
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,caption\n0.png,picture number 0\nfolder.png,picture number 1\n")
    directory = convert(csv_source(str(path)), "with_a_folder", str(tmp_path / "tfds"))
    rows = tfds.builder_from_directory(directory).as_data_source(split="train")
    assert sorted(len(rows[i]["image"]) > 0 for i in range(len(rows))) == [False, True]


def test_a_source_with_no_examples_is_an_error_naming_it_also_outside_the_trainer(tmp_path, tokenizer):
    empty = tar_source(write_tar(tmp_path / "00000.tar", []))
    with pytest.raises(ValueError, match=r"source\(s\) \['.*00000.tar'\] have no examples"):
        train_input([(empty, 1.0)], tokenizer)
