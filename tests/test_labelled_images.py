"""Labelled images of one's own for `zero_shot` and `linear_probe`: a folder per class, a labelled CSV and shards
in CLIP_benchmark's WebDataset layout give what the same images as a tfds dataset give, on 1 and 8 devices and
in 2 processes; unreadable images are skipped and counted; bad input gives one line naming the problem."""

import csv
import io
import json
import os
import shutil
import tarfile
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from evaluation_tasks import micro_evaluator
from helpers import run_workers
from jclip import parallel
from jclip.data import prompts
from jclip.data.labelled_images import read_labelled_images
from jclip.evaluate.tasks import check_task_inputs, run_tasks

# Class folders (sorted: ImageFolder's order) and their files in the order read: each class's files sorted,
# a nested folder after the class's own files; upper-case extensions count, other files do not.
CLASSES = ("blue_square", "green", "red")
NAMES = ["blue square", "green", "red"]
FILES = {
    "blue_square": ["a.png", "b.PNG", "c.png", "d.png", "e.png", "f.png", "g.png"],
    "green": ["a.png", "b.png", "c.png", "d.png", "more/a.png", "more/b.png"],
    "red": ["a.png", "b.png", "c.jpeg", "d.png", "e.png", "f.png"],
}  # 19 images: batches of 8 do not divide them
SPLITS = {"test": 0, "train": 1}  # seeds of the two splits' pixels
BATCH = 8
CORRUPT = "red/bb.png"  # in the corrupt copy of the test split: between red/b.png and red/c.jpeg (process 1 of 2)


def _pixels(split: str) -> list[np.ndarray]:
    """One random colour per image (the random model tells those apart, unlike noise)."""
    rng = np.random.default_rng(SPLITS[split])
    return [np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(sum(map(len, FILES.values())))]


def _encoded(pixels: np.ndarray, extension: str) -> bytes:
    buffer = io.BytesIO()
    # JPEG at quality 100 with 4:4:4 is still lossy: the tfds copy stores these bytes, so both decode alike.
    Image.fromarray(pixels).save(buffer, "JPEG" if extension == ".jpeg" else "PNG", quality=100, subsampling=0)
    return buffer.getvalue()


def _rows():
    """(relative path, label) of every image of a split, in the order a folder dataset reads them."""
    return [(f"{name}/{file}", label) for label, name in enumerate(CLASSES) for file in FILES[name]]


def write_shard(path, samples):
    """A WebDataset tar of `samples`, each `{extension: bytes}` under the key s0000000, s0000001, ..."""
    with tarfile.open(path, "w") as archive:
        for index, sample in enumerate(samples):
            for extension, content in sample.items():
                member = tarfile.TarInfo(f"s{index:07d}.{extension}")
                member.size = len(content)
                archive.addfile(member, io.BytesIO(content))


