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

import collections
import csv
import dataclasses
import glob
import itertools
import json
import os
import tarfile
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tqdm import tqdm

from jclip.data import prompts, shapes
from jclip.data.benchmark_shards import read_benchmark_shards

# A tfds dataset up to this size is kept in memory once read (tfds's own auto-cache rule): later epochs
# then cost no file reads or record parsing.
IN_MEMORY_BYTES = 250 * 2**20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS + (".txt", ".json")  # the files of a WebDataset sample that sources read
NAMED_SKIPPED = 5  # bad examples (rows, samples) that warnings name one by one; the others are only counted
# What reading a tar file that is cut short raises (EOFError: a compressed one).
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError)
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
    where: Optional[Callable[[int], str]] = None  # example k -> where it is (a CSV line, a tar sample)
    # Cheap stand-ins for `examples` (sample numbers, in the same order) and the map that reads one into its
    # example: the training stream orders and skips these and reads only what it draws, so a resume skips fast.
    references: Optional[tf.data.Dataset] = None
    read: Optional[Callable[[tf.Tensor], dict]] = None

    def describe(self, k: int) -> str:
        """Where example k of this slice is, for warnings that name bad examples."""
        return self.where(k) if self.where else f"{self.name} example {k}"


def first_few(things: Sequence, total: Optional[int] = None) -> str:
    """The first NAMED_SKIPPED of `things` (of `total`, by default all of them), and how many more there are."""
    total = len(things) if total is None else total
    named = ", ".join(str(thing) for thing in things[:NAMED_SKIPPED])
    return named + (f" and {total - NAMED_SKIPPED} more" if total > NAMED_SKIPPED else "")


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


def _csv_records(lines: Iterable[str], delimiter: str) -> Iterator[tuple[int, int, Optional[list[str]], str]]:
    """(first line, last line, fields, error) of each record of CSV text; fields None and the csv module's
    error for one whose quotes do not close where they should (reading goes on at the next line)."""
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    while True:
        first = reader.line_num + 1
        try:
            fields, error = next(reader), ""
        except StopIteration:
            return
        except csv.Error as exception:
            fields, error = None, str(exception)
        yield first, reader.line_num, fields, error


def _csv_rows(path: str, image_column: str, caption_column: str) -> tuple[list[tuple[str, str, int]], list[str],
                                                                           list[int]]:
    """(image path, caption, line) of each usable row of a CSV or TSV file; the rows left out (the wrong number
    of fields, or quotes that do not close where they should), by line; and the lines of the captions that are
    not valid UTF-8, read with U+FFFD for their bad bytes. A quote that never closes, so that the rest of the
    file reads as one field, is a ValueError naming its line."""
    delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        records = _csv_records(f, delimiter)
        header = next(records, (0, 0, [], ""))[2] or []
        missing = {image_column, caption_column} - set(header)
        if missing:
            raise ValueError(f"{path} has no column(s) {sorted(missing)}; its columns are {header}")
        image, caption = header.index(image_column), header.index(caption_column)
        rows, left_out, not_utf8, record = [], [], [], None
        for record in records:
            first, last, fields, error = record
            if fields == []:  # a blank line
                continue
            if fields is None or len(fields) != len(header):
                lines = f"line {first}" if first == last else f"lines {first}-{last}"
                left_out.append(f"{lines} ({error or f'{len(fields)} fields for {len(header)} columns'})")
                continue
            text = fields[caption]
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                not_utf8.append(first)
            rows.append((fields[image], text, first))
    if record is not None and record[2] is None and record[0] < record[1]:
        raise ValueError(f"{path}: the quoted field that starts on line {record[0]} never closes where it should, so "
                         f"lines {record[0]}-{record[1]}, the rest of the file, read as one field ({record[3]}); fix "
                         'the quotes on that line (a quote inside a quoted field is written "")')
    return rows, left_out, not_utf8


def csv_source(path: str, *, image_column: str = "filepath", caption_column: str = "caption",
               image_root: Optional[str] = None, process_index=None, process_count=None) -> Source:
    """A CSV (or TSV, by extension) of image paths and captions; relative paths are under `image_root`.

    Damaged rows do not stop training, and a warning names the first few lines of each kind: a row with the
    wrong number of fields, or quotes that do not close where they should, is left out; a caption that is not
    valid UTF-8 is kept, with U+FFFD for its bad bytes. A quote that never closes, swallowing the rest of the
    file, is an error naming its line. A row whose image is missing, a directory or not an image is skipped and
    counted when training visits it.
    """
    if not os.path.exists(path):
        raise ValueError(f"no CSV file at {path!r}")
    rows, left_out, not_utf8 = _csv_rows(path, image_column, caption_column)
    process_index, process_count = _process(process_index, process_count)
    if left_out and process_index == 0:
        print(f"warning: {path}: left out {len(left_out)} row(s) that do not parse into its columns: "
              f"{first_few(left_out)}", flush=True)
    if not_utf8 and process_index == 0:
        print(f"warning: {path}: the captions of {len(not_utf8)} row(s) are not valid UTF-8 (at line(s) "
              f"{first_few(not_utf8)}); their bad bytes read as U+FFFD (save the file as UTF-8 to keep them)",
              flush=True)
    if not rows:
        raise ValueError(f"{path} has no usable rows")
    begin, end = process_range(len(rows), process_index, process_count)
    root = image_root or os.path.dirname(os.path.abspath(path))
    # Bytes: a path that is not valid UTF-8 names its file byte for byte.
    paths = [os.fsencode(p if os.path.isabs(p) else os.path.join(root, p)) for p, _, _ in rows[begin:end]]
    captions = [c for _, c, _ in rows[begin:end]]
    lines = np.array([line for _, _, line in rows[begin:end]])
    examples = tf.data.Dataset.from_tensor_slices((paths, captions)).map(
        lambda p, c: {"image": "", "image_path": p, "captions": tf.reshape(c, [1])}
    )
    return Source(os.path.basename(path), examples, end - begin, image_files=True,
                  where=lambda k: f"{path} line {lines[k]}")


