"""Labelled images for classification (zero-shot, linear probes): one process's slice of a dataset, in order.

A dataset is one of

- a string: a tfds dataset (a registered name, a directory, or `shapes/CONFIG`), its images under `image_key`
  and its class labels under `label_key`;
- `dict(kind="folder", path=DIR)`: one subfolder of images per class, as torchvision's `ImageFolder` reads
  them (classes in sorted folder order; images with an extension of `sources.IMAGE_EXTENSIONS`, any case, in
  the class folder and its subfolders);
- `dict(kind="csv", path=FILE, image_column="filepath", label_column="label", image_root=None)`: a CSV (a TSV
  by extension: .tsv, .tab) of image paths, relative to the file's folder or to `image_root`, and labels:
  integers (label i is `class_names[i]`) or class names;
- `dict(kind="wds", path=DIR)`: a dataset in CLIP_benchmark's WebDataset layout (`jclip.data.benchmark_shards`),
  its class names from `classnames.txt` and its prompt templates from `zeroshot_classification_templates.txt`.

For folders and CSV files, `{split}` in `path` becomes the split (`path="/data/pets/{split}"`); without it
the split is ignored. `{data_dir}` in a path becomes `data_dir` (`config.data.data_dir`). Their images are read
from the files when the evaluation visits them (`image_path`, see `sources.encoded_image`); for these and for
shards, an image that cannot be read or decoded is skipped and counted (`LabelledImages.skips_unreadable`).
Each process reads a contiguous slice of the examples in a fixed order (folders: class by class, each class's
files sorted; CSV: file order; shards: shard order), so results do not depend on the process count.

`class_names`: "dataset" (the tfds label feature's names, the folder names, the CSV's distinct label
names, sorted, or the shards' classnames.txt; "_" shown as a space), "imagenet" (CLIP's ImageNet names, for
labels 0..999), a benchmark dataset's name (CLIP's curated names, `prompts.dataset_class_names`) or a list
(one name per class: per tfds label, per sorted class folder, per integer label; or for CSV label names,
exactly the classes, in this order).
"""

import csv
import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import tensorflow as tf

from jclip.data import prompts, sources
from jclip.data.benchmark_shards import read_benchmark_shards


@dataclasses.dataclass
class LabelledImages:
    """This process's slice of a labelled image dataset and the names of its classes."""

    name: str
    examples: tf.data.Dataset  # {"image": encoded bytes, "image_path": str, "label": int64}
    num_examples: int
    class_names: list[str]  # label i is class_names[i], as words ("aquarium fish")
    classes: list[str] = dataclasses.field(default_factory=list)  # the dataset's own class keys (folder names, ...)
    skips_unreadable: bool = False  # an image that cannot be read or decoded is skipped and counted
    templates: Optional[list[str]] = None  # the dataset's own prompt templates, if it has them


def read_labelled_images(dataset: Union[str, Mapping[str, Any]], split: str = "test", *, label_key: str = "label",
                         image_key: str = "image", class_names=None,
                         where: Optional[Mapping[str, int]] = None, data_dir: Optional[str] = None,
                         process_index=None, process_count=None) -> LabelledImages:
    """The labelled images of `dataset`'s `split` (see the module docstring); with `where` (tfds only), only
    the examples whose features equal those values (e.g. `{"num_objects": 1}`). `class_names=None`: as
    "dataset", but for reading the images only: integer CSV labels need no names then (they are "0", "1", ...)."""
    if isinstance(dataset, str):
        return _tfds_images(dataset, split, label_key, image_key, class_names, where, data_dir,
                            process_index, process_count)
    options = dict(dataset)
    kind = options.pop("kind", None)
    if kind not in _FILE_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: give a tfds dataset's name or directory (a string), "
                         f"or a dict with kind 'folder', 'csv' or 'wds' (and path=...)")
    if where:
        raise ValueError(f"where={dict(where)!r} selects tfds examples by their features; a {kind!r} dataset has "
                         "none: remove `where` and list only the images to use")
    if (label_key, image_key) != ("label", "image"):
        raise ValueError(f"label_key / image_key name tfds features; a {kind!r} dataset has none: remove them"
                         + (" (the CSV's columns are image_column and label_column, in the dataset dict)"
                            if kind == "csv" else ""))
    if "path" not in options:
        raise ValueError(f"a {kind!r} dataset needs a path: dataset=dict(kind={kind!r}, path=...)")
    path = sources.resolve_data_dir(str(options.pop("path")), data_dir)
    read, takes = _FILE_KINDS[kind]
    if set(options) - set(takes):
        raise ValueError(f"a {kind!r} dataset has no option(s) {sorted(set(options) - set(takes))}; it takes path"
                         + "".join(f", {option}" for option in takes)
                         + (" (class_names is an option of the task)" if "class_names" in options else ""))
    return read(path, split, class_names, process_index, process_count, **options)