def write_benchmark_shards(folder, split, samples, shard_sizes, metadata=None, count_file=True):
    """`samples` in CLIP_benchmark's layout: `folder/split/0.tar`, ... of `shard_sizes` samples each, with
    `nshards.txt` (or without it), and the metadata files `{name: lines}` in `folder`."""
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    begin = 0
    for number, size in enumerate(shard_sizes):
        write_shard(os.path.join(folder, split, f"{number}.tar"), samples[begin:begin + size])
        begin += size
    assert begin == len(samples)
    if count_file:
        with open(os.path.join(folder, split, "nshards.txt"), "w") as f:
            f.write(f"{len(shard_sizes)}\n")
    for name, lines in (metadata or {}).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The two splits as class folders (`root/{split}`), as CSV files (integer labels, label names), and as a tfds
    dataset with the same encoded images; a copy of the test split with a corrupt image; and stray files."""
    root = tmp_path_factory.mktemp("labelled")
    tfds_splits = {}
    for split in SPLITS:
        encoded = []
        for (path, label), pixels in zip(_rows(), _pixels(split)):
            encoded.append((_encoded(pixels, os.path.splitext(path)[1]), label))
            os.makedirs(root / split / os.path.dirname(path), exist_ok=True)
            (root / split / path).write_bytes(encoded[-1][0])
        (root / split / "green" / "notes.txt").write_text("not an image, not listed")
        tfds_splits[split] = tf.data.Dataset.from_tensor_slices(
            {"image": [e for e, _ in encoded], "label": [label for _, label in encoded]})
        samples = [{"png" if path.endswith(".png") else "jpg": image, "cls": str(label).encode()}
                   for (path, _), (image, label) in zip(_rows(), encoded)]
        metadata = {"classnames.txt": NAMES, "zeroshot_classification_templates.txt": ["a {c} picture."]}
        write_benchmark_shards(root / "wds", split, samples, [10, 9] if split == "test" else [19], metadata,
                               count_file=split == "test")
        if split == "test":
            # Between red/b.png and red/c.jpeg (process 1 of 2): an image that does not decode, a sample without
            # its label and one without its image.
            bad = [{"png": b"not an image", "cls": b"2"}, {"png": encoded[0][0]}, {"cls": b"1"}]
            write_benchmark_shards(root / "corrupt_wds", split, samples[:15] + bad + samples[15:], [12, 10], metadata)
        with open(root / f"{split}_ints.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "label", "note"])
            writer.writerows([(f"{split}/{path}", label, "x") for path, label in _rows()])
        with open(root / f"{split}_names.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["image", "class"])
            writer.writerows([(str(root / split / path), CLASSES[label]) for path, label in _rows()])
    shutil.copytree(root / "test", root / "corrupt" / "test")
    (root / "corrupt" / "test" / CORRUPT).write_bytes(b"not an image")
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(64, 64, 3)),
                                           "label": tfds.features.ClassLabel(names=CLASSES)})
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="labelled_images", version="1.0.0", features=features, data_dir=str(root / "tfds"),
        split_datasets=tfds_splits, disable_shuffling=True)
    return {"root": root, "tfds": str(builder.data_dir)}


def _evaluator(shapes_data_dir, devices: int):
    return micro_evaluator(shapes_data_dir, parallel.make_mesh(devices), batch_size=BATCH)


def _zero_shot(evaluator, dataset, **options):
    return run_tasks(evaluator, {"t": dict(kind="zero_shot", dataset=dataset, templates=("a {} picture.",),
                                           **options)})["t"]


@pytest.fixture(scope="module")
def reference(data, shapes_data_dir):
    """zero_shot on the tfds copy of the test split, on 8 devices."""
    return _zero_shot(_evaluator(shapes_data_dir, 8), data["tfds"])


def assert_same_results(result, reference, skipped=0):
    metrics = {k: v for k, v in result.metrics.items() if k != "dataset"}
    assert metrics == {**{k: v for k, v in reference.metrics.items() if k != "dataset"}, "skipped_images": skipped}
    np.testing.assert_array_equal(result.outputs["labels"], reference.outputs["labels"])
    np.testing.assert_array_equal(result.outputs["predictions"], reference.outputs["predictions"])
    np.testing.assert_allclose(result.outputs["scores"], reference.outputs["scores"], atol=1e-6)


def test_the_reference_is_what_the_tfds_dataset_holds(reference):
    assert reference.metrics["num_examples"] == 19 and reference.metrics["skipped_images"] == 0
    assert list(reference.metrics["per_class_accuracy"]) == NAMES
    np.testing.assert_array_equal(reference.outputs["labels"], [label for _, label in _rows()])
    assert len(set(reference.outputs["predictions"])) > 1  # scores that tell images apart


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("kind", ["folder", "csv_integers", "csv_names", "wds"])
def test_own_images_give_the_tfds_results(data, shapes_data_dir, reference, kind, devices):
    root = data["root"]
    dataset, options = {
        "folder": (dict(kind="folder", path=str(root / "{split}")), {}),
        "csv_integers": (dict(kind="csv", path=str(root / "{split}_ints.csv")), {"class_names": NAMES}),
        "csv_names": (dict(kind="csv", path=str(root / "{split}_names.tsv"), image_column="image",
                           label_column="class"), {}),
        "wds": (dict(kind="wds", path=str(root / "wds")), {}),
    }[kind]
    assert_same_results(_zero_shot(_evaluator(shapes_data_dir, devices), dataset, **options), reference)


def test_an_unreadable_image_is_skipped_and_counted(data, shapes_data_dir, reference, capsys):
    path = str(data["root"] / "corrupt" / "{split}")
    result = _zero_shot(_evaluator(shapes_data_dir, 8), dict(kind="folder", path=path))
    assert_same_results(result, reference, skipped=1)
    assert "| skipped_images | 1 |" in result.table
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert warning == [f"warning: skipped 1 image(s) of {path.format(split='test')} that cannot be read or "
                       f"decoded: {data['root'] / 'corrupt' / 'test' / CORRUPT}"]


def test_shards_bring_their_class_names_and_templates(data, shapes_data_dir, reference, capsys):
    """Without `templates`, a wds dataset's zeroshot_classification_templates.txt ("a {c} picture.") is used; its
    damaged samples (an image that does not decode, a sample without its label, one without its image) are
    skipped and counted."""
    evaluator = _evaluator(shapes_data_dir, 8)
    for path, skipped in ((data["root"] / "wds", 0), (data["root"] / "corrupt_wds", 3)):
        result = run_tasks(evaluator, {"t": dict(kind="zero_shot", dataset=dict(kind="wds", path=str(path)))})["t"]
        assert_same_results(result, reference, skipped=skipped)
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert warning == [f"warning: skipped 3 image(s) of {data['root']}/corrupt_wds/test that cannot be read or "
                       "decoded: #15, #16, #17"]


def test_linear_probe_on_split_folders(data, shapes_data_dir):
    probe = dict(kind="linear_probe", shots=(1, 2))
    results = run_tasks(_evaluator(shapes_data_dir, 8), {
        "folders": dict(probe, dataset=dict(kind="folder", path=str(data["root"] / "{split}"))),
        "tfds": dict(probe, dataset=data["tfds"]),
        # Without {split} in the path, the split is ignored: here both are the test folder.
        "one_folder": dict(probe, dataset=dict(kind="folder", path=str(data["root"] / "test"))),
        "tfds_test": dict(probe, dataset=data["tfds"], train_split="test"),
        "wds": dict(probe, dataset=dict(kind="wds", path=str(data["root"] / "wds"))),
    })
    metrics = {name: {k: v for k, v in result.metrics.items() if k != "dataset"} for name, result in results.items()}
    assert metrics["folders"]["num_train"] == metrics["folders"]["num_test"] == 19
    assert metrics["folders"]["skipped_images"] == 0
    assert metrics["folders"] == metrics["tfds"] == metrics["wds"]
    assert metrics["one_folder"] == metrics["tfds_test"]
    assert metrics["one_folder"]["full"] != metrics["folders"]["full"]


def test_each_process_reads_a_contiguous_slice_in_order(data):
    dataset = dict(kind="csv", path=str(data["root"] / "test_names.tsv"), image_column="image", label_column="class")
    slices = [read_labelled_images(dataset, "test", process_index=p, process_count=3) for p in range(3)]
    examples = [example for data_ in slices for example in data_.examples.as_numpy_iterator()]
    assert [len(list(s.examples)) for s in slices] == [s.num_examples for s in slices] == [6, 6, 7]
    assert [(e["image_path"].decode(), int(e["label"])) for e in examples] == [
        (str(data["root"] / "test" / path), label) for path, label in _rows()]
    assert all(e["image"] == b"" for e in examples)  # read from the file when visited, not now


def test_class_names_given_or_imagenet(tmp_path, data):
    folder = dict(kind="folder", path=str(data["root"] / "test"))
    assert read_labelled_images(folder, class_names=["sky", "grass", "fire"]).class_names == ["sky", "grass", "fire"]
    (tmp_path / "labels.csv").write_text("filepath,label\nx.png,999\nsub/y.png,0\n")
    imagenet = read_labelled_images(dict(kind="csv", path=str(tmp_path / "labels.csv"), image_root="/images"),
                                    class_names="imagenet")
    assert imagenet.class_names == list(prompts.imagenet_class_names())
    assert [(e["image_path"].decode(), e["label"]) for e in imagenet.examples.as_numpy_iterator()] == [
        ("/images/x.png", 999), ("/images/sub/y.png", 0)]
    # Label names with a list: exactly those classes, in that order (also ones no row has).
    (tmp_path / "names.csv").write_text("filepath,label\nx.png,dog\ny.png,cat\n")
    given = read_labelled_images(dict(kind="csv", path=str(tmp_path / "names.csv")), class_names=["cat", "cow", "dog"])
    assert [e["label"] for e in given.examples.as_numpy_iterator()] == [2, 0]
    assert given.class_names == ["cat", "cow", "dog"]


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return str(path)


@pytest.mark.parametrize("case", [
    "missing folder", "no class folders", "no images", "empty class", "missing csv", "missing column",
    "label not a class name", "label out of range", "integers without names", "wrong number of names",
    "imagenet names for 3 folders", "where", "label_key", "unknown kind", "no kind", "bad option",
    "class_names in the dict", "no path",
    "empty csv", "row without label", "no shards", "no classnames.txt", "class index out of range",
    "retrieval shards", "names for the shards",
])
def test_bad_input_is_named_in_one_line(case, tmp_path, data):
    test = str(data["root"] / "test")
    png = (data["root"] / "test" / "red" / "a.png").read_bytes()
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "1.png").write_bytes(png)
    for folder in ("nothing/cat", "nothing/dog", "empty/cat", "empty/dog"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "nothing" / "cat" / "readme.txt").write_text("no image")
    (tmp_path / "empty" / "cat" / "1.png").write_bytes(png)
    ints = _write(tmp_path / "ints.csv", "filepath,label\na.png,0\nb.png,2\nc.png,5\n")
    names = _write(tmp_path / "names.csv", "filepath,label\na.png,cat\nb.png,dog\nc.png,cow\n")
    write_benchmark_shards(tmp_path / "plain", "test", [{"png": png, "cls": b"1"}], [1])
    write_benchmark_shards(tmp_path / "range", "test", [{"png": png, "cls": b"0"}, {"png": png, "cls": b"3"}], [2],
                           {"classnames.txt": ["cat", "dog", "cow"]})
    write_benchmark_shards(tmp_path / "three", "test", [{"png": png, "cls": b"2"}], [1],
                           {"classnames.txt": ["cat", "dog", "cow"]})
    write_benchmark_shards(tmp_path / "captions", "test", [{"png": png, "txt": b"a cat"}], [1],
                           {"dataset_type.txt": ["retrieval"]})
    options, error, message = {
        "missing folder": (dict(dataset=dict(kind="folder", path=str(tmp_path / "pets/{split}"))), FileNotFoundError,
                           f"no folder '{tmp_path}/pets/test': dataset=dict(kind='folder', path=...) takes a "
                           "directory with one subfolder of images per class"),
        "no class folders": (dict(dataset=dict(kind="folder", path=str(tmp_path / "loose"))), ValueError,
                             f"{tmp_path}/loose has no class subfolders (1 images lie directly in it); put each "
                             "class's images in a subfolder"),
        "no images": (dict(dataset=dict(kind="folder", path=str(tmp_path / "nothing"))), ValueError,
                      f"the class folders of {tmp_path}/nothing hold no images (files ending in .jpg, .jpeg"),
        "empty class": (dict(dataset=dict(kind="folder", path=str(tmp_path / "empty"))), ValueError,
                        f"class folder(s) 'dog' of {tmp_path}/empty hold no images"),
        "missing csv": (dict(dataset=dict(kind="csv", path=str(tmp_path / "{split}.csv"))), FileNotFoundError,
                        f"no CSV file at '{tmp_path}/test.csv'"),
        "missing column": (dict(dataset=dict(kind="csv", path=ints, label_column="class")), ValueError,
                           f"{ints} has no column(s) ['class']; its columns are ['filepath', 'label']: set "
                           "image_column and label_column"),
        "label not a class name": (dict(dataset=dict(kind="csv", path=names), class_names=["cat", "dog"]), ValueError,
                                   f"{names}, line 4: label 'cow' is not one of the 2 class_names ('cat', 'dog'); "
                                   "add it to class_names or fix the row"),
        "label out of range": (dict(dataset=dict(kind="csv", path=ints), class_names=["a", "b", "c"]), ValueError,
                               f"{ints}, line 4: label 5 is out of range for the 3 class_names (labels 0 to 2)"),
        "integers without names": (dict(dataset=dict(kind="csv", path=ints), class_names="dataset"), ValueError,
                                   f"the labels of {ints} are integers: give the task class_names"),
        "wrong number of names": (dict(dataset=dict(kind="folder", path=test), class_names=["a", "b"]), ValueError,
                                  f"2 class_names for the 3 class folders of {test} ('blue_square', 'green', 'red'); "
                                  "give one name per class"),
        "imagenet names for 3 folders": (dict(dataset=dict(kind="folder", path=test), class_names="imagenet"),
                                         ValueError, "1000 class_names for the 3 class folders"),
        "where": (dict(dataset=dict(kind="folder", path=test), where={"num_objects": 1}), ValueError,
                  "where={'num_objects': 1} selects tfds examples by their features; a 'folder' dataset has none"),
        "label_key": (dict(dataset=dict(kind="csv", path=ints), label_key="class"), ValueError,
                      "label_key / image_key name tfds features; a 'csv' dataset has none: remove them (the CSV's "
                      "columns are image_column and label_column"),
        "unknown kind": (dict(dataset=dict(kind="zip", path=test)), ValueError, "unknown dataset kind 'zip'"),
        "no kind": (dict(dataset=dict(path=test)), ValueError, "unknown dataset kind None"),
        "bad option": (dict(dataset=dict(kind="folder", path=test, image_column="x")), ValueError,
                       "a 'folder' dataset has no option(s) ['image_column']; it takes path"),
        "class_names in the dict": (dict(dataset=dict(kind="csv", path=ints, class_names=["a"])), ValueError,
                                    "a 'csv' dataset has no option(s) ['class_names']; it takes path, image_column, "
                                    "label_column, image_root (class_names is an option of the task)"),
        "no path": (dict(dataset=dict(kind="csv")), ValueError, "a 'csv' dataset needs a path"),
        "empty csv": (dict(dataset=dict(kind="csv", path=_write(tmp_path / "e.csv", "filepath,label\n"))), ValueError,
                      "e.csv has no rows"),
        "row without label": (dict(dataset=dict(kind="csv", path=_write(tmp_path / "n.csv",
                                                                        "filepath,label\na.png,\n"))),
                              ValueError, "n.csv, line 2: no label"),
        "no shards": (dict(dataset=dict(kind="wds", path=str(tmp_path / "wds_pets"))), FileNotFoundError,
                      f"no CLIP_benchmark dataset at {tmp_path}/wds_pets; download one, e.g. `huggingface-cli "
                      f"download clip-benchmark/wds_vtab-cifar10 --repo-type dataset --local-dir {tmp_path}/wds_pets`"),
        "no classnames.txt": (dict(dataset=dict(kind="wds", path=str(tmp_path / "plain")), class_names="dataset"),
                              ValueError, f"{tmp_path}/plain has no classnames.txt: add it (one class name per "
                              "line, label i on line i + 1) or give the task class_names"),
        "class index out of range": (dict(dataset=dict(kind="wds", path=str(tmp_path / "range"))), ValueError,
                                     f"{tmp_path}/range/test/0.tar, sample s0000001: class index 3 is out of range "
                                     f"for the 3 names of {tmp_path}/range/classnames.txt"),
        "retrieval shards": (dict(dataset=dict(kind="wds", path=str(tmp_path / "captions"))), ValueError,
                             f"{tmp_path}/captions is a retrieval dataset; classify a classification set, or give "
                             "this one to a retrieval task as source=dict(kind='wds', path=...)"),
        "names for the shards": (dict(dataset=dict(kind="wds", path=str(tmp_path / "three")),
                                      class_names=["a", "b"]), ValueError,
                                 f"2 class_names for the 3 classes of {tmp_path}/three/classnames.txt"),
    }[case]
    with pytest.raises(error) as raised:
        read_labelled_images(split="test", **options)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_training_run_checks_these_datasets_before_it_starts(data):
    """`check_task_inputs` (which reads the images, not the class names) passes one image of each through the
    preprocessing: folders and CSVs with integer labels are fine; a wrong image size or `where` stop it."""
    root = data["root"]
    tasks = {"folder": dict(kind="linear_probe", dataset=dict(kind="folder", path=str(root / "{split}"))),
             "csv": dict(kind="zero_shot", dataset=dict(kind="csv", path=str(root / "{split}_ints.csv")),
                         class_names=NAMES)}
    check_task_inputs(tasks, 64, "decode")
    with pytest.raises(ValueError, match="^evaluation task 'folder' cannot run: its preprocessing 'decode' turns an "
                                         f"image of {root}/train into shape \\(64, 64, 3\\), but the model takes"):
        check_task_inputs(tasks, 32, "decode")
    with pytest.raises(ValueError, match="^evaluation task 'csv' cannot run: where=.* selects tfds examples"):
        check_task_inputs({"csv": dict(tasks["csv"], where={"num_objects": 1})}, 64, "decode")


def test_a_probe_needs_the_same_classes_in_both_splits(tmp_path, data, shapes_data_dir):
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "cow"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            shutil.copy(data["root"] / "test" / "red" / "a.png", tmp_path / split / name / "1.png")
    task = dict(kind="linear_probe", dataset=dict(kind="folder", path=str(tmp_path / "{split}")))
    with pytest.raises(ValueError, match=f"^the classes of {tmp_path}/train and {tmp_path}/test differ: cow, dog; "
                                         "give both splits the same classes"):
        run_tasks(_evaluator(shapes_data_dir, 1), {"probe": task})


def test_a_folder_of_only_unreadable_images(tmp_path, shapes_data_dir):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="nothing to embed: the evaluation set is empty, or none of its images can "
                                         "be read"):
        _zero_shot(_evaluator(shapes_data_dir, 1), dict(kind="folder", path=str(tmp_path)))


def test_two_processes_give_the_single_process_results(tmp_path, data, shapes_data_dir):
    """2 processes x 2 devices, against 1 process x 8 devices: process 1's half of the test split holds the
    corrupt image (it yields one image fewer than it counted; process 0, which writes the results, none)."""
    root = data["root"]
    tasks = {"zero_shot": dict(kind="zero_shot", dataset=dict(kind="folder", path=str(root / "corrupt" / "test")),
                               templates=["a {} picture."]),
             "probe": dict(kind="linear_probe", dataset=dict(kind="csv", path=str(root / "{split}_ints.csv")),
                           class_names=NAMES, shots=[1, 2]),
             "shards": dict(kind="zero_shot", dataset=dict(kind="wds", path=str(root / "corrupt_wds")))}
    run_workers("evaluation_worker.py", 2, shapes_data_dir, tmp_path / "results.json", json.dumps(tasks), BATCH)
    single = run_tasks(_evaluator(shapes_data_dir, 8), tasks)
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps({name: result.metrics for name, result in single.items()}))
    assert single["zero_shot"].metrics["skipped_images"] == 1 and single["shards"].metrics["skipped_images"] == 3