def _caption(text: Optional[bytes], metadata: Optional[bytes]) -> str:
    """A WebDataset sample's caption: its .txt, or else the "caption" of its .json (empty where it has neither)."""
    caption = (text or b"").decode("utf-8", "replace")
    if not caption and metadata:
        try:
            caption = str(json.loads(metadata.decode("utf-8", "replace")).get("caption") or "")
        except (ValueError, AttributeError):
            caption = ""
    return caption.strip()


def _tar_groups(archive: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) of each sample of an open WebDataset tar: consecutive image, .txt and .json
    files sharing a key (headers only, no data read). Where the tar is cut short, raises one of `_TAR_ERRORS`
    after the samples before the cut."""
    key, files = None, {}
    for member in archive:
        stem, extension = os.path.splitext(member.name)
        if not member.isfile() or extension.lower() not in SAMPLE_EXTENSIONS:
            continue
        if stem != key and key is not None:
            yield key, files
            files = {}
        key = stem
        files[extension.lower()] = member
    if key is not None:
        yield key, files


def _cut_short(shard: str, samples: int, error: Exception) -> str:
    return (f"warning: tar shard {shard} is cut short after {samples} sample(s) ({error}); a partial download? Its "
            "samples before the cut are used: download it again for the others")


# The members of a sample that `_index_tar` locates: its image (the first of IMAGE_EXTENSIONS), .txt and .json.
_MEMBERS = ("image", ".txt", ".json")


def _index_tar(shard: str) -> np.ndarray:
    """[samples, 3, 2] int64: the (offset, size) of each sample's `_MEMBERS` in the shard, (-1, 0) where it has
    none, from the tar headers (`_tar_groups`). A shard cut short (a partial download) gives the samples before
    the cut, with a warning; a file that cannot be opened as an uncompressed tar is a ValueError."""
    try:
        archive = tarfile.open(shard, "r:")
    except _TAR_ERRORS as error:
        with open(shard, "rb") as file:
            magic = file.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            raise ValueError(f"tar shard {shard} is compressed: jclip reads each sample of a tar shard where it lies "
                             "(so that a resumed run skips to its position without reading), which needs "
                             "uncompressed shards; decompress it (e.g. gunzip)") from None
        raise ValueError(f"tar shard {shard} cannot be opened as a tar file ({str(error).splitlines()[-1].strip()}): "
                         "empty, cut short or not a tar? Download it again, or remove it") from None
    rows = []
    with archive:
        try:
            for _, files in _tar_groups(archive):
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                members = [image, files.get(".txt"), files.get(".json")]
                rows.append([(m.offset_data, m.size) if m is not None else (-1, 0) for m in members])
        except _TAR_ERRORS as error:
            print(_cut_short(shard, len(rows), error), flush=True)
    return np.array(rows, np.int64).reshape(-1, len(_MEMBERS), 2)


def _stated_sizes(shards: Sequence[str]) -> list[Optional[int]]:
    """Each shard's sample count where the dataset states it, else None: OpenCLIP's `sizes.json` beside the shards
    ({shard file name: count}), or img2dataset's `NAME_stats.json` beside the shard ("successes")."""
    listed = {}
    for folder in {os.path.dirname(shard) for shard in shards}:
        try:
            with open(os.path.join(folder, "sizes.json")) as file:
                listed.update({os.path.join(folder, name): count for name, count in json.load(file).items()})
        except (OSError, ValueError, AttributeError):
            pass
    sizes = []
    for shard in shards:
        size = listed.get(shard)
        if size is None:
            try:
                with open(os.path.splitext(shard)[0] + "_stats.json") as file:
                    size = json.load(file)["successes"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        sizes.append(int(size) if isinstance(size, int) and size >= 0 else None)
    return sizes


class _TarReader:
    """Reads sample k of tar shards of known sizes: its image bytes and caption, where `_index_tar` locates them.

    A shard is indexed when first read, and the indices of the most recently read `INDEXED` shards are kept (a
    shard's index is 48 bytes per sample). tf.data calls it from several threads. A sample number that its shard
    does not hold (its stated size was wrong) or a file that cannot be read gives an empty sample (skipped and
    counted), with a warning for the shard.
    """

    OPEN_FILES = 16  # shards kept open, the most recently read
    INDEXED = 64

    def __init__(self, shards: Sequence[str], sizes: Sequence[int], indices: Mapping[int, np.ndarray]):
        self.shards, self.sizes = shards, sizes
        self.starts = np.cumsum([0] + list(sizes))
        self.files: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.indices: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict(indices)
        self.lock = threading.Lock()

    def _index(self, shard: int) -> np.ndarray:
        with self.lock:
            if shard in self.indices:
                self.indices.move_to_end(shard)
                return self.indices[shard]
        try:
            index = _index_tar(self.shards[shard])
        except (ValueError, OSError) as error:
            print(f"warning: {error}; its samples are skipped", flush=True)
            index = np.zeros((0, len(_MEMBERS), 2), np.int64)
        if len(index) != self.sizes[shard]:
            print(f"warning: tar shard {self.shards[shard]} holds {len(index)} samples, not the {self.sizes[shard]} "
                  "its sizes.json or _stats.json states; the difference is skipped: correct that count", flush=True)
        with self.lock:
            self.indices[shard] = index
            while len(self.indices) > self.INDEXED:
                self.indices.popitem(last=False)
        return index

    def _descriptor(self, shard: int) -> int:
        with self.lock:
            if shard not in self.files:
                self.files[shard] = os.open(self.shards[shard], os.O_RDONLY)
                if len(self.files) > self.OPEN_FILES:
                    os.close(self.files.popitem(last=False)[1])
            self.files.move_to_end(shard)
            return self.files[shard]

    def _shard(self, k: int) -> tuple[int, int]:
        """(shard, number of the sample in it) of sample k."""
        shard = int(np.searchsorted(self.starts, k, side="right")) - 1
        return shard, k - int(self.starts[shard])

    def sample(self, k: int) -> tuple[bytes, str]:
        """The image bytes and caption of sample k."""
        shard, number = self._shard(k)
        index = self._index(shard)
        if number >= len(index):
            return b"", ""
        members = [None] * len(_MEMBERS)
        try:
            descriptor = self._descriptor(shard)
            for i, (offset, size) in enumerate(index[number]):
                members[i] = os.pread(descriptor, int(size), int(offset)) if offset >= 0 else None
        except OSError:
            members[0] = None
        return members[0] or b"", _caption(*members[1:])

    def __call__(self, k: tf.Tensor) -> dict:
        """Sample `k` as an example (a tf.data map)."""
        def read(k):
            image, caption = self.sample(int(k))
            return image, caption.encode()
        image, caption = tf.numpy_function(read, [k], (tf.string, tf.string), stateful=False)
        return {"image": tf.reshape(image, []), "image_path": "", "captions": tf.reshape(caption, [1])}

    def where(self, k: int) -> str:
        """Where sample k is: its shard and key."""
        shard, number = self._shard(k)
        try:
            with tarfile.open(self.shards[shard], "r:") as archive:
                key = next(itertools.islice(_tar_groups(archive), number, None))[0]
        except (*_TAR_ERRORS, StopIteration):
            key = f"number {number}"
        return f"{self.shards[shard]} sample {key!r}"


def tar_source(pattern: str, *, process_index=None, process_count=None) -> Source:
    """WebDataset-style tar shards (as img2dataset writes them); process p reads shards p, p + P, ...

    A sample is read where it lies in its shard when it is drawn, so a resumed run skips to its position without
    reading. Shard sizes come from OpenCLIP's `sizes.json` or img2dataset's `*_stats.json` beside the shards;
    shards without either are indexed (their headers read) at the start. A shard cut short (a partial download)
    gives its samples before the cut, with a warning; a sample without an image that decodes or without a
    caption is skipped and counted when training visits it.
    """
    shards = sorted(glob.glob(os.path.expanduser(pattern)))
    if not shards:
        raise ValueError(f"no tar shards match {pattern!r}")
    process_index, process_count = _process(process_index, process_count)
    mine = shards[process_index::process_count]
    if not mine:
        raise ValueError(f"{len(shards)} shards match {pattern!r}, fewer than the {process_count} processes")
    sizes, indices = _stated_sizes(mine), {}
    unstated = [i for i, size in enumerate(sizes) if size is None]
    for i in tqdm(unstated, desc="index tar shards", unit="shard", leave=False, disable=len(unstated) < 100):
        indices[i] = _index_tar(mine[i])
        sizes[i] = len(indices[i])
    reader = _TarReader(mine, sizes, dict(list(indices.items())[-_TarReader.INDEXED:]))
    references = tf.data.Dataset.range(int(sum(sizes)))
    return Source(pattern, references.map(reader), int(sum(sizes)), where=reader.where, references=references,
                  read=reader)


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
