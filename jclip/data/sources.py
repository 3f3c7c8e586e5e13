"""Image–text sources: where training examples come from, one process's slice at a time.

A source is a finite dataset in a fixed order of `{"image": encoded bytes,
"image_path": str, "captions": [n] strings}` (an image is given by its bytes
or, when `image_path` is not empty, read from that file); the pipeline
shuffles it per epoch, reads, samples one caption per visit and decodes. Sources are named and weighted in
`config.data.sources`:

    shapes: {kind: "shapes", config: "default"}                  # built-in, offline
    tfds:   {kind: "tfds", name: "coco_captions", split: "train",
             image_key: "image", caption_key: "captions/text"}
            {kind: "tfds", name: "imagenet2012", split: "train", label_key: "label",
             templates: "simple", class_names: "imagenet"}  # class names -> captions
    csv:    {kind: "csv", path: "pairs.tsv", image_column: "filepath", caption_column: "title"}
    tar:    {kind: "tar", pattern: "/data/shards/*.tar"}        # WebDataset / img2dataset shards
    wds:    {kind: "wds", path: "/data/wds_flickr30k", split: "test"}  # CLIP_benchmark's layout

Each process reads its own slice: `tfds.split_for_jax_process` for tfds, a
contiguous range of rows for CSV and of samples for wds, every process_count-th shard for tar.
`{data_dir}` in a CSV or wds path becomes `config.data.data_dir`.
"""

import csv
import dataclasses
import glob
import json
import os
import tarfile
from typing import Any, Iterator, Mapping, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jclip.data import prompts, shapes
from jclip.data.benchmark_shards import read_benchmark_shards

# A tfds dataset up to this size is kept in memory once read (tfds's own auto-cache rule): later epochs
# then cost no file reads or record parsing.
IN_MEMORY_BYTES = 250 * 2**20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_SIGNATURE = {"image": tf.TensorSpec([], tf.string), "image_path": tf.TensorSpec([], tf.string),
              "captions": tf.TensorSpec([None], tf.string)}


@dataclasses.dataclass
class Source:
    """This process's slice of one image–text dataset, in a fixed order."""

    name: str
    examples: tf.data.Dataset  # {"image": encoded bytes, "image_path": str, "captions": [n] strings}
    num_examples: int
    image_files: bool = False  # images are read from `image_path` when the pipeline visits an example
    fits_in_memory: bool = False  # small enough that the pipeline keeps it in memory after its first epoch


def encoded_image(example, image_files: bool = True) -> tf.Tensor:
    """An example's encoded image: its bytes, or, where the source has `image_files`, the file at its
    `image_path` when that is not empty (a conditional, which tf.data runs as function calls: skipped
    for sources without image files)."""
    if not image_files:
        return example["image"]
    path = example["image_path"]
    return tf.cond(tf.strings.length(path) > 0, lambda: tf.io.read_file(path), lambda: example["image"])


def text_captions(captions: tf.Tensor) -> tf.Tensor:
    """The captions that are not empty or blank (possibly none)."""
    return tf.boolean_mask(captions, tf.strings.length(tf.strings.strip(captions)) > 0)


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def process_range(count: int, process_index=None, process_count=None) -> tuple[int, int]:
    """[begin, end) of this process's contiguous share of `count` examples (every process's, in order, covers
    them all: results do not depend on the process count)."""
    process_index, process_count = _process(process_index, process_count)
    return count * process_index // process_count, count * (process_index + 1) // process_count


def field(example: Mapping[str, Any], key: str):
    """`example["a"]["b"]` for key "a/b" (nested tfds features such as coco's captions/text)."""
    for part in key.split("/"):
        example = example[part]
    return example


def tfds_builder(name: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """The tfds builder of `name`: a registered dataset, a directory (as `python -m jclip.data.to_tfds`
    writes one), or `shapes/CONFIG` (the built-in dataset, built on first use)."""
    if name.startswith("shapes/"):
        return shapes.prepare(name.split("/", 1)[1], data_dir)
    try:
        return tfds.builder_from_directory(name) if os.path.isdir(name) else tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"tfds has no dataset {name!r}: {error}") from None