def _reader_of_listed(list_images):
    """A reader of `_FILE_KINDS` from a function listing a dataset's image files: `list_images(path, class_names,
    **options)` -> (paths, labels, classes, names); this process's share of them, read when visited."""
    def read(path, split, class_names, process_index, process_count, **options) -> LabelledImages:
        path = path.replace("{split}", split)
        paths, labels, classes, names = list_images(path, class_names, **options)
        begin, end = sources.process_range(len(paths), process_index, process_count)
        examples = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths[begin:end], tf.string), tf.constant(labels[begin:end], tf.int64))
        ).map(lambda p, label: {"image": tf.constant(b""), "image_path": p, "label": label})
        return LabelledImages(path, examples, end - begin, names, classes, skips_unreadable=True)
    return read


def _shards(path, split, class_names, process_index, process_count) -> LabelledImages:
    shards = read_benchmark_shards(path, split)
    if shards.kind != "classification":
        raise ValueError(f"{path} is a {shards.kind} dataset; classify a classification set, or give this one "
                         "to a retrieval task as source=dict(kind='wds', path=...)")
    labels = shards.labels()
    given = _given_names(class_names, -1, "")
    if given is None and class_names is None and shards.class_names is None:  # names not needed (images only)
        given = [str(i) for i in range(max(labels.max() + 1, 1))]
    if given is None:
        if shards.class_names is None:
            raise ValueError(f"{path} has no classnames.txt: add it (one class name per line, label i on line i + 1) "
                             "or give the task class_names (a list, or a benchmark dataset's name)")
        given = shards.class_names
    elif shards.class_names is not None and len(given) != len(shards.class_names):
        raise ValueError(f"{len(given)} class_names for the {len(shards.class_names)} classes of "
                         f"{path}/classnames.txt; give one name per class, in label order")
    wrong = labels >= len(given)
    if wrong.any():
        sample = shards.samples[int(wrong.argmax())]
        raise ValueError(f"{sample.shard}, sample {sample.key}: class index {sample.label} is out of range for the "
                         f"{len(given)} class_names; fix the sample or class_names")
    begin, end = sources.process_range(len(shards.samples), process_index, process_count)
    return LabelledImages(shards.name, shards.examples(begin, end), end - begin, list(given),
                          list(shards.class_names or given), skips_unreadable=True, templates=shards.templates)


