"""CLIP_benchmark's WebDataset layout: the evaluation suite's datasets as LAION publishes them.

LAION's CLIP_benchmark exports each dataset (`clip_benchmark_export_wds`) into one directory, and the
Hugging Face hub holds them as `clip-benchmark/wds_NAME` (`wds_vtab-cifar10`, `wds_flickr30k`, ...):

    DIR/classnames.txt                          one class name per line (classification sets)
    DIR/zeroshot_classification_templates.txt   one prompt template per line, "{c}" for the class name
    DIR/dataset_type.txt                        "retrieval" for image–caption sets ("multilabel": VOC's
                                                multi-label set; absent: classification)
    DIR/SPLIT/nshards.txt                       the number of shards N
    DIR/SPLIT/0.tar ... (N-1).tar               samples KEY.webp | .png | .jpg | .jpeg, with KEY.cls
                                                (the class index, as text) or KEY.txt (captions, a line each)

The shards are indexed once (their tar headers and small label and caption members), and each process
takes a contiguous range of the samples in shard order, as for the other evaluation datasets: results do
not depend on the process count. A sample whose image is missing or cut off, or whose label is missing or
not a number, reaches the evaluation with empty image bytes, which it skips and counts as unreadable.
"""

import dataclasses
import os
import tarfile
from typing import Optional

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # the image members CLIP_benchmark reads, in its order
_KINDS = ("classification", "retrieval")


class DatasetMissing(FileNotFoundError):
    """A dataset that is not on disk (the benchmark suite skips these and lists them)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of a shard: where its image bytes lie, and its label or captions."""

    shard: str
    key: str
    image_offset: int = -1  # -1: the sample has no image member
    image_size: int = 0
    label: int = -1  # -1: no readable .cls member
    captions: tuple[str, ...] = ()


@dataclasses.dataclass
class BenchmarkShards:
    """One split of a dataset in CLIP_benchmark's layout: its metadata and all its samples, in order."""

    path: str
    split: str
    kind: str  # "classification" or "retrieval"
    class_names: Optional[list[str]]  # classnames.txt, if present
    templates: Optional[list[str]]  # zeroshot_classification_templates.txt with "{}" for the class, if present
    samples: list[Sample]

    @property
    def name(self) -> str:
        return f"{self.path}/{self.split}"

    def labels(self) -> np.ndarray:
        return np.array([sample.label for sample in self.samples], np.int64)

    def examples(self, begin: int, end: int) -> tf.data.Dataset:
        """Samples `begin` to `end` as `{"image": bytes, "image_path": "", "label": int64, "captions": [n]}`."""
        chosen = self.samples[begin:end]

        def generate():
            files = {}
            try:
                for sample in chosen:
                    yield {"image": _image_bytes(sample, files), "image_path": "", "label": sample.label,
                           "captions": np.array(sample.captions or ("",), dtype=object)}
            finally:
                for file in files.values():
                    file.close()

        signature = {"image": tf.TensorSpec([], tf.string), "image_path": tf.TensorSpec([], tf.string),
                     "label": tf.TensorSpec([], tf.int64), "captions": tf.TensorSpec([None], tf.string)}
        return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
            tf.data.experimental.assert_cardinality(len(chosen)))


def _image_bytes(sample: Sample, files: dict) -> bytes:
    """The sample's image bytes; empty where it has none, or where its label is unreadable (so that the
    evaluation skips and counts it), or where the shard ends before the image does."""
    if sample.image_offset < 0 or (sample.label < 0 and not sample.captions):
        return b""
    if sample.shard not in files:
        files[sample.shard] = open(sample.shard, "rb")
    file = files[sample.shard]
    file.seek(sample.image_offset)
    data = file.read(sample.image_size)
    return data if len(data) == sample.image_size else b""