def read_tfds_slice(builder: tfds.core.DatasetBuilder, split: str, image_key: str, process_index=None,
                    process_count=None) -> tuple[tf.data.Dataset, int]:
    """This process's contiguous slice of `split`, in order, its images left encoded; and its size.

    Not cached (tfds's auto-cache is off): the training pipeline caches small sources in their final form.
    """
    process_index, process_count = _process(process_index, process_count)
    process_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    decoders = {image_key: tfds.decode.SkipDecoding()}
    try:
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            data_source = builder.as_data_source(split=process_split, decoders=decoders)
            examples = _array_record_examples(data_source, builder.info.features, image_key)
        else:
            read_config = tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False, try_autocache=False)
            examples = builder.as_dataset(split=process_split, shuffle_files=False, decoders=decoders,
                                          read_config=read_config)
    except AssertionError:  # tfds's way of saying the data is not there
        raise ValueError(
            f"tfds dataset {builder.name!r} is not prepared in {builder.data_dir}; build it first "
            f"(`tfds build {builder.name} --data_dir=...`, with manual downloads where tfds asks) "
            f"or set data_dir to where it is"
        ) from None
    count = int(examples.cardinality())
    if count < 0:
        count = builder.info.splits[process_split].num_examples
    return examples, count


def label_names(builder: tfds.core.DatasetBuilder, label_key: str, spec="dataset") -> list[str]:
    """The names of the classes of `label_key` as words: the feature's own names ("dataset";
    "aquarium_fish" -> "aquarium fish"), CLIP's ImageNet names ("imagenet"), or the list `spec`."""
    feature = builder.info.features
    for part in label_key.split("/"):
        feature = feature[part]
    if not isinstance(feature, tfds.features.ClassLabel):
        raise ValueError(f"{builder.name}'s feature {label_key!r} is not a class label")
    if spec == "dataset":
        return [name.replace("_", " ") for name in feature.names]
    names = list(prompts.class_names(spec))
    if len(names) != feature.num_classes:
        raise ValueError(f"{len(names)} class names for the {feature.num_classes} classes of {builder.name}'s "
                         f"{label_key!r}")
    return names


def tfds_source(name: str, *, split: str = "train", data_dir: Optional[str] = None, image_key: str = "image",
                caption_key: Optional[str] = "caption", label_key: Optional[str] = None,
                templates="simple", class_names="dataset", process_index=None, process_count=None) -> Source:
    """A prepared tfds dataset (see `tfds_builder` for the names).

    Captions come from `caption_key` (one or several per image), or from the class names of
    `label_key` (see `label_names`; "imagenet" for ImageNet) in the prompt templates `templates`.
    """
    builder = tfds_builder(name, data_dir)
    examples, count = read_tfds_slice(builder, split, image_key, process_index, process_count)
    if label_key is not None:
        names = label_names(builder, label_key, class_names)
        label_captions = tf.constant([[t.format(n) for t in prompts.templates(templates)] for n in names])
        captions = lambda ex: tf.gather(label_captions, field(ex, label_key))
    else:
        captions = lambda ex: tf.reshape(field(ex, caption_key), [-1])
    examples = examples.map(lambda ex: {"image": field(ex, image_key), "image_path": "", "captions": captions(ex)})
    return Source(f"{builder.name}/{split}", examples, count,
                  fits_in_memory=0 < (builder.info.dataset_size or 0) <= IN_MEMORY_BYTES)


def _array_record_examples(data_source, features, image_key: str) -> tf.data.Dataset:
    """The records of a tfds ArrayRecord data source in order (tfds reads ArrayRecord by random access only)."""
    signature = features.get_tensor_spec()
    signature[image_key] = tf.TensorSpec([], tf.string)  # kept encoded (SkipDecoding)
    generate = lambda: (data_source[i] for i in range(len(data_source)))
    return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
        tf.data.experimental.assert_cardinality(len(data_source)))


def shapes_source(config: str = "default", *, split: str = "train", data_dir: Optional[str] = None,
                  process_index=None, process_count=None) -> Source:
    """The built-in `shapes` dataset, built on first use."""
    return tfds_source(f"shapes/{config}", split=split, data_dir=data_dir, process_index=process_index,
                       process_count=process_count)


def csv_source(path: str, *, image_column: str = "filepath", caption_column: str = "caption",
               image_root: Optional[str] = None, process_index=None, process_count=None) -> Source:
    """A CSV (or TSV, by extension) of image paths and captions; relative paths are under `image_root`."""
    if not os.path.exists(path):
        raise ValueError(f"no CSV file at {path!r}")
    delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {image_column, caption_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column(s) {sorted(missing)}; its columns are {reader.fieldnames}")
        rows = [(row[image_column] or "", row[caption_column] or "") for row in reader]
    begin, end = process_range(len(rows), process_index, process_count)
    root = image_root or os.path.dirname(os.path.abspath(path))
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows[begin:end]]
    captions = [c for _, c in rows[begin:end]]
    examples = tf.data.Dataset.from_tensor_slices((paths, captions)).map(
        lambda p, c: {"image": "", "image_path": p, "captions": tf.reshape(c, [1])}
    )
    return Source(os.path.basename(path), examples, end - begin, image_files=True)