def _tfds_images(dataset, split, label_key, image_key, class_names, where, data_dir, process_index,
                 process_count) -> LabelledImages:
    builder = sources.tfds_builder(dataset, data_dir)
    examples, count = sources.read_tfds_slice(builder, split, image_key, process_index, process_count)
    if where:
        examples = examples.filter(
            lambda ex: tf.reduce_all([tf.equal(sources.field(ex, k), v) for k, v in where.items()]))
        count = int(examples.map(lambda ex: 0).reduce(0, lambda total, _: total + 1))
    examples = examples.map(lambda ex: {"image": sources.field(ex, image_key), "image_path": "",
                                        "label": tf.cast(sources.field(ex, label_key), tf.int64)})
    names = sources.label_names(builder, label_key, "dataset" if class_names is None else class_names)
    return LabelledImages(f"{dataset}/{split}", examples, count, names, list(names))


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _given_names(spec, count: int, what: str) -> Optional[list[str]]:
    """The list that `class_names` gives for `count` classes, or None for "dataset" (or None)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "dataset":
            return None
        names = list(prompts.class_names(spec))
    else:
        names = [str(name) for name in spec]
    if count >= 0 and len(names) != count:
        raise ValueError(f"{len(names)} class_names for the {count} {what}; give one name per class, in that order")
    return names


def _is_image(name: str) -> bool:
    return name.lower().endswith(sources.IMAGE_EXTENSIONS)


def _folder(root: str, class_names="dataset"):
    """(image paths, labels, class folders, class names) of a class-per-folder directory, in ImageFolder's order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root!r}: dataset=dict(kind='folder', path=...) takes a directory with "
                                "one subfolder of images per class ({split} in the path stands for the split)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        loose = sum(_is_image(entry.name) for entry in os.scandir(root) if entry.is_file())
        raise ValueError(f"{root} has no class subfolders{f' ({loose} images lie directly in it)' if loose else ''}; "
                         f"put each class's images in a subfolder named after the class ({root}/CLASS/IMAGE)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = [os.path.join(folder, file) for folder, _, files in sorted(os.walk(os.path.join(root, name),
                                                                                     followlinks=True))
                 for file in sorted(files) if _is_image(file)]
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"the class folders of {root} hold no images (files ending in "
                         f"{', '.join(sources.IMAGE_EXTENSIONS)}); put the images in them")
    if empty:
        raise ValueError(f"class folder(s) {_listed(empty)} of {root} hold no images (files ending in "
                         f"{', '.join(sources.IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    names = _given_names(class_names, len(classes), f"class folders of {root} ({_listed(classes)})")
    return paths, labels, classes, names or [name.replace("_", " ") for name in classes]


_INTEGER = re.compile(r"[+-]?\d+")


def _csv(file: str, class_names="dataset", image_column: str = "filepath", label_column: str = "label",
         image_root: Optional[str] = None):
    """(image paths, labels, classes, class names) of a CSV or TSV of image paths and labels, in file order."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no CSV file at {file!r}: dataset=dict(kind='csv', path=...) takes a CSV or TSV of "
                                "image paths and labels ({split} in the path stands for the split)")
    delimiter = "\t" if file.endswith((".tsv", ".tab")) else ","
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in (image_column, label_column) if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{file} has no column(s) {missing}; its columns are {reader.fieldnames}: set "
                             "image_column and label_column in the dataset dict to the ones to use")
        rows = [((row[image_column] or "").strip(), (row[label_column] or "").strip(), reader.line_num)
                for row in reader]
    if not rows:
        raise ValueError(f"{file} has no rows; list one image and its label per row")
    for image, label, line in rows:
        if not image or not label:
            raise ValueError(f"{file}, line {line}: no {'image path' if not image else 'label'}; give every row an "
                             "image path and a label")
    labels = [label for _, label, _ in rows]
    integers = all(_INTEGER.fullmatch(label) for label in labels)
    given = _given_names(class_names, -1, "")
    if given is None and integers and class_names is None:  # names not needed (only the images are read)
        given = [str(i) for i in range(max(int(label) for label in labels) + 1)]
    if given is None:
        if integers:
            raise ValueError(f"the labels of {file} are integers: give the task class_names, a list of the class "
                             "names (label i is class_names[i]), or 'imagenet'")
        classes = sorted(set(labels))
        names = [name.replace("_", " ") for name in classes]
        index = {name: i for i, name in enumerate(classes)}
        indices = [index[label] for label in labels]
    else:
        classes = names = given
        index = {name: i for i, name in enumerate(given)}
        if all(label in index for label in labels):
            indices = [index[label] for label in labels]
        elif integers:
            indices = [int(label) for label in labels]
            for i, (_, label, line) in zip(indices, rows):
                if not 0 <= i < len(given):
                    raise ValueError(f"{file}, line {line}: label {label} is out of range for the {len(given)} "
                                     f"class_names (labels 0 to {len(given) - 1}); fix the row or class_names")
        else:
            _, label, line = next(row for row in rows if row[1] not in index)
            raise ValueError(f"{file}, line {line}: label {label!r} is not one of the {len(given)} class_names "
                             f"({_listed(given)}); add it to class_names or fix the row")
    root = image_root or os.path.dirname(os.path.abspath(file))
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p, _, _ in rows]
    return paths, indices, list(classes), list(names)


# The reader of each kind of dataset dict, `read(path, split, class_names, process_index, process_count,
# **options)` -> LabelledImages, and its options besides `path`.
_FILE_KINDS = {"folder": (_reader_of_listed(_folder), ()),
               "csv": (_reader_of_listed(_csv), ("image_column", "label_column", "image_root")),
               "wds": (_shards, ())}