def _read_lines(path: str) -> Optional[list[str]]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def shard_paths(path: str, split: str) -> list[str]:
    """The shards of `split`: `0.tar` to `(N-1).tar` of nshards.txt, or, without it, every .tar in numeric order."""
    folder = os.path.join(path, split)
    count = _read_lines(os.path.join(folder, "nshards.txt"))
    if count:
        shards = [os.path.join(folder, f"{i}.tar") for i in range(int(count[0]))]
        absent = [s for s in shards if not os.path.isfile(s)]
        if absent:
            raise DatasetMissing(f"{len(absent)} of the {len(shards)} shards that {folder}/nshards.txt counts are "
                                 f"missing ({os.path.basename(absent[0])}, ...); download them again")
        return shards
    if os.path.isdir(folder):
        stem = lambda name: name[:-4]
        tars = [n for n in os.listdir(folder) if n.endswith(".tar")]
        shards = sorted(tars, key=lambda n: (0, int(stem(n))) if stem(n).isdigit() else (1, n))
        if shards:
            return [os.path.join(folder, name) for name in shards]
    raise DatasetMissing(
        f"no CLIP_benchmark dataset at {path} for split {split!r} (no {folder}/nshards.txt or .tar shards); "
        f"download it, e.g. `huggingface-cli download clip-benchmark/wds_NAME --repo-type dataset --local-dir {path}`")


def _index_shard(shard: str, kind: str) -> list[Sample]:
    """The samples of one shard, in order; a cut-off shard ends at its last whole tar header (with a warning)."""
    order, members = [], {}
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                stem, _, extension = base.partition(".")  # WebDataset's key: the name up to its first dot
                key = os.path.join(folder, stem)
                if key not in members:
                    order.append(key)
                    members[key] = {}
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS and "image" not in members[key]:
                    members[key]["image"] = (member.offset_data, member.size)
                elif extension in ("cls", "txt"):
                    members[key][extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        print(f"warning: shard {shard} is unreadable past its sample {order[-1] if order else None!r} "
              f"(a partial download?): {error}", flush=True)
    samples = []
    for key in order:
        found = members[key]
        offset, size = found.get("image", (-1, 0))
        label, captions = -1, ()
        if kind == "classification":
            text = found.get("cls", b"").decode("utf-8", "replace").strip()
            label = int(text) if text.lstrip("-").isdigit() else -1
        else:
            text = found.get("txt", b"").decode("utf-8", "replace")
            captions = tuple(line.strip() for line in text.splitlines() if line.strip())
        samples.append(Sample(shard, key, offset, size, label, captions))
    return samples


def read_benchmark_shards(path: str, split: str = "test") -> BenchmarkShards:
    """Index `split` of the dataset at `path` (see the module docstring); a clear error where it is absent,
    is of a kind jclip does not evaluate, or has a class index out of the range of its classnames.txt."""
    if not os.path.isdir(path):
        raise DatasetMissing(
            f"no CLIP_benchmark dataset at {path}; download one, e.g. `huggingface-cli download "
            f"clip-benchmark/wds_vtab-cifar10 --repo-type dataset --local-dir {path}`")
    kind = (_read_lines(os.path.join(path, "dataset_type.txt")) or ["classification"])[0].lower()
    if kind not in _KINDS:
        raise ValueError(f"{path} is a {kind!r} dataset ({path}/dataset_type.txt); jclip evaluates "
                         f"{' and '.join(_KINDS)} sets of this layout")
    samples = [sample for shard in shard_paths(path, split) for sample in _index_shard(shard, kind)]
    if not samples:
        raise ValueError(f"the {split} shards of {path} hold no samples")
    class_names = _read_lines(os.path.join(path, "classnames.txt"))
    templates = _read_lines(os.path.join(path, "zeroshot_classification_templates.txt"))
    if class_names is not None:
        wrong = next((s for s in samples if s.label >= len(class_names)), None)
        if wrong is not None:
            raise ValueError(f"{wrong.shard}, sample {wrong.key}: class index {wrong.label} is out of range for the "
                             f"{len(class_names)} names of {path}/classnames.txt; fix the sample or classnames.txt")
    return BenchmarkShards(path, split, kind, class_names,
                           None if templates is None else [t.replace("{c}", "{}") for t in templates], samples)