def _sample(files: dict[str, bytes]) -> dict:
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), b"")
    caption = files.get(".txt", b"").decode("utf-8", "replace")
    if not caption and ".json" in files:
        try:
            caption = str(json.loads(files[".json"]).get("caption") or "")
        except (ValueError, AttributeError):
            caption = ""
    return {"image": image, "image_path": "", "captions": np.array([caption.strip()], dtype=object)}


def _tar_samples(shard: bytes) -> Iterator[dict]:
    """Samples of a WebDataset tar: consecutive files sharing a key (`key.jpg` + `key.txt` / `key.json`).

    A sample with no image or no caption is still yielded (the pipeline skips and counts it); a
    truncated shard ends at its last readable sample.
    """
    key, files = None, {}
    try:
        with tarfile.open(shard.decode()) as archive:
            for member in archive:
                stem, extension = os.path.splitext(member.name)
                if not member.isfile() or extension.lower() not in IMAGE_EXTENSIONS + (".txt", ".json"):
                    continue
                if stem != key and key is not None:
                    yield _sample(files)
                    files = {}
                key = stem
                files[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        print(f"warning: tar shard {shard.decode()} is unreadable past sample {key!r}: {error}", flush=True)
    if key is not None:
        yield _sample(files)


def _count_tar_samples(shard: str) -> int:
    with tarfile.open(shard) as archive:
        return len({os.path.splitext(m.name)[0] for m in archive if m.isfile()
                    and os.path.splitext(m.name)[1].lower() in IMAGE_EXTENSIONS + (".txt", ".json")})


def tar_source(pattern: str, *, process_index=None, process_count=None) -> Source:
    """WebDataset-style tar shards (as img2dataset writes them); process p reads shards p, p + P, ..."""
    shards = sorted(glob.glob(os.path.expanduser(pattern)))
    if not shards:
        raise ValueError(f"no tar shards match {pattern!r}")
    process_index, process_count = _process(process_index, process_count)
    mine = shards[process_index::process_count]
    if not mine:
        raise ValueError(f"{len(shards)} shards match {pattern!r}, fewer than the {process_count} processes")
    examples = tf.data.Dataset.from_tensor_slices(mine).flat_map(
        lambda shard: tf.data.Dataset.from_generator(_tar_samples, output_signature=_SIGNATURE, args=(shard,))
    )
    return Source(pattern, examples, sum(_count_tar_samples(s) for s in mine))


def wds_source(path: str, *, split: str = "test", process_index=None, process_count=None) -> Source:
    """An image–caption set in CLIP_benchmark's WebDataset layout (`jclip.data.benchmark_shards`), such as its
    Flickr30k and MSCOCO retrieval sets."""
    shards = read_benchmark_shards(path, split)
    if shards.kind != "retrieval":
        raise ValueError(f"{path} is a {shards.kind} set, not an image–caption one (its dataset_type.txt is not "
                         "'retrieval'): evaluate it with zero_shot or linear_probe, dataset=dict(kind='wds', path=...)")
    begin, end = process_range(len(shards.samples), process_index, process_count)
    examples = shards.examples(begin, end).map(lambda ex: {key: ex[key] for key in _SIGNATURE})
    return Source(shards.name, examples, end - begin)


def resolve_data_dir(path: str, data_dir: Optional[str]) -> str:
    """`path` with `{data_dir}` replaced by `data_dir` (`config.data.data_dir`)."""
    if "{data_dir}" not in path:
        return path
    if not data_dir:
        raise ValueError(f"the path {path!r} holds {{data_dir}}, but no data_dir is set: set config.data.data_dir "
                         "(or pass --data_dir)")
    return path.replace("{data_dir}", data_dir)


SOURCE_KINDS = {"shapes": shapes_source, "tfds": tfds_source, "csv": csv_source, "tar": tar_source,
                "wds": wds_source}


def build_source(options: Mapping[str, Any], data_dir: Optional[str] = None, *,
                 process_index=None, process_count=None) -> tuple[Source, float]:
    """The source described by one entry of `config.data.sources`, and its mixture weight."""
    options = dict(options)
    kind, weight = options.pop("kind", None), float(options.pop("weight", 1.0))
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; use one of {sorted(SOURCE_KINDS)}")
    if kind in ("shapes", "tfds") and options.get("data_dir") is None:
        options["data_dir"] = data_dir
    for key in ("path", "pattern"):
        if isinstance(options.get(key), str):
            options[key] = resolve_data_dir(options[key], data_dir)
    try:
        source = SOURCE_KINDS[kind](**options, process_index=process_index, process_count=process_count)
    except TypeError as error:
        raise ValueError(f"bad options for a {kind!r} source: {error}") from None
    if source.num_examples == 0:
        raise ValueError(f"source {source.name!r} has no examples for process {process_index}")
    return source, weight
